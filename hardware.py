"""Hardware planning for a training run: device, precision, attention backend and batch size.

Pure decisions (no CUDA is touched here except by `detect()`), so that a plan can be made for a
machine one does not have (`--assume-gpu t4x2` in kaggle_train.py) and tested on a CPU:

- `precision_for(device)`, `attn_backend_for(device)`: runtime.py's decisions (precision,
  attention backend) for a device, simulated or not.
- `train_step_bytes(...)`: an analytic peak-memory model of one training step of the DiT
  (parameters, gradients, AdamW, EMA, activations, logits and the loss's float32 temporaries);
  `plan_batch(...)`: the largest per-device batch whose estimate fits the memory budget, and the
  gradient accumulation that reaches the global batch.

`python hardware.py` prints the detected device as JSON (kaggle_train.py runs it in a child
process so that the parent never holds a CUDA context while main.py trains);
`python hardware.py --table` prints the per-device batch table of KAGGLE_SETUP.md.
"""
import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field

import runtime
from models import dit

GIB = 1024 ** 3
MIB = 1024 ** 2

# Memory that PyTorch's allocator never sees: the CUDA context, cuBLAS/cuDNN workspaces and
# kernels (about 0.3-0.5 GiB on recent drivers); NCCL's buffers come on top with DDP.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
NCCL_BYTES = int(0.25 * GIB)
# The estimate must fit in this fraction of what is left: the caching allocator fragments, and
# the model below leaves out small tensors (masks, time embeddings, norms' statistics).
BUDGET_FRACTION = 0.90


@dataclass(frozen=True)
class Device:
    """The devices one run trains on: `count` identical GPUs, or the CPU."""
    kind: str                      # 'cuda' | 'cpu'
    name: str
    memory_bytes: int              # per device (GPU total memory; CPU: available RAM)
    capability: tuple | None = None  # (major, minor) for CUDA
    count: int = 1
    flash_attn: bool = False       # flash_attn imports in this environment
    simulated: bool = False

    @property
    def is_gpu(self) -> bool:
        return self.kind == 'cuda'

    def describe(self) -> str:
        if not self.is_gpu:
            return f'CPU ({self.memory_bytes / GIB:.1f} GiB RAM available)'
        cc = '.'.join(map(str, self.capability))
        many = f'{self.count} x ' if self.count > 1 else ''
        return f'{many}{self.name} (compute capability {cc}, {self.memory_bytes / GIB:.2f} GiB each)'


# Simulated GPUs; memory is what torch reports as total capacity on them (e.g. in OOM messages).
PRESETS = {
    't4': ('Tesla T4', (7, 5), 14.75),
    'p100': ('Tesla P100-PCIE-16GB', (6, 0), 15.89),
    'a100-40': ('NVIDIA A100-SXM4-40GB', (8, 0), 39.39),
    'a100-80': ('NVIDIA A100-SXM4-80GB', (8, 0), 79.15),
    'h100': ('NVIDIA H100 80GB HBM3', (9, 0), 79.11),
}


def preset(spec: str, flash_attn: bool = False) -> Device:
    """'t4', 't4x2', 'a100-80', 'h100x8', 'cpu' -> a simulated Device."""
    m = re.fullmatch(r'(?P<name>[a-z0-9-]+?)(?:x(?P<count>[1-9][0-9]*))?', spec.lower().strip())
    if m and m['name'] == 'cpu' and not m['count']:
        return Device('cpu', 'CPU', 16 * GIB, simulated=True)
    if not m or m['name'] not in PRESETS:
        raise ValueError(f"--assume-gpu={spec} is unknown: use one of {', '.join(PRESETS)} or cpu, "
                         f"optionally with a count (e.g. --assume-gpu t4x2)")
    gpu, cc, gib = PRESETS[m['name']]
    return Device('cuda', gpu, int(gib * GIB), cc, int(m['count'] or 1), flash_attn and cc >= (8, 0), simulated=True)


def detect() -> Device:
    """The GPUs of this machine (all of them, assumed identical), else the CPU.

    Initialises CUDA in this process: call it in a child process when a later process of the
    same machine needs all of the GPU memory.
    """
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(0)
        return Device('cuda', props.name, int(props.total_memory), (props.major, props.minor),
                      torch.cuda.device_count(), runtime.flash_attn_importable())
    return Device('cpu', 'CPU', available_ram())


