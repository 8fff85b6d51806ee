"""Runtime decisions, each made here once: accelerator and device count, precision (its spellings,
compute dtype and autocast), rank and world size, the attention backend, torch.compile support,
TF32, data-loader workers, and whether the Hugging Face hub can be reached.

Everything that asks "what does this machine / this run use?" calls these functions, so that
main.py, the Lightning module, the memory planner (hardware.py), kaggle_train.py, the setup check
and the bench scripts never disagree.
"""
import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import torch
from omegaconf import OmegaConf

from errors import ConfigError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent

# ---- precision -----------------------------------------------------------------------------
# Every spelling users type (upstream's 16 / bf16 / 32 and Lightning's names) -> Lightning's name.
PRECISIONS = {'16': '16-mixed', '16-mixed': '16-mixed', 'fp16': '16-mixed', 'bf16': 'bf16-mixed',
              'bf16-mixed': 'bf16-mixed', '32': '32-true', '32-true': '32-true', 'fp32': '32-true'}
SHORT = {'16-mixed': '16', 'bf16-mixed': 'bf16', '32-true': '32'}  # Lightning's name -> upstream's
_DTYPES = {'16-mixed': torch.float16, 'bf16-mixed': torch.bfloat16}


def auto_precision(capability: tuple | None) -> str:
    """bf16 mixed precision on compute capability >= 8.0, fp16 mixed precision (with loss scaling)
    on older GPUs, which have no bf16, fp32 on the CPU (capability None)."""
    if capability is None:
        return '32-true'
    return 'bf16-mixed' if tuple(capability) >= (8, 0) else '16-mixed'


def resolve_precision(precision, accelerator: str) -> str:
    """trainer.precision ('auto' or any spelling of PRECISIONS) -> Lightning's name, checked
    against the device (fp16 on the CPU falls back to fp32 with a warning)."""
    precision = str(precision)
    gpu = accelerator == 'gpu'
    if precision == 'auto':
        return auto_precision(torch.cuda.get_device_capability() if gpu else None)
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported: use one of 16, bf16, 32 or auto "
                          f"(e.g. trainer.precision=bf16)")
    resolved = PRECISIONS[precision]
    if not gpu and resolved == '16-mixed':
        log.warning('trainer.precision=%s (fp16 mixed precision) needs a GPU; using 32 on the CPU', precision)
        return '32-true'
    if gpu and resolved == 'bf16-mixed' and torch.cuda.get_device_capability() < (8, 0):
        capability = '.'.join(map(str, torch.cuda.get_device_capability()))
        raise ConfigError(f"trainer.precision={precision} needs an Ampere or newer GPU (this "
                          f"{torch.cuda.get_device_name()} has compute capability {capability}): use trainer.precision=16")
    return resolved


def precision_dtype(precision) -> torch.dtype | None:
    """The autocast dtype of a precision (any spelling), None for fp32."""
    return _DTYPES.get(PRECISIONS.get(str(precision), str(precision)))


def is_half(precision) -> bool:
    return precision_dtype(precision) is not None


def autocast(device_type: str, precision):
    """The autocast context Lightning's precision plugin gives a training step, for code that runs
    steps itself (the GPU probe, the setup check, the bench scripts)."""
    dtype = precision_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


# ---- devices and processes -----------------------------------------------------------------
def resolve_accelerator(accelerator) -> str:
    """trainer.accelerator (auto | gpu | cuda | cpu) -> 'gpu' or 'cpu'."""
    acc = str(accelerator)
    if acc == 'auto':
        return 'gpu' if torch.cuda.is_available() else 'cpu'
    if acc in ('gpu', 'cuda') and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={acc} but no CUDA GPU is visible: use trainer.accelerator=cpu")
    return 'gpu' if acc == 'cuda' else acc


def device_count(devices, accelerator: str) -> int:
    """Processes per node for trainer.devices (auto / -1, a count, '0,1' or a list of ids)."""
    if devices in ('auto', -1, '-1', None):
        return max(torch.cuda.device_count(), 1) if accelerator == 'gpu' else 1
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return max(len(devices), 1)
    if isinstance(devices, str) and ',' in devices:
        return len([d for d in devices.split(',') if d.strip()])
    return max(int(devices), 1)


