"""Checkpoints: reading them without running their code, what model they describe, building that
model, and writing them atomically.

Formats read (SPEC §8): our Lightning .ckpt (its module writes `checkpoint['duo']`, the description
that rebuilds it: algorithm, model sizes, noise, tokenizer), upstream DUO/MDLM Lightning .ckpt
(their config in `hyper_parameters`), and Hugging Face directories or hub ids (config.json +
safetensors, models/hf_format.py). All keep the backbone under `backbone.*` and the EMA under
checkpoint['ema'] (released Hugging Face weights have it applied already).

`torch.load` always runs with weights_only=True. The pickled objects a checkpoint may hold besides
tensors are read through inert stand-ins that never import or run anything: configuration
containers (OmegaConf, Lightning's AttributeDict) are read as plain data, objects of libraries we
never need (a pickled tokenizer) are skipped, and anything else is refused with one line.

A training run keeps `<run dir>/checkpoints/last.ckpt` and periodic `step-<N>.ckpt` files.
"""
import collections
import errno
import logging
import os
import re
import shutil
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf, open_dict

import algorithms
import dataloader
from atomic import atomic_write
from diffusion import Diffusion
from ema import EMA
from errors import CheckpointError, ConfigError, DiskFullError, RunStopped
from models import hf_format
from models.dit import DiT
from models.hf_format import PREFIX

log = logging.getLogger(__name__)

LAST = 'last.ckpt'
PERIODIC = re.compile(r'step-(\d+)\.ckpt')  # the periodic checkpoints (callbacks.RunCheckpoint names them)
SIZE_KEYS = ('hidden_size', 'cond_dim', 'n_blocks', 'n_heads')
MACHINE_DATA_KEYS = ('cache_dir', 'num_proc')  # where this machine keeps the data: never taken from a checkpoint


# ---- reading without running code ----------------------------------------------------------
class _StandIn:
    """Takes the place of a class a checkpoint names: keeps what the file gives it, runs nothing."""
    name = '?'

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _AsDict:
    """Stands in for dict subclasses (Lightning's AttributeDict): the unpickler fills a plain dict."""

    def __new__(cls, *args, **kwargs):
        return dict(*args)


# Real classes that are plain data (OmegaConf's metadata names them as types).
_PLAIN_TYPES = {f'builtins.{t.__name__}': t for t in (dict, list, tuple, set, frozenset, int, float, str, bool, bytes)}
_PLAIN_TYPES.update({'collections.defaultdict': collections.defaultdict, 'typing.Any': typing.Any})
_DICT_LIKE = re.compile(r'(lightning|pytorch_lightning)(\.\w+)*\.AttributeDict')
# Configuration objects, read as data through stand-ins.
_RECORDED = re.compile(r'(omegaconf|argparse|pathlib|numpy)(\.\w+)+')
# Objects of libraries whose state we never need (upstream pickles its tokenizer into hyper_parameters).
_SKIPPED = re.compile(r'(transformers|tokenizers)(\.\w+)+')