def available_ram() -> int:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


# ---- precision and attention ---------------------------------------------------------------
def precision_for(device: Device) -> str:
    """main.py's trainer.precision for the device, as upstream spells it: 'bf16', '16' or '32'."""
    return runtime.SHORT[runtime.auto_precision(device.capability if device.is_gpu else None)]


def precision_reason(device: Device) -> str:
    p = precision_for(device)
    cc = '.'.join(map(str, device.capability or ()))
    return {'32': 'fp32 (the CPU has no fast half precision)',
            'bf16': f'bf16 mixed precision (compute capability {cc} >= 8.0; no loss scaling needed)',
            '16': f'fp16 mixed precision with loss scaling (compute capability {cc} < 8.0 has no bf16)'}[p]


def attn_backend_for(device: Device) -> str:
    return runtime.auto_attn_backend(device.capability if device.is_gpu else None, device.flash_attn)


def attn_reason(device: Device) -> str:
    if attn_backend_for(device) == 'flash':
        return 'FlashAttention (flash_attn imports, compute capability >= 8.0)'
    if not device.is_gpu:
        return 'PyTorch SDPA (CPU)'
    if device.capability < (8, 0):
        return 'PyTorch SDPA (FlashAttention needs compute capability >= 8.0)'
    return 'PyTorch SDPA (flash_attn is not installed)'


# ---- the model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the memory of a DiT training step depends on (configs/model/*.yaml, the vocabulary K)."""
    hidden_size: int
    cond_dim: int
    n_blocks: int
    n_heads: int
    length: int
    vocab_size: int
    dropout: float = 0.0
    causal: bool = False   # algo=ar: no sigma_map, no adaLN

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int, algo: str) -> 'ModelShape':
        return cls(int(model_cfg.hidden_size), int(model_cfg.cond_dim), int(model_cfg.n_blocks),
                   int(model_cfg.n_heads), int(model_cfg.length), int(vocab_size),
                   float(model_cfg.dropout), algo == 'ar')


def param_counts(s: ModelShape) -> dict:
    """Parameters of models/dit.DiT by kind (SPEC §8 layout).

    'embedding': the raw vocabulary embedding (looked up, never cast by autocast);
    'norms': LayerNorm weights (computed in float32); 'matmul': every nn.Linear weight and bias
    (autocast keeps a half-precision copy of these for backward).
    """
    d, c, K = s.hidden_size, s.cond_dim, s.vocab_size
    block = 3 * d * d + d * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # qkv, attn_out, mlp.0, mlp.2
    final = d * K + K
    if not s.causal:
        block += c * 6 * d + 6 * d                                      # adaLN_modulation
        final += c * 2 * d + 2 * d
    sigma_map = 0 if s.causal else dit.SIGMA_FEATURES * c + c + c * c + c
    return {'embedding': K * d, 'norms': s.n_blocks * 2 * d + d,
            'matmul': s.n_blocks * block + final + sigma_map}


def param_count(s: ModelShape) -> int:
    return sum(param_counts(s).values())


def block_activation_bytes(s: ModelShape, half: bool, mask_bytes: int = 1) -> int:
    """Bytes per token that autograd keeps for one DiT block until backward.

    Counted tensor by tensor (verified against torch.autograd.graph.saved_tensors_hooks on the
    CPU): the residual stream is float32 (the embedding is float32 and LayerNorm returns its
    input dtype), LayerNorm keeps its float32 input and its normalised output (for the weight's
    gradient), modulate keeps its float32 input; under autocast every Linear keeps a half-precision
    copy of its input; attention keeps q, k (one rotated buffer), the whole qkv output (v is a view
    of it) and its output, never the (L, L) scores (SDPA's fused kernels, FlashAttention); GELU and
    mlp.2 keep the (L, 4d) hidden state; dropout keeps a mask of `mask_bytes` per element (bool on
    CUDA, the input dtype on the CPU) and the gates keep the branch output.
    """
    d, h = s.hidden_size, 2 if half else 4
    adaln = not s.causal
    drop = s.dropout > 0
    per_d = 4 + 4                          # norm1: input x, normalised output
    per_d += 4 if adaln else 0             # modulate(norm1) input
    per_d += h                             # attn_qkv input (a half copy; in float32 the fresh product)
    per_d += 2 * h + 3 * h + h             # rotated q, k; qkv (v is a view); attention output
    per_d += mask_bytes if drop else 0     # dropout(attn_out)
    per_d += h if adaln else 0             # gate_attn * branch keeps the branch
    per_d += 4 + 4                         # norm2: input x, normalised output
    per_d += 4 if adaln else 0             # modulate(norm2) input
    per_d += h                             # mlp.0 input
    per_d += 4 * h + 4 * h                 # GELU input, mlp.2 input (4d each)
    per_d += mask_bytes if drop else 0
    per_d += h if adaln else 0
    return per_d * d


