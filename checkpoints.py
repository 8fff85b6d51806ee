"""Checkpoints: atomic writes, disk-space checks, and loading weights from our .ckpt, upstream .ckpt
or Hugging Face format.

Lightning checkpoints hold the backbone under `state_dict['backbone.*']` and the EMA under
checkpoint['ema'] (SPEC §8). Released Hugging Face checkpoints have the EMA already applied.
A training run keeps `<run dir>/checkpoints/last.ckpt` and periodic `step-<N>.ckpt` files.
"""
import errno
import logging
import re
import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from atomic import atomic_write
from errors import CheckpointError, DiskFullError, RunStopped
from models.hf_format import PREFIX

log = logging.getLogger(__name__)

LAST = 'last.ckpt'
PERIODIC = re.compile(r'step-(\d+)\.ckpt')  # the periodic checkpoints (callbacks.RunCheckpoint names them)


# ---- disk space ----------------------------------------------------------------------------
def free_bytes(directory) -> int:
    return shutil.disk_usage(directory).free


def checkpoint_bytes(checkpoint) -> int:
    """Bytes of tensor data in a checkpoint dict (each storage once): about its size on disk."""
    seen, total, stack = set(), 0, [checkpoint]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def periodic_checkpoints(directory) -> list[Path]:
    """The periodic checkpoints step-<N>.ckpt in `directory`, oldest (smallest N) first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob('step-*.ckpt') if (m := PERIODIC.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def make_room(path, needed: int):
    """Ensure `needed` bytes (plus a margin) are free for writing `path`: delete the oldest periodic
    checkpoints of its directory (never last.ckpt, never `path`) until they are; else DiskFullError."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    wanted = needed + max(needed // 50, 16 * 2 ** 20)  # headroom: zip records, other writers
    free = free_bytes(directory)
    for old in periodic_checkpoints(directory):
        if free >= wanted:
            return
        if old.name == path.name:
            continue
        log.warning('Low disk space (%.2f GB free, %.2f GB needed for %s): deleting the oldest periodic checkpoint %s',
                    free / 1e9, wanted / 1e9, path.name, old)
        old.unlink(missing_ok=True)
        free = free_bytes(directory)
    if free < wanted:
        raise DiskFullError(
            f"not enough disk space to save {path}: it needs about {wanted / 1e9:.2f} GB and {directory} has "
            f"{free / 1e9:.2f} GB free (no older periodic checkpoint is left to delete); free some space and run the "
            f"same command again to resume from {directory / LAST}")


def check_finite(checkpoint):
    """RunStopped when the weights or the EMA of a checkpoint about to be written are not finite."""
    tensors = [v for v in checkpoint.get('state_dict', {}).values() if torch.is_floating_point(v)]
    tensors += list((checkpoint.get('ema') or {}).get('shadow_params', []))
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise RunStopped(f"the weights are not finite at step {checkpoint.get('global_step')}: no checkpoint was "
                         f"written and the last good one is kept; lower optim.lr or use trainer.precision=32 "
                         f"(or bf16), then run the same command again to resume")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never writes non-finite weights, first makes room on the disk
    (see make_room), and writes atomically (temp file + fsync + rename); a write that still runs out
    of space raises DiskFullError, leaving the previous file intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        check_finite(checkpoint)
        make_room(path, checkpoint_bytes(checkpoint))
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise DiskFullError(f"the disk filled up while saving {path} ({e.strerror}); the previous checkpoints "
                                f"are intact: free some space and run the same command again to resume") from None


def is_hf_reference(path: str) -> bool:
    """A local directory with config.json, or something that looks like a hub id ('owner/name')."""
    p = Path(path)
    if p.is_dir():
        return (p / 'config.json').exists()
    return not p.suffix and not p.exists() and path.count('/') == 1 and not path.startswith(('.', '/'))