def _stand_ins(names, path) -> list:
    found = []
    for name in names:
        if name in _PLAIN_TYPES:
            found.append((_PLAIN_TYPES[name], name))
        elif _DICT_LIKE.fullmatch(name):
            found.append((_AsDict, name))
        elif _RECORDED.fullmatch(name) or _SKIPPED.fullmatch(name):
            found.append((type(name.rsplit('.', 1)[-1], (_StandIn,), {'name': name}), name))
        else:
            raise _refused(path, name)
    return found


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint holding an object whose loading would run code."""


def _refused(path, name: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(
        f"checkpoint {path} holds a {name} object, which loading would have to import and run: refused "
        f"(checkpoints are read as weights, numbers, strings and configs only); use a checkpoint from a "
        f"source you trust")


def read_checkpoint(path, mmap: bool = False) -> dict:
    """A Lightning checkpoint as a dict, read with torch.load(weights_only=True) and the stand-ins
    above (CheckpointError naming the file when it is unsafe or cannot be read); mmap=True leaves
    the tensors on disk until used."""
    try:
        names, zipped = torch.serialization.get_unsafe_globals_in_checkpoint(path), True
    except Exception:  # not a zip checkpoint (torch's old format, or damaged): torch.load below says which
        names, zipped = [], False
    with torch.serialization.safe_globals(_stand_ins(names, path)):
        try:
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipped)
            if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get('state_dict'), dict):
                raise TypeError('no state_dict')
        except Exception as e:
            unsafe = re.search(r'GLOBAL ([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)', str(e))  # torch's refusal names it
            raise (_refused(path, unsafe.group(1)) if unsafe else _unreadable(path, e)) from None
    return checkpoint


def _unreadable(path, error: Exception) -> CheckpointError:
    reason = str(error).splitlines()[0][:200] if str(error) else ''
    return CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {reason}); it is truncated "
                           f"or not a Lightning checkpoint: use another file, e.g. checkpoints/last.ckpt")


def plain(obj):
    """Recorded OmegaConf containers (and dicts/lists of them) as plain dicts, lists and values."""
    if isinstance(obj, _StandIn):
        state = obj.state if isinstance(obj.state, dict) else {}
        if '_content' in state:
            return plain(state['_content'])
        return plain(state.get('_val'))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def read_progress(path) -> tuple[int, int]:
    """(optimizer steps, training batches consumed) of a checkpoint; a memory-mapped read: the
    weights stay on disk."""
    checkpoint = read_checkpoint(path, mmap=True)
    return int(checkpoint.get('global_step', 0)), int(checkpoint.get('micro_step', 0))


# ---- what a checkpoint describes -----------------------------------------------------------
@dataclass
class Source:
    """A checkpoint's weights and what it says about the model it belongs to (None: not recorded)."""
    path: str
    state_dict: dict                      # backbone weights, without the 'backbone.' prefix
    ema: dict | None = None               # our EMA layout (SPEC §8); None when applied or absent
    checkpoint: dict | None = None        # the whole Lightning checkpoint (.ckpt only)
    algo: dict | None = None              # the algorithm's settings, name included
    model: dict = field(default_factory=dict)   # hidden_size, cond_dim, n_blocks, n_heads, length
    noise: dict | None = None
    tokenizer: str | None = None
    data: dict | None = None              # the data it was trained on (ours only)

    @property
    def vocab_size(self) -> int:
        return int(self.state_dict['vocab_embed.embedding'].shape[0])

    @property
    def causal(self) -> bool:
        return 'sigma_map.mlp.0.weight' not in self.state_dict


def is_hf_reference(path: str) -> bool:
    """A local directory with config.json, or something that looks like a hub id ('owner/name')."""
    p = Path(path)
    if p.is_dir():
        return (p / 'config.json').exists()
    return not p.suffix and not p.exists() and path.count('/') == 1 and not path.startswith(('.', '/'))


def read_source(path, setting: str = 'eval.checkpoint_path') -> Source:
    """The Source of our/upstream Lightning .ckpt files and Hugging Face directories or hub ids;
    `setting` names the option the path came from, for messages."""
    path = str(path)
    if is_hf_reference(path) or Path(path).is_dir():  # a directory without config.json gets load_hf's message
        hf_config, state_dict = hf_format.load_hf(path, setting)
        algo = {'time_conditioning': bool(hf_config.get('time_conditioning', True))}
        if hf_config.get('model_type') in algorithms.ALGORITHMS:
            algo['name'] = hf_config['model_type']
        sizes = hf_format.model_settings(hf_config)
        return Source(path, state_dict, algo=algo, model={k: sizes[k] for k in (*SIZE_KEYS, 'length')})
    if not Path(path).is_file():
        raise CheckpointError(f"{setting}={path} does not exist: train first (mode=train) or pass "
                              f"{setting}=<a .ckpt file, a Hugging Face directory or hub id>")
    checkpoint = read_checkpoint(path)
    state_dict = {k[len(PREFIX):]: v for k, v in checkpoint['state_dict'].items() if k.startswith(PREFIX)}
    if 'vocab_embed.embedding' not in state_dict:
        raise CheckpointError(f"checkpoint {path} has no '{PREFIX}*' DiT weights: it is not a duo/DUO/MDLM checkpoint")
    source = Source(path, state_dict, checkpoint.get('ema'), checkpoint, model=sizes_from_weights(state_dict))
    if isinstance(checkpoint.get('duo'), dict):  # ours
        described = checkpoint['duo']
        source.algo, source.noise = described['algo'], described['noise']
        source.model['length'] = described['model']['length']
        source.tokenizer, source.data = described['tokenizer'], described.get('data')
    elif 'model_config' in checkpoint:  # ours, before checkpoints described their algorithm
        source.model['length'] = int(checkpoint['model_config']['length'])
    else:  # upstream: its Hydra config, pickled in hyper_parameters
        config = plain((checkpoint.get('hyper_parameters') or {}).get('config')) or {}
        if isinstance(config.get('algo'), dict) and config['algo'].get('name') in algorithms.ALGORITHMS:
            source.algo = config['algo']
        if isinstance(config.get('noise'), dict) and config['noise'].get('type'):
            source.noise = {'type': config['noise']['type'], 'eps': config['noise'].get('eps', 1e-3)}
        if isinstance((config.get('model') or {}).get('length'), int):
            source.model['length'] = config['model']['length']
        if isinstance((config.get('data') or {}).get('tokenizer_name_or_path'), str):
            source.tokenizer = config['data']['tokenizer_name_or_path']
    return source