def final_layer_bytes(s: ModelShape, half: bool) -> int:
    """Bytes per token kept by the output layer before the logits (norm, modulate, cast input)."""
    d, h = s.hidden_size, 2 if half else 4
    per_d = 4 + 4 + (4 if not s.causal else 0) + h
    return per_d * d


# (B, L, K) tensors in the compute dtype alive at the peak of the loss's backward, and float32
# (block rows, K) temporaries of the losses' blocked kernels (losses.py) alive with them. Fitted
# to the CPU profiler's memory timeline at two batch sizes (bf16 autocast, K = 8000; within 1%
# for DUO and MDLM, 3% for AR): the losses write the gradient into the logits' memory
# (reuse_logits), so what remains is the logits, the output layer's input-gradient product and
# one cast copy; the blocked kernels keep at most two row blocks alive. The distillation KL
# (not re-measured since) is counted as before: three buffers and seven blocks. SEDD is MDLM's
# step with another loss of the same kernel. D3PM runs the network twice (the noisy sequence,
# then the clean one for the reconstruction term) and both graphs live until backward: its
# activations count twice (train_step_bytes) and the second pass's logits add one buffer.
LOGIT_BUFFERS = {'duo': 3, 'duo_base': 3, 'mdlm': 3, 'sedd': 3, 'd3pm': 4, 'ar': 3, 'distillation': 3}
LOSS_CHUNK_BUFFERS = {'duo': 2, 'duo_base': 2, 'mdlm': 1, 'sedd': 1, 'd3pm': 1, 'ar': 1, 'distillation': 7}
FORWARD_PASSES = {'d3pm': 2}  # network passes per training step whose activations live until backward (1 else)


@dataclass
class MemoryEstimate:
    total: int
    parts: dict = field(default_factory=dict)

    def describe(self) -> str:
        return ', '.join(f'{k} {v / GIB:.2f}' for k, v in self.parts.items() if v) + ' (GiB)'


def _chunk_rows(K: int, device: str = 'cuda') -> int:
    """Rows per block of the losses' fused kernels on `device` (losses.block_rows)."""
    import losses
    import torch
    return losses.block_rows(K, torch.device(device))


def train_step_bytes(s: ModelShape, batch: int, precision: str, algo: str, world: int = 1,
                     ema: bool = True, mask_bytes: int = 1, device: str = 'cuda',
                     top_k: int | None = None) -> MemoryEstimate:
    """Peak bytes on one device for a training step with `batch` sequences of `s.length` tokens.

    Assumptions (see also block_activation_bytes):
    - states: float32 parameters, gradients (kept across accumulation steps), AdamW's two moments
      and the EMA copy = 20 bytes per parameter (16 without EMA); the distillation teacher adds a
      float32 copy; DDP adds its gradient buckets (a float32 copy of the gradients).
    - under mixed precision autocast keeps a half copy of every Linear weight for backward.
    - the peak is in the loss's backward pass: every activation is alive, plus the (B, L, K)
      buffers of LOGIT_BUFFERS in the compute dtype, the loss's float32 block temporaries (block
      rows of `device`) and the output layer's weight gradient in the compute dtype.
    - algo=duo (curriculum, algo.curriculum.mode=simple) also keeps its relaxed one-hot input
      (B, L, K) float32 for the embedding's gradient; with `top_k` (the Duo++ top-k modes) the input
      is k ids (int64) and k float32 weights per token instead, whatever K; distillation keeps the
      teacher's logits; d3pm keeps the activations of its second (clean-sequence) pass.
    - the optimizer step's peak (states plus one float32 temporary per parameter in foreach
      AdamW) is compared too; attention never materialises (L, L) scores.
    """
    half = runtime.is_half(precision)
    h = 2 if half else 4
    counts = param_counts(s)
    P = sum(counts.values())
    K, tokens = s.vocab_size, batch * s.length
    states = (16 + (4 if ema else 0)) * P
    if algo == 'distillation':
        states += 4 * P
    if world > 1:
        states += 4 * P
    parts = {'states': states,
             'weight copies': h * counts['matmul'] if half else 0,
             'activations': FORWARD_PASSES.get(algo, 1) * tokens * (
                 s.n_blocks * block_activation_bytes(s, half, mask_bytes) + final_layer_bytes(s, half) + 8),
             'logits+grads': LOGIT_BUFFERS.get(algo, 4) * h * K * tokens + h * K * s.hidden_size,
             'loss temporaries': LOSS_CHUNK_BUFFERS.get(algo, 7) * 4 * K * min(tokens, _chunk_rows(K, device))}
    if algo == 'duo':
        parts.update(curriculum_input_bytes(K, tokens, top_k))
    elif algo == 'distillation':
        parts['teacher logits'] = h * K * tokens
    backward = sum(parts.values())
    optimizer = states + 4 * P
    return MemoryEstimate(max(backward, optimizer), parts)


