"""Checkpoints: atomic writes, and loading weights from our .ckpt, upstream .ckpt or Hugging Face format.

Lightning checkpoints hold the backbone under `state_dict['backbone.*']` and the EMA under
checkpoint['ema'] (SPEC §8). Released Hugging Face checkpoints have the EMA already applied.
"""
import os
import tempfile
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

PREFIX = 'backbone.'
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path, write_fn, mode='wb'):
    """Write a file so that a kill at any instant leaves either the old or the new file.

    `write_fn(f)` writes to a temporary file in the same directory, which is flushed, fsynced
    and renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic (temp file + fsync + rename)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another model."""


def is_hf_reference(path: str) -> bool:
    """A local directory with config.json, or something that looks like a hub id ('owner/name')."""
    p = Path(path)
    if p.is_dir():
        return (p / 'config.json').exists()
    return not p.suffix and not p.exists() and path.count('/') == 1 and not path.startswith(('.', '/'))


def load_weights(path: str) -> tuple[dict, dict | None, dict]:
    """(backbone state_dict without prefix, EMA state or None, the full checkpoint or HF config).

    Accepts our/upstream Lightning .ckpt files and Hugging Face directories or hub ids.
    """
    path = str(path)
    if is_hf_reference(path) or Path(path).is_dir():  # a directory without config.json gets load_hf's message
        from models.hf_format import load_hf
        hf_config, state_dict = load_hf(path)
        return state_dict, None, {'hf_config': hf_config}
    if not Path(path).is_file():
        raise CheckpointError(f"eval.checkpoint_path={path} does not exist: train first (mode=train) or pass "
                              f"eval.checkpoint_path=<a .ckpt file, a Hugging Face directory or hub id>")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
        full = checkpoint['state_dict']
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated "
                              f"or not a Lightning checkpoint: use another file, e.g. checkpoints/last.ckpt") from None
    state_dict = {k[len(PREFIX):]: v for k, v in full.items() if k.startswith(PREFIX)}
    if not state_dict:
        raise CheckpointError(f"checkpoint {path} has no '{PREFIX}*' weights: it is not a duo/DUO/MDLM checkpoint")
    return state_dict, checkpoint.get('ema'), checkpoint


def read_progress(path) -> tuple[int, int]:
    """(optimizer steps, training batches consumed) of a checkpoint; a memory-mapped read: the
    weights stay on disk."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
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