def sizes_from_weights(state_dict: dict) -> dict:
    """hidden_size, cond_dim, n_blocks, n_heads of a DiT state dict (SPEC §8 keys)."""
    hidden = int(state_dict['vocab_embed.embedding'].shape[1])
    head_dim = 2 * state_dict['rotary_emb.inv_freq'].numel() if 'rotary_emb.inv_freq' in state_dict else hidden
    cond = state_dict.get('sigma_map.mlp.0.weight')
    return {'hidden_size': hidden, 'cond_dim': int(cond.shape[0]) if cond is not None else 1,
            'n_blocks': len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')}),
            'n_heads': hidden // head_dim}


# ---- building the model a checkpoint describes ---------------------------------------------
def configure_from(config, source: Source, explicit=frozenset(), setting: str = 'eval.checkpoint_path',
                   evaluating: bool = True):
    """Put the checkpoint's own settings into `config` (in place): its algorithm (when
    `evaluating`; a run that starts from it chooses its own), time conditioning, model sizes and
    length, noise schedule, tokenizer and, when `evaluating`, the data it was trained on (ours), so
    that no override is needed. A setting the command line gives explicitly (`explicit`: keys such as
    'algo', 'model.hidden_size', 'model') is kept: a contradicting model size is then reported by
    check_compatible, an algorithm of another family here."""
    path = source.path
    stored = source.algo or {}
    if 'name' in stored:
        mine, theirs = config.algo.name, stored['name']
        if algorithms.family(mine) != algorithms.family(theirs) and 'algo' in explicit:
            raise ConfigError(f"{setting}={path} is a checkpoint of algo={theirs}, whose network does not fit "
                              f"algo={mine}: drop algo= (the checkpoint's algorithm is used) or pass algo={theirs}")
        if evaluating and 'algo' not in explicit and mine != theirs:
            file = OmegaConf.load(Path(__file__).resolve().parent / 'configs' / 'algo' / f'{theirs}.yaml')
            is_global = 'algo' in file  # a global package (distillation.yaml, sedd.yaml, d3pm.yaml)
            defaults = file.algo if is_global else file
            with open_dict(config):
                config.algo = OmegaConf.merge(defaults, {k: v for k, v in stored.items() if k in defaults})
                # The file's other settings too (e.g. sedd.yaml's sampling.predictor), as `algo=` would
                # give them, unless the command line gives them
                for key, value in (_leaves(file, skip=('algo',)) if is_global else []):
                    if not any(key == e or key.startswith(e + '.') for e in explicit):
                        OmegaConf.update(config, key, value, force_add=True)
            log.info('%s is a checkpoint of algo=%s: using it', path, theirs)
    with open_dict(config):
        if 'time_conditioning' in stored and 'time_conditioning' in config.algo \
                and 'algo.time_conditioning' not in explicit:
            config.algo.time_conditioning = bool(stored['time_conditioning'])
        for key in SIZE_KEYS:
            if f'model.{key}' not in explicit and 'model' not in explicit:
                config.model[key] = source.model[key]
        length = source.model.get('length')
        if length is not None:
            if 'model.length' not in explicit:
                config.model.length = int(length)
            elif int(config.model.length) > int(length):
                raise ConfigError(f"model.length={config.model.length} exceeds the {length} positions of {path}: use "
                                  f"model.length={length} or less")
        if source.noise and 'noise' not in explicit and not any(k.startswith('noise.') for k in explicit):
            config.noise = OmegaConf.merge(config.noise, source.noise)
        if evaluating and source.data and 'data' not in explicit:  # on the data it was trained on
            for key, value in source.data.items():
                if key in config.data and key not in MACHINE_DATA_KEYS and f'data.{key}' not in explicit:
                    config.data[key] = value
        if source.tokenizer and 'data' not in explicit and 'data.tokenizer_name_or_path' not in explicit:
            config.data.tokenizer_name_or_path = source.tokenizer
    log.info('Model of %s: algo=%s hidden_size=%d cond_dim=%d n_blocks=%d n_heads=%d length=%d', path,
             config.algo.name, *(int(config.model[k]) for k in (*SIZE_KEYS, 'length')))


def _leaves(node, prefix: str = '', skip=()) -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of an OmegaConf node, but the top-level keys in `skip`."""
    out = []
    for key, value in node.items():
        if key in skip:
            continue
        if OmegaConf.is_dict(value):
            out += _leaves(value, f'{prefix}{key}.')
        else:
            out.append((f'{prefix}{key}', value))
    return out


def load_model(config, tokenizer, source: Source | None = None, explicit=frozenset(),
               setting: str = 'eval.checkpoint_path') -> Diffusion:
    """The model of eval.checkpoint_path for evaluation or sampling: configured from the
    checkpoint (configure_from, done by the caller when it passes `source`), its weights loaded and,
    unless eval.disable_ema, its EMA applied."""
    if source is None:
        source = read_source(config.eval.checkpoint_path, setting)
        configure_from(config, source, explicit, setting)
    model = Diffusion(config, *dataloader.model_vocab(tokenizer), tokenizer.bos_token_id)
    check_compatible(source.state_dict, model.backbone, f"checkpoint {source.path}")
    model.backbone.load_state_dict(source.state_dict)
    if source.ema is not None and model.ema is not None:
        model.ema.load_state_dict(source.ema)
        if not config.eval.disable_ema:
            model.ema.copy_to(model.backbone.parameters())
    model.ema = None  # the weights to evaluate are now in the backbone
    log.info('Loaded %s (%s weights)', source.path,
             'EMA' if source.ema is not None and not config.eval.disable_ema else 'its')
    return model


def load_for_eval(config, explicit=frozenset()):
    """(tokenizer, model) of eval.checkpoint_path for ppl_eval, sample_eval and the Python API (duo.py):
    the checkpoint's own settings put into config (configure_from), then its weights loaded."""
    source = read_source(str(config.eval.checkpoint_path))
    configure_from(config, source, explicit)
    tokenizer = dataloader.get_tokenizer(config)
    return tokenizer, load_model(config, tokenizer, source)


def start_from(model: Diffusion, source: Source, setting: str = 'training.finetune_path'):
    """Start training (not a resume) from trained weights, e.g. to distil a DUO model: the EMA
    weights of the checkpoint when it has them, else its weights. The backbone and its EMA both
    begin there; optimizer, step count and data order start afresh."""
    where = f"{setting}={source.path}"
    stored = (source.algo or {}).get('name')
    if stored and algorithms.family(stored) != model.algo.family:
        raise ConfigError(f"{where} is a checkpoint of algo={stored}, whose network does not fit algo="
                          f"{model.config.algo.name}: start from a checkpoint of the same kind")
    state_dict = source.state_dict
    check_compatible(state_dict, model.backbone, where)
    if source.ema is not None:
        names = [name for name, _ in model.backbone.named_parameters()]
        if len(names) != len(source.ema['shadow_params']):
            raise CheckpointError(f"{where}: its EMA has {len(source.ema['shadow_params'])} tensors for "
                                  f"{len(names)} parameters: the checkpoint is damaged")
        state_dict = {**state_dict, **dict(zip(names, source.ema['shadow_params']))}
        check_compatible(state_dict, model.backbone, f"{where} (its EMA)")
    model.backbone.load_state_dict(state_dict)
    if model.ema is not None:
        model.ema.shadow_params = [p.detach().clone() for p in model.backbone.parameters()]
    log.info('Initialised the weights from %s (%s weights)', source.path, 'EMA' if source.ema is not None else 'its')


def load_backbone(path, setting: str, source: Source | None = None) -> tuple[DiT, Source]:
    """The DiT of a checkpoint with its EMA weights (when it has them), sized from the checkpoint
    itself: e.g. an AR model of this project judging generative perplexity."""
    source = source or read_source(path, setting)
    if 'length' not in source.model:
        raise CheckpointError(f"{setting}={path} does not record its model length (an older checkpoint): export it "
                              f"with models.hf_format.save_hf and pass that directory")
    sizes = source.model
    model = DiT(source.vocab_size, sizes['hidden_size'], sizes['cond_dim'], sizes['n_blocks'], sizes['n_heads'],
                int(sizes['length']), causal=source.causal)
    check_compatible(source.state_dict, model, f'{setting}={path}')
    model.load_state_dict(source.state_dict)
    if source.ema is not None:
        ema = EMA(model.parameters(), 0)
        ema.load_state_dict(source.ema)
        ema.copy_to(model.parameters())
    return model, source


def check_resumable(last: Path, model: Diffusion) -> tuple[int, int]:
    """(step, batches consumed) of the run's last.ckpt, after checking that it is readable and of
    this model; an unreadable one is reported with the newest readable periodic checkpoint."""
    try:
        source = read_source(last, 'the run to resume')
    except UnsafeCheckpoint:
        raise
    except CheckpointError as e:
        readable = newest_readable(last.parent)
        fix = (f'copy the newest readable checkpoint over it (cp {readable} {last})' if readable else
               'delete it to start again')
        reason = str(e).split(' (', 1)[-1].split(');', 1)[0]
        raise CheckpointError(f'{last} cannot be read ({reason}): {fix}, or start a new run elsewhere '
                              f'(hydra.run.dir=...)') from None
    stored = (source.algo or {}).get('name')
    if stored and stored != model.config.algo.name:
        raise ConfigError(f'the run to resume ({last}) trains algo={stored} but algo={model.config.algo.name} was '
                          f'given: pass algo={stored}, or start a new run elsewhere (hydra.run.dir=...)')
    check_compatible(source.state_dict, model.backbone, f'the run to resume ({last})')
    return int(source.checkpoint.get('global_step', 0)), int(source.checkpoint.get('micro_step', 0))


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


# ---- writing -------------------------------------------------------------------------------
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


def newest_readable(directory) -> Path | None:
    """The newest periodic checkpoint of `directory` that reads back (None when there is none)."""
    for path in reversed(periodic_checkpoints(directory)):
        try:
            read_checkpoint(path, mmap=True)
        except CheckpointError:
            continue
        return path
    return None


def gigabytes(n: int) -> str:
    """A size with enough digits to tell two sizes apart (0.0312 GB, 2.53 GB)."""
    return f'{n / 1e9:.3g} GB' if n < 1e9 else f'{n / 1e9:.2f} GB'


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
        log.warning('Low disk space (%s free, %s needed for %s): deleting the oldest periodic checkpoint %s',
                    gigabytes(free), gigabytes(wanted), path.name, old)
        old.unlink(missing_ok=True)
        free = free_bytes(directory)
    if free < wanted:
        last = directory / LAST
        then = (f'run the same command again to resume from {last}' if last.exists() else
                'run the same command again')
        raise DiskFullError(
            f"not enough disk space to save {path}: it needs about {gigabytes(wanted)} and {directory} has "
            f"{gigabytes(free)} free (no older periodic checkpoint is left to delete); free some space and {then}")


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
    of space raises DiskFullError, leaving the previous file intact. Reads go through
    read_checkpoint (no code runs)."""

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

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read_checkpoint(path)


class RunLock:
    """One training process per run directory: an exclusive lock on `<directory>/.lock`, holding the
    holder's PID and host, taken before anything of the run is written.

    The kernel releases the lock when its process dies, however it dies: the lock a killed run left
    is taken over. DDP ranks that Lightning launched share their launcher's lock.
    """

    def __init__(self, directory):
        self.path = Path(directory) / '.lock'
        self.file = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (nothing else here needs one)
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, 'a+')
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or 'another process'
                f.close()
                raise RunStopped(f"{self.path.parent} is in use by {holder}: one training run per directory (two "
                                 f"would overwrite each other's checkpoints); wait for it to finish, stop it, or train "
                                 f"in another directory (hydra.run.dir=...)") from None
            # The file we locked may have been removed by the previous holder's release meanwhile.
            if os.path.exists(self.path) and os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino:
                break
            f.close()
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log.info('Taking over the lock of %s (a run that ended without releasing it)', previous)
        f.seek(0)
        f.truncate()
        f.write(f'PID {os.getpid()} on {socket.gethostname()}\n')
        f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is not None:
            self.path.unlink(missing_ok=True)
            self.file.close()
            self.file = None