def curriculum_input_bytes(vocab_size: int, tokens: int, top_k: int | None) -> dict:
    """The DUO curriculum's network input kept for backward: {part: bytes}. mode=simple: the relaxed
    one-hot (B, L, K) float32; the top-k modes (top_k = k): ids int64 and weights float32, (B, L, k) each."""
    if top_k is None:
        return {'relaxed input': 4 * vocab_size * tokens}
    return {'top-k input': (8 + 4) * top_k * tokens}


def eval_step_bytes(s: ModelShape, batch: int, precision: str, algo: str, ema: bool = True,
                    top_k: int | None = None) -> MemoryEstimate:
    """Peak bytes of a validation step inside training: the training states plus the EMA swap's
    backup copy, the logits, the loss's forward chunk temporaries and one block's transients."""
    half = runtime.is_half(precision)
    h = 2 if half else 4
    P = param_count(s)
    tokens = batch * s.length
    parts = {'states': (16 + (8 if ema else 0)) * P,
             'logits': h * s.vocab_size * tokens,
             'loss temporaries': 3 * 4 * s.vocab_size * min(tokens, _chunk_rows(s.vocab_size)),
             'block transients': tokens * block_activation_bytes(s, half)}
    if algo == 'duo':
        parts.update(curriculum_input_bytes(s.vocab_size, tokens, top_k))
    return MemoryEstimate(sum(parts.values()), parts)


def sample_bytes(s: ModelShape, batch: int) -> int:
    """Peak bytes of main.py's sample_eval (float32 weights, no autocast): float32 logits of the
    batch, the sampler's float64 chunk temporaries (samplers.CHUNK_ELEMENTS = 2^24 elements, a
    few at once) and one block's transients."""
    tokens = batch * s.length
    return 4 * param_count(s) + tokens * (2 * 4 * s.vocab_size + block_activation_bytes(s, False)) + 3 * 8 * 2 ** 24


# ---- batch planning ------------------------------------------------------------------------
def memory_budget(device: Device) -> int:
    """Bytes per device the estimate may use."""
    if not device.is_gpu:
        return int(device.memory_bytes * 0.5)  # the CPU shares RAM with the data loader workers
    overhead = CUDA_CONTEXT_BYTES + (NCCL_BYTES if device.count > 1 else 0)
    return int((device.memory_bytes - overhead) * BUDGET_FRACTION)


@dataclass
class BatchPlan:
    batch_size: int          # per device
    accumulation: int
    global_batch_size: int
    world: int
    estimate: MemoryEstimate
    budget: int
    eval_batch_size: int
    fits: bool
    note: str = ''


class PlanError(ValueError):
    """No batch fits; the message names the settings to change."""


def divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)})