def load_weights(path: str, setting: str = 'eval.checkpoint_path') -> tuple[dict, dict | None, dict]:
    """(backbone state_dict without prefix, EMA state or None, the full checkpoint or HF config).

    Accepts our/upstream Lightning .ckpt files and Hugging Face directories or hub ids; `setting`
    names the option the path came from, for messages.
    """
    path = str(path)
    if is_hf_reference(path) or Path(path).is_dir():  # a directory without config.json gets load_hf's message
        from models.hf_format import load_hf
        hf_config, state_dict = load_hf(path)
        return state_dict, None, {'hf_config': hf_config}
    if not Path(path).is_file():
        raise CheckpointError(f"{setting}={path} does not exist: train first (mode=train) or pass "
                              f"{setting}=<a .ckpt file, a Hugging Face directory or hub id>")
    checkpoint = read_checkpoint(path)
    state_dict = {k[len(PREFIX):]: v for k, v in checkpoint['state_dict'].items() if k.startswith(PREFIX)}
    if not state_dict:
        raise CheckpointError(f"checkpoint {path} has no '{PREFIX}*' weights: it is not a duo/DUO/MDLM checkpoint")
    return state_dict, checkpoint.get('ema'), checkpoint


def read_checkpoint(path, mmap: bool = False) -> dict:
    """A Lightning checkpoint as a dict (CheckpointError naming the file when it cannot be read);
    mmap=True leaves the tensors on disk until used."""
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=mmap)
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
            raise TypeError('no state_dict')
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else ''
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {reason}); it is truncated "
                              f"or not a Lightning checkpoint: use another file, e.g. checkpoints/last.ckpt") from None
    return checkpoint


def read_progress(path) -> tuple[int, int]:
    """(optimizer steps, training batches consumed) of a checkpoint; a memory-mapped read: the
    weights stay on disk."""
    checkpoint = read_checkpoint(path, mmap=True)
    return int(checkpoint.get('global_step', 0)), int(checkpoint.get('micro_step', 0))


def check_compatible(state_dict: dict, backbone: torch.nn.Module, source: str):
    """Raise one clear line naming the setting when checkpoint and model shapes differ."""
    model_sd = backbone.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_sd.items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    emb_m, emb_c = expected.get('vocab_embed.embedding'), got.get('vocab_embed.embedding')
    if emb_c is None:
        raise CheckpointError(f"{source} has no vocab_embed.embedding: not a DiT checkpoint")
    if emb_c[1] != emb_m[1]:
        raise CheckpointError(f"{source} has hidden size {emb_c[1]} but model.hidden_size={emb_m[1]}: "
                              f"pick the model config it was trained with (e.g. model=small for 768)")
    if emb_c[0] != emb_m[0]:
        raise CheckpointError(f"{source} has a vocabulary of {emb_c[0]} ids but this data/tokenizer gives "
                              f"{emb_m[0]}: use the tokenizer it was trained with (data.tokenizer_name_or_path)")
    n_blocks = lambda keys: len({k.split('.')[1] for k in keys if k.startswith('blocks.')})
    if n_blocks(got) != n_blocks(expected):
        raise CheckpointError(f"{source} has {n_blocks(got)} blocks but model.n_blocks={n_blocks(expected)}: "
                              f"pick the model config it was trained with")
    missing = sorted(set(expected) - set(got))
    if missing:
        kind = 'an AR (causal) model' if 'sigma_map.mlp.0.weight' not in got else 'a diffusion model'
        raise CheckpointError(f"{source} lacks {missing[0]} (and {len(missing) - 1} more): it looks like {kind}; "
                              f"check algo= (ar checkpoints need algo=ar and vice versa)")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source} has {unexpected[0]} (and {len(unexpected) - 1} more) that the model lacks: "
                              f"it is a diffusion checkpoint; algo=ar needs an AR checkpoint")
    for k, shape in expected.items():
        if got[k] != shape:
            raise CheckpointError(f"{source}: {k} has shape {got[k]} but the model expects {shape}: "
                                  f"check model.cond_dim / model.n_heads against the checkpoint")