def world_size(trainer_config) -> int:
    """Processes of the whole run: devices per node x nodes."""
    accelerator = resolve_accelerator(trainer_config.get('accelerator', 'auto'))
    return device_count(trainer_config.get('devices', 'auto'), accelerator) * int(trainer_config.get('num_nodes', 1))


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size (DDP starts inside trainer.fit: ask when needed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_launched_rank() -> bool:
    """A DDP process that Lightning's launcher started for rank > 0 of this node (it shares the
    run of the process that launched it)."""
    return int(os.environ.get('LOCAL_RANK', '0') or 0) > 0


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_num_workers(trainer_config) -> int:
    """Loader processes per training process: up to 4, within this process's share of the CPUs
    (one CPU is the training process itself)."""
    accelerator = str(trainer_config.get('accelerator', 'cpu'))
    per_node = device_count(trainer_config.get('devices', 1), 'gpu' if accelerator == 'gpu' else 'cpu')
    return max(0, min(4, cpus() // per_node - 1))


# Logits (sequences x length x K elements) of one forward pass outside training: validation and
# sampling split their batches into blocks of at most this many, so a large evaluation batch never
# runs out of memory (1 GiB of float32 on a GPU, 256 MiB on the CPU).
LOGIT_ELEMENTS = {'cpu': 1 << 26, 'cuda': 1 << 28}


def sequences_per_block(device_type: str, length: int, vocab_size: int) -> int:
    """Sequences of `length` whose logits fit one block (at least one)."""
    return max(1, LOGIT_ELEMENTS.get(device_type, LOGIT_ELEMENTS['cuda']) // (length * vocab_size))


# ---- attention, compile, TF32 --------------------------------------------------------------
ATTN_BACKENDS = ('auto', 'flash', 'sdpa')


@functools.cache
def flash_attn_importable() -> bool:
    try:
        import flash_attn  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a wheel built for another CUDA/torch fails late
        return False
    return True


def auto_attn_backend(capability: tuple | None, flash_attn: bool) -> str:
    """'flash' where models/dit.py can use FlashAttention (flash_attn imports, compute capability
    >= 8.0), else PyTorch SDPA."""
    return 'flash' if flash_attn and capability is not None and tuple(capability) >= (8, 0) else 'sdpa'


def detect_attn_backend() -> str:
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return auto_attn_backend(capability, capability is not None and flash_attn_importable())


def resolve_attn_backend(name: str) -> str:
    """model.attn_backend ('auto' | 'flash' | 'sdpa') -> the backend a model uses on this machine."""
    if name not in ATTN_BACKENDS:
        raise ConfigError(f"model.attn_backend={name} is not one of {', '.join(ATTN_BACKENDS)}; "
                          "e.g. model.attn_backend=auto")
    detected = detect_attn_backend()
    if name == 'auto':
        return detected
    if name == 'flash' and detected != 'flash':
        raise ConfigError('model.attn_backend=flash needs FlashAttention (flash_attn) on a CUDA GPU '
                          'with compute capability >= 8.0, which this machine lacks; '
                          'use model.attn_backend=sdpa')
    return name


def compile_unsupported(accelerator: str) -> str | None:
    """Why torch.compile cannot run for this accelerator (None when it can): Inductor needs a
    C++ compiler on the CPU and Triton with compute capability >= 7.0 on CUDA GPUs."""
    if accelerator != 'cpu' and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        if capability < (7, 0):
            return f"{torch.cuda.get_device_name()} has compute capability {'.'.join(map(str, capability))} (< 7.0)"
        if importlib.util.find_spec('triton') is None:
            return 'Triton is not installed'
        return None
    if not any(shutil.which(c) for c in (os.environ.get('CXX', 'g++'), 'g++', 'clang++') if c):
        return 'no C++ compiler (g++ or clang++) for the CPU'
    return None


def allow_tf32():
    """float32 matmuls and convolutions in TF32 on Ampere or newer GPUs (10-bit mantissa inputs,
    float32 accumulation: several times faster; mixed precision does not use them)."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---- model sizes ---------------------------------------------------------------------------
def model_sizes() -> dict[str, dict]:
    """{name: sizes} of configs/model/*.yaml (hidden_size, cond_dim, n_blocks, n_heads, dropout)."""
    sizes = {}
    for path in sorted((ROOT / 'configs' / 'model').glob('*.yaml')):
        m = OmegaConf.load(path)
        sizes[path.stem] = {k: m[k] for k in ('hidden_size', 'cond_dim', 'n_blocks', 'n_heads', 'dropout')}
    return sizes


# ---- the Hugging Face hub ------------------------------------------------------------------
HUB_OFFLINE_VARIABLES = ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE', 'TRANSFORMERS_OFFLINE')


def hub_offline() -> bool:
    return any(os.environ.get(v, '').lower() in ('1', 'true', 'yes') for v in HUB_OFFLINE_VARIABLES)


@functools.cache
def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers (asked once per process; False when the offline
    variables are set). Without internet the libraries retry each file for a minute or more."""
    if hub_offline():
        return False
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')
    try:
        urllib.request.urlopen(f'{endpoint}/api/models/gpt2', timeout=timeout).close()
    except OSError:
        return False
    return True


def go_offline_if_unreachable() -> bool:
    """When the hub cannot be reached, set the offline variables for this process (and its
    children) so that every later hub call fails at once; True when offline."""
    if hub_offline():
        return True
    if hub_reachable():
        return False
    log.warning('The Hugging Face hub is unreachable: running offline (local files and caches only)')
    for variable in HUB_OFFLINE_VARIABLES:
        os.environ[variable] = '1'
    # The libraries read the variables when imported (Lightning imports huggingface_hub): tell the
    # ones already loaded too. transformers asks huggingface_hub at every call.
    for module, names in (('huggingface_hub.constants', ('HF_HUB_OFFLINE',)),
                          ('datasets.config', ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'))):
        if module in sys.modules:
            for name in names:
                setattr(sys.modules[module], name, True)
    return True