def plan_batch(device: Device, s: ModelShape, algo: str, precision: str, global_batch: int,
               batch_size: int | None = None, ema: bool = True, top_k: int | None = None) -> BatchPlan:
    """The largest per-device batch (a divisor of global_batch / devices) whose estimated peak
    fits the budget, or the given batch_size checked against it; accumulation reaches the
    global batch exactly. top_k: algo=duo's top-k curriculum (None: mode=simple)."""
    world = device.count if device.is_gpu else 1
    if global_batch < 1:
        raise PlanError(f'--global-batch-size={global_batch} must be >= 1 (e.g. --global-batch-size=64)')
    if global_batch % world:
        raise PlanError(f'--global-batch-size={global_batch} is not divisible by the {world} devices: '
                        f'use e.g. --global-batch-size={world * max(global_batch // world, 1)}')
    per_device = global_batch // world
    budget = memory_budget(device)
    mask_bytes = 1 if device.is_gpu else (2 if runtime.is_half(precision) else 4)

    def estimate(b):
        return train_step_bytes(s, b, precision, algo, world, ema, mask_bytes, top_k=top_k)

    if batch_size is not None:
        if batch_size < 1 or per_device % batch_size:
            raise PlanError(f'--batch-size={batch_size} must divide the per-device share {per_device} of '
                            f'--global-batch-size={global_batch}: use one of {divisors(per_device)}')
        est = estimate(batch_size)
        fits = est.total <= budget
        note = '' if fits else 'the estimate exceeds the budget: expect an out-of-memory error'
        chosen = batch_size
    else:
        fitting = [b for b in divisors(per_device) if estimate(b).total <= budget]
        if not fitting:
            est = estimate(1)
            raise PlanError(
                f'model {s.hidden_size}d x {s.n_blocks} blocks at length {s.length} needs about '
                f'{est.total / GIB:.1f} GiB per device even with batch 1 ({est.describe()}), over the '
                f'{budget / GIB:.1f} GiB budget of {device.describe()}: use a smaller --model or --length'
                + (', or one GPU (DDP adds a gradient copy)' if world > 1 else ''))
        chosen, fits, note = fitting[-1], True, ''
        est = estimate(chosen)
    eval_batch = chosen
    while eval_batch > 1 and eval_step_bytes(s, eval_batch, precision, algo, ema, top_k).total > budget:
        eval_batch //= 2
    return BatchPlan(chosen, per_device // chosen, global_batch, world, est, budget, eval_batch, fits, note)


def smaller_batch(batch: int, per_device: int) -> int | None:
    """The largest divisor of per_device that is at most half of batch (None below 1): the next
    batch to try after an out-of-memory error."""
    options = [d for d in divisors(per_device) if d <= batch // 2]
    return options[-1] if options else None


def sample_batch_for(device: Device, s: ModelShape, n_samples: int) -> int:
    """Sequences per sample_eval batch: as many of n_samples as fit in the device's memory."""
    budget = memory_budget(device)
    b = max(n_samples, 1)
    while b > 1 and sample_bytes(s, b) > budget:
        b = (b + 1) // 2
    return b


# ---- the table of KAGGLE_SETUP.md ----------------------------------------------------------
MODEL_SIZES = {name: sizes for name, sizes in runtime.model_sizes().items() if name != 'micro'}  # GPU sizes
GPT2_VOCAB = 50258  # GPT-2's 50257 ids + [MASK] (SPEC §1)


def batch_table(devices=('t4', 't4x2', 'p100', 'a100-40', 'a100-80', 'h100'), lengths=(512, 1024),
                algo='duo_base', global_batch=512) -> str:
    """Markdown table: largest per-device batch (estimated peak GiB) per GPU, model and length."""
    header = '| GPU | precision | ' + ' | '.join(f'{m} L={L}' for m in MODEL_SIZES for L in lengths) + ' |'
    rows = [header, '|' + '---|' * (2 + len(MODEL_SIZES) * len(lengths))]
    for spec in devices:
        dev = preset(spec)
        cells = []
        for m, dims in MODEL_SIZES.items():
            for L in lengths:
                s = ModelShape(length=L, vocab_size=GPT2_VOCAB, **dims)
                try:
                    p = plan_batch(dev, s, algo, precision_for(dev), global_batch)
                    cells.append(f'{p.batch_size} ({p.estimate.total / GIB:.1f})')
                except PlanError:
                    cells.append('does not fit')
        rows.append(f'| {dev.describe()} | {precision_for(dev)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--table', action='store_true', help='print the per-device batch table (markdown)')
    parser.add_argument('--algo', default='duo_base')
    args = parser.parse_args(argv)
    if args.table:
        print(batch_table(algo=args.algo))
        return
    device = detect()
    print(json.dumps(asdict(device)))


if __name__ == '__main__':
    sys.exit(main())
