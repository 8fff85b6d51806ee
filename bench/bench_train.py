"""Training throughput and peak memory per algorithm: ours against an in-run upstream-style reference.

A step is one optimizer step as training runs it (diffusion.StepRunner, the step API Lightning's
hooks call too): forward + loss, backward, gradient clipping (optim.grad_clip), the non-finite
check, AdamW + LR-scheduler step, EMA update. `ours` is diffusion.Diffusion. `reference` runs
the same DiT through the same loop with upstream-style code written from SPEC §4-§5: the losses materialise
log-softmax / softmax / one-hot (B, L, K) tensors, the curriculum builds w from an int64
one-hot and takes a full softmax, AdamW uses torch's device default and the EMA loops over
tensors. Each (algorithm, implementation) runs in a fresh subprocess, repeats are interleaved
and medians reported, so ratios come from one machine in one run.

Memory: CPU = peak RSS rise over the RSS just before the first step (VmHWM reset through
/proc/self/clear_refs); CUDA = torch.cuda.max_memory_allocated over the allocation before the
first step. Both include what the first step creates for good (gradients, AdamW moments).

    python bench/bench_train.py --preset upstream               # the issue's CPU configuration
    python bench/bench_train.py --algos duo_base duo --repeats 5
    python bench/bench_train.py --preset gpu-small --precision bf16-mixed --fit-budget-gb 16
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# duo: the curriculum with the full relaxed input (algo.curriculum.mode=simple); duo-topk: algo=duo with the
# Duo++ top-k input and the fitted operator (algo.curriculum.mode=poly9, algo.curriculum.top_k=--top-k).
ALGOS = ('ar', 'mdlm', 'sedd', 'd3pm', 'duo_base', 'duo', 'duo-topk', 'distillation')
DEFAULT_ALGOS = ('ar', 'mdlm', 'duo_base', 'duo', 'duo-topk')
NO_REFERENCE = ('duo-topk',)  # upstream's top-k code has the bugs of SPEC-2 §14: no reference written from it
IMPLS = ('ours', 'reference')

PRESETS = {
    # The issue's measurement (2-core CPU, fp32): small DiT, batch 8, length 256, GPT-2 vocabulary.
    'upstream': dict(hidden=256, blocks=4, heads=4, cond=128, batch=8, length=256, vocab=50258,
                     precision='32'),
    # model=small at its paper context, one GPU.
    'gpu-small': dict(hidden=768, blocks=12, heads=12, cond=128, batch=32, length=1024, vocab=50258,
                      precision='bf16-mixed'),
}
# Upstream's figures from the issue (tokens/s, peak RSS rise in GB) for --preset upstream on its CPU.
ISSUE_TABLE = {'ar': (700, 1.8), 'mdlm': (460, 2.7), 'duo_base': (480, 2.6), 'duo': (185, 4.7)}
# Dense bf16 tensor-core peak (TFLOPS, no sparsity) by device name fragment; first match wins.
PEAK_BF16_TFLOPS = (('H200', 989.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('A100', 312.0),
                    ('L40S', 362.0), ('L4', 121.0), ('A10', 125.0), ('T4', 65.0), ('V100', 125.0))
# Transparent huge pages for torch's large CPU allocations (2 MB pages: far fewer page faults).
# Neither main.py nor upstream sets it (on this machine it did not help): off unless --thp asks.
OURS_ENV = {'THP_MEM_ALLOC_ENABLE': '1'}


# ============================================================================ worker (one process per run)

def _proc_status_kb(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} missing from /proc/self/status')


class MemoryProbe:
    """Peak memory rise over the moment of `start()`: RSS (CPU) or allocated bytes (CUDA)."""

    def __init__(self, device):
        self.device = device

    def start(self):
        import torch
        if self.device.type == 'cuda':
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open('/proc/self/clear_refs', 'w') as f:  # VmHWM := VmRSS
                f.write('5')
            self.base = _proc_status_kb('VmRSS') * 1024

    def peak_rise(self):
        import torch
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kb('VmHWM') * 1024 - self.base

    def peak_total(self):
        import torch
        if self.device.type == 'cuda':
            return torch.cuda.max_memory_allocated()
        return _proc_status_kb('VmHWM') * 1024


def compose_config(spec):
    from hydra import compose, initialize_config_dir
    algo = 'duo' if spec['algo'] == 'duo-topk' else spec['algo']
    overrides = [f"algo={algo}", 'model=tiny', f"model.hidden_size={spec['hidden']}",
                 f"model.cond_dim={spec['cond']}", f"model.n_blocks={spec['blocks']}",
                 f"model.n_heads={spec['heads']}", f"model.length={spec['length']}",
                 f"model.dropout={spec['dropout']}", f"model.compile={str(spec['compile']).lower()}"]
    if algo == 'duo':  # a fixed temperature, inside the curriculum
        tau = spec['tau_log10']
        overrides += [f'algo.gumbel_tau_log10_start={tau}', f'algo.gumbel_tau_log10_end={tau}',
                      'algo.curriculum_start=0', 'algo.curriculum_end=1000000000']
    if spec['algo'] == 'duo-topk':
        overrides += ['algo.curriculum.mode=poly9', f"algo.curriculum.top_k={spec['top_k']}"]
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=overrides)


class Reference:
    """Upstream-style training pieces (SPEC §4-§5 written the materialising way)."""
    NEG = -1e6  # upstream's "neg_infinity"

    def __init__(self, module):
        import torch
        self.torch, self.module, self.algo = torch, module, module.algo
        self.K = module.vocab_size
        self.device = module.device

    def train_step(self, batch, step):
        """The module's step API with this loss: the same seeding and per-batch hook, then the mean."""
        self.module.begin_batch(step)
        per_token, weight = self.loss(batch, step, first=self.module.micro_step == 1)
        weight = weight.to(per_token.dtype)
        return (per_token * weight).sum() / weight.sum()

    def loss(self, batch, step, first):
        torch, algo, module = self.torch, self.algo, self.module
        x0, mask = batch['input_ids'], batch['attention_mask']
        t = module._times(x0.shape[0])
        name = module.config.algo.name
        if name == 'ar':
            logits = module.backbone(x0, attention_mask=mask)
            logits[:, :, module.mask_id] = self.NEG
            log_p = logits.log_softmax(-1)
            return -log_p[:, :-1].gather(-1, x0[:, 1:, None])[..., 0], mask[:, 1:]
        if name == 'mdlm':
            alpha, dalpha = algo.schedule.alpha(t)[:, None], algo.schedule.dalpha(t)[:, None]
            xt = torch.where(torch.rand(x0.shape, device=x0.device) < 1 - alpha, module.mask_id, x0)
            logits = module.backbone(xt, algo.sigma(alpha), attention_mask=mask)
            logits[:, :, module.mask_id] += self.NEG
            log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            unmasked = xt != module.mask_id
            log_p[unmasked] = self.NEG                   # SUBS: unmasked positions copy their input
            log_p[unmasked, xt[unmasked]] = 0
            return dalpha / (1 - alpha) * log_p.gather(-1, x0[..., None])[..., 0], mask
        if name == 'sedd':
            return self._sedd(x0, mask, t), mask
        if name == 'd3pm':
            return self._d3pm(x0, mask, t), mask
        if name == 'distillation':
            return self._distillation(x0, mask, t, step, first)
        if name == 'duo' and algo.in_curriculum(step):
            alpha, dalpha = algo.curriculum.alpha(t)[:, None], algo.curriculum.dalpha(t)[:, None]
            gamma = algo.curriculum.gamma(t)[:, None, None]
            one_hot = torch.nn.functional.one_hot(x0, self.K)  # int64, as upstream
            w = torch.sigmoid(-gamma).sqrt() * one_hot + torch.sigmoid(gamma).sqrt() * self.noise(one_hot.shape, first)
            w = w * (1 / algo.tau(step))
            xt = w.argmax(-1)
            logits = module.backbone(w.softmax(-1).float(), algo.sigma(alpha), attention_mask=mask)
        else:
            alpha, dalpha = algo.schedule.alpha(t)[:, None], algo.schedule.dalpha(t)[:, None]
            xt = algo.corrupt(x0, alpha)
            logits = module.backbone(xt, algo.sigma(alpha), attention_mask=mask)
        return self.duo_loss(logits.log_softmax(-1), x0, xt, alpha, dalpha), mask

    def _sedd(self, x0, mask, t):
        """Upstream's SEDDAbsorb: the (B, L, K) log score, then pos - neg + const at masked positions."""
        torch, algo, module, K = self.torch, self.algo, self.module, self.K
        alpha, dalpha = algo.schedule.alpha(t)[:, None], algo.schedule.dalpha(t)[:, None]
        xt = torch.where(torch.rand(x0.shape, device=x0.device) < 1 - alpha, module.mask_id, x0)
        sigma = algo.sigma(alpha)
        logits = module.backbone(xt, sigma, attention_mask=mask)
        esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(logits.dtype)
        log_score = logits - esigm1_log[:, None, None] - math.log(K - 1)
        log_score = torch.scatter(log_score, -1, xt[..., None], torch.zeros_like(log_score[..., :1]))
        masked = xt == module.mask_id
        q_ratio = 1 / torch.expm1(sigma)[:, None].expand_as(xt)[masked]
        neg = q_ratio * log_score[masked].gather(-1, x0[masked][:, None])[:, 0]
        score = log_score[masked].exp()
        pos = score[:, :module.mask_id].sum(-1) + score[:, module.mask_id + 1:].sum(-1)
        entropy = torch.zeros(xt.shape, device=xt.device, dtype=pos.dtype)
        entropy[masked] += pos - neg + q_ratio * (q_ratio.log() - 1)
        return -dalpha / alpha * entropy

    def _d3pm(self, x0, mask, i):
        """D3PM as upstream computes it ((B, L, K) log-softmax of both passes), with the right alpha_s."""
        import noise_schedule
        torch, algo, module = self.torch, self.algo, self.module
        alpha_t, alpha_s = (a[:, None] for a in noise_schedule.discrete_alphas(algo.schedule, i, algo.T))
        xt = torch.where(torch.rand(x0.shape, device=x0.device) < 1 - alpha_t, module.mask_id, x0)
        log_x = module.backbone(xt, algo.sigma(alpha_t).float(), attention_mask=mask).log_softmax(-1)
        log_x_m = log_x.gather(-1, x0[..., None])[..., 0]
        x_mask = log_x[..., module.mask_id].exp()
        final = alpha_s == 1
        a, b = (alpha_s - alpha_t) / (1 - alpha_t), (1 - alpha_s) / (1 - alpha_t)
        rho_t, rho_s = alpha_t / (1 - alpha_t), alpha_s / torch.where(final, 1.0, 1 - alpha_s)
        kl = (a * (torch.log1p(rho_t * x_mask) - log_x_m)
              + torch.where(final, 0.0, b * (torch.log1p(rho_t * x_mask) - torch.log1p(rho_s * x_mask))))
        clean = module.backbone(x0, torch.zeros(x0.shape[0], device=x0.device), attention_mask=mask).log_softmax(-1)
        return -clean.gather(-1, x0[..., None])[..., 0] + algo.T * kl * (xt == module.mask_id)

    def noise(self, shape, first):
        """eps ~ N(0, I) of shape (B, L, K): at the first step the numbers ours draws (their losses are
        compared), then one serial torch.randn like upstream."""
        if first:
            import latents
            return latents.standard_normal(shape[0] * shape[1], shape[2], self.device).view(shape)
        return self.torch.randn(shape, device=self.device)

    def duo_loss(self, log_p, x0, xt, alpha, dalpha):
        """SPEC §4 DUO-base NELBO with the (B, L, K) tensors upstream builds: x̄θ and log x̄θ."""
        K, torch = self.K, self.torch
        xbar_theta = K * alpha[..., None] * log_p.exp() + (1 - alpha[..., None])
        S = xbar_theta.log().sum(-1)
        xbt_i = xbar_theta.gather(-1, xt[..., None])[..., 0]
        xbt_m = xbar_theta.gather(-1, x0[..., None])[..., 0]
        a, b = K * alpha, 1 - alpha
        xbar_i = b + a * (xt == x0)
        sum_xbar_log_xbar = (K - 1) * torch.xlogy(b, b) + torch.xlogy(a + b, a + b)
        sum_term = (K * (xbt_i.log() - xbar_i.log()) + sum_xbar_log_xbar - b * S - a * xbt_m.log()) / xbar_i
        return dalpha / (K * alpha) * (K / xbar_i - K / xbt_i - sum_term)

    def _distillation(self, x0, mask, t, step, first):
        torch, algo, module = self.torch, self.algo, self.module
        dt = algo.delta(step)
        t = (t + dt).clamp(0, 1)
        s = t - dt
        g = algo.curriculum
        one_hot = torch.nn.functional.one_hot(x0, self.K).float()
        eps = self.noise(one_hot.shape, first)
        zs = []
        for time_ in (t, s):
            gamma = g.gamma(time_)[:, None, None]
            zs.append((torch.sigmoid(-gamma).sqrt() * one_hot + torch.sigmoid(gamma).sqrt() * eps).argmax(-1))
        alpha_t, alpha_s = g.alpha(t)[:, None], g.alpha(s)[:, None]
        log_p = module.backbone(zs[0], algo.sigma(alpha_t), attention_mask=mask).log_softmax(-1)
        with torch.no_grad():
            log_q = algo.teacher(zs[1], algo.sigma(alpha_s), attention_mask=mask).log_softmax(-1)
        if algo.loss_type == 'kl-bwd':
            return (log_p.exp() * (log_p - log_q)).sum(-1), mask
        return (log_q.exp() * (log_q - log_p)).sum(-1), mask

    def ema_update(self):
        ema = self.module.ema
        if ema is None:
            return
        ema.num_updates += 1
        d = min(ema.decay, (1 + ema.num_updates) / (10 + ema.num_updates))
        with self.torch.no_grad():
            for s, p in zip(ema.shadow_params, self.module.backbone.parameters()):
                s.sub_((1 - d) * (s - p))


def worker(spec):
    """Build one (algorithm, implementation), run the steps, return the measurements."""
    import torch
    warnings.filterwarnings('ignore')  # Diffusion.log without a Trainer
    sys.path.insert(0, str(ROOT))
    import diffusion

    device = torch.device(spec['device'])
    if spec['tf32']:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = compose_config(spec)
    K = spec['vocab']
    module = diffusion.Diffusion(config, K, K - 1, K - 2).to(device)
    module.train()
    if spec['impl'] == 'ours':
        runner = diffusion.StepRunner(module, precision=spec['precision'])
    else:  # upstream: torch's default AdamW (for-loop on CPU, foreach on CUDA), same hyper-parameters
        o = config.optim
        reference = Reference(module)
        optimizer = torch.optim.AdamW(module.backbone.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                      weight_decay=o.weight_decay)
        runner = diffusion.StepRunner(module, precision=spec['precision'], optimizer=optimizer,
                                      loss_fn=reference.train_step, ema_update=reference.ema_update)
    gen = torch.Generator().manual_seed(0)
    B, L = spec['batch'], spec['length']
    x0 = torch.randint(0, K - 2, (B, L), generator=gen).to(device)
    batch = {'input_ids': x0, 'attention_mask': torch.ones_like(x0)}

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def step():
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        times = runner.step(batch, sync)
        times.update(step_s=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start)
        return times

    probe = MemoryProbe(device)
    probe.start()
    steps = [step() for _ in range(spec['warmup'] + spec['steps'])]
    timed = steps[spec['warmup']:]
    result = {key: statistics.median(s[key] for s in timed)
              for key in ('step_s', 'cpu_s', 'forward_s', 'backward_s', 'optimizer_s')}
    result.update(peak_rise_bytes=probe.peak_rise(), peak_total_bytes=probe.peak_total(),
                  losses=[s['loss'] for s in steps], tokens_per_s=B * L / result['step_s'],
                  flops_per_step=step_flops(spec, module.backbone))
    if spec['fit_budget_gb']:
        result['max_batch'] = largest_batch(spec, step_memory=lambda b: _trial(b, batch, step, device))
    return result


def _trial(batch_size, batch, step, device):
    """Peak CUDA bytes of one step at this batch size (None when it runs out of memory)."""
    import torch
    x0 = batch['input_ids']
    batch['input_ids'] = torch.randint(0, 100, (batch_size, x0.shape[1]), device=device)
    batch['attention_mask'] = torch.ones_like(batch['input_ids'])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step()
        return torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def largest_batch(spec, step_memory):
    """Largest batch whose step peaks within --fit-budget-gb (doubling, then bisection)."""
    budget = spec['fit_budget_gb'] * 2**30

    def fits(b):
        peak = step_memory(b)
        return peak is not None and peak <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 16:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def step_flops(spec, backbone):
    """Model FLOPs of one training step: 6 per weight and token for the matmuls (forward + two
    backward products), attention scores and values likewise, the relaxed-input embedding
    (forward + weight gradient), for distillation the teacher's forward and for d3pm its second
    (clean-sequence) pass."""
    d, n, L, B, K = spec['hidden'], spec['blocks'], spec['length'], spec['batch'], spec['vocab']
    per_token_weights = n * 12 * d * d + d * K        # qkv 3d², out d², mlp 8d²; output layer d·K
    attn = n * 2 * 2 * L * d * (0.5 if spec['algo'] == 'ar' else 1.0)   # q·k and p·v per token
    flops = B * L * (6 * per_token_weights + 3 * attn) * (2 if spec['algo'] == 'd3pm' else 1)  # its clean pass
    if spec['algo'] == 'duo':
        flops += B * L * 4 * K * d
    if spec['algo'] == 'duo-topk':
        flops += B * L * 4 * spec['top_k'] * d
    if spec['algo'] == 'distillation':
        flops += B * L * (2 * per_token_weights + attn)
    return flops


# ============================================================================ driver

def peak_tflops(args, device_name):
    if args.peak_tflops:
        return args.peak_tflops
    for fragment, value in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return value
    return None


def run_worker(spec, env_extra):
    env = {k: v for k, v in os.environ.items() if k not in OURS_ENV}
    env.update(env_extra)
    env.setdefault('HF_HUB_OFFLINE', '1')
    proc = subprocess.run([sys.executable, __file__, '--worker', json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['algo']}/{spec['impl']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--preset', choices=sorted(PRESETS), default='upstream',
                        help='sizes and precision; the options below override them')
    parser.add_argument('--algos', nargs='+', choices=ALGOS, default=list(DEFAULT_ALGOS))
    parser.add_argument('--impls', nargs='+', choices=IMPLS, default=list(IMPLS))
    for name in ('hidden', 'blocks', 'heads', 'cond', 'batch', 'length', 'vocab'):
        parser.add_argument(f'--{name}', type=int, help=f'override the preset {name}')
    parser.add_argument('--precision', choices=('32', 'bf16-mixed', '16-mixed'), help='override the preset')
    parser.add_argument('--dropout', type=float, default=0.1, help='model.dropout (model=tiny/small use 0.1)')
    parser.add_argument('--tau-log10', type=float, default=-1.5,
                        help='duo, duo-topk: log10 of the curriculum temperature')
    parser.add_argument('--top-k', type=int, default=2, help='duo-topk: algo.curriculum.top_k')
    parser.add_argument('--device', default=None, help='cuda when available, else cpu')
    parser.add_argument('--steps', type=int, default=3, help='timed steps per run (median)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed first steps per run (memory still counts)')
    parser.add_argument('--repeats', type=int, default=3, help='fresh processes per configuration, interleaved')
    parser.add_argument('--compile', action='store_true', help='model.compile=true for ours')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls (CUDA, Ampere+; changes fp32 numerics)')
    parser.add_argument('--thp', choices=('ours', 'all', 'none'), default='none',
                        help=f"who runs with {OURS_ENV} (neither main.py nor upstream sets it)")
    parser.add_argument('--peak-tflops', type=float, help='peak dense bf16 TFLOPS for MFU (default: known GPUs)')
    parser.add_argument('--fit-budget-gb', type=float, default=0.0,
                        help='CUDA: also find the largest batch whose step fits this many GB')
    parser.add_argument('--out', type=Path, default=ROOT / 'bench' / 'results')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None

    import torch
    sizes = dict(PRESETS[args.preset])
    for name in ('hidden', 'blocks', 'heads', 'cond', 'batch', 'length', 'vocab', 'precision'):
        if getattr(args, name) is not None:
            sizes[name] = getattr(args, name)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cpu' and sizes['precision'] != '32':
        parser.error(f"--precision {sizes['precision']} needs a GPU; use --precision 32 on the CPU")
    if args.fit_budget_gb and device != 'cuda':
        parser.error('--fit-budget-gb measures CUDA memory; it needs a GPU')
    device_name = torch.cuda.get_device_name() if device == 'cuda' else (platform.processor() or 'cpu')
    peak = peak_tflops(args, device_name)
    comparable = args.preset == 'upstream' and device == 'cpu' and all(
        getattr(args, k) is None for k in ('hidden', 'blocks', 'heads', 'cond', 'batch', 'length', 'vocab'))

    runs = [(algo, impl) for algo in args.algos for impl in args.impls
            if not (impl == 'reference' and algo in NO_REFERENCE)]
    samples = {run: [] for run in runs}
    print(f"{args.preset}: {sizes} on {device} ({device_name}), {args.repeats} x {args.steps} steps", flush=True)
    for r in range(args.repeats):
        for algo, impl in (runs if r % 2 == 0 else runs[::-1]):  # alternate the order: drift cancels
            spec = dict(sizes, algo=algo, impl=impl, device=device, steps=args.steps, warmup=args.warmup,
                        dropout=args.dropout, tau_log10=args.tau_log10, top_k=args.top_k, tf32=args.tf32,
                        compile=args.compile and impl == 'ours',
                        fit_budget_gb=args.fit_budget_gb if (impl == 'ours' and r == 0) else 0.0)
            thp = args.thp == 'all' or (args.thp == 'ours' and impl == 'ours')
            res = run_worker(spec, OURS_ENV if thp else {})
            samples[(algo, impl)].append(res)
            print(f'  [{r + 1}/{args.repeats}] {algo:12} {impl:9} {res["tokens_per_s"]:8.1f} tok/s '
                  f'{res["peak_rise_bytes"] / 2**30:6.2f} GB', flush=True)

    rows = []
    for algo, impl in runs:
        res = samples[(algo, impl)]
        row = {'algo': algo, 'impl': impl}
        for key in ('tokens_per_s', 'step_s', 'cpu_s', 'forward_s', 'backward_s', 'optimizer_s', 'peak_rise_bytes',
                    'peak_total_bytes'):
            row[key] = statistics.median(x[key] for x in res)
        row['tokens_per_s_all'] = [x['tokens_per_s'] for x in res]
        row['flops_per_step'] = res[0]['flops_per_step']
        row['tflops'] = row['flops_per_step'] / row['step_s'] / 1e12
        row['mfu'] = row['tflops'] / peak if peak else None
        row['first_loss'] = res[0]['losses'][0]
        if 'max_batch' in res[0]:
            row['max_batch'] = res[0]['max_batch']
        rows.append(row)
    by_key = {(row['algo'], row['impl']): row for row in rows}
    for row in rows:
        ref = by_key.get((row['algo'], 'reference'))
        if row['impl'] == 'ours' and ref:
            row['speedup_vs_reference'] = row['tokens_per_s'] / ref['tokens_per_s']
            row['memory_vs_reference'] = row['peak_rise_bytes'] / ref['peak_rise_bytes']
            # same seed, same first batch: the two implementations compute the same loss
            row['loss_diff_vs_reference'] = abs(row['first_loss'] - ref['first_loss']) / max(abs(ref['first_loss']), 1e-12)
        if comparable and row['algo'] in ISSUE_TABLE:
            tps, gb = ISSUE_TABLE[row['algo']]
            row['speedup_vs_issue'] = row['tokens_per_s'] / tps
            row['memory_vs_issue'] = row['peak_rise_bytes'] / 2**30 / gb
        base = by_key.get(('duo_base', row['impl']))
        if row['algo'] in ('duo', 'duo-topk') and base:  # what the curriculum costs over DUO-base's exact loss
            row['step_vs_duo_base'] = row['step_s'] / base['step_s']
            row['memory_vs_duo_base'] = row['peak_rise_bytes'] / base['peak_rise_bytes']

    def fmt(value, spec):
        return format(value, spec) if value is not None else '-'
    header = (f"{'algo':12} {'impl':9} {'tok/s':>8} {'step s':>7} {'cpu s':>6} {'fwd s':>6} {'bwd s':>6} {'opt s':>6} "
              f"{'peak GB':>7} {'TFLOP/s':>7} {'MFU':>6} {'x ref':>6} {'mem/ref':>7} {'x issue':>7} {'mem/iss':>7} "
              f"{'loss diff':>9}")
    print('\n' + header + '\n' + '-' * len(header))
    for row in rows:
        print(f"{row['algo']:12} {row['impl']:9} {row['tokens_per_s']:8.1f} {row['step_s']:7.2f} {row['cpu_s']:6.2f} "
              f"{row['forward_s']:6.2f} {row['backward_s']:6.2f} {row['optimizer_s']:6.2f} "
              f"{row['peak_rise_bytes'] / 2**30:7.2f} {row['tflops']:7.3f} {fmt(row['mfu'], '6.1%')} "
              f"{fmt(row.get('speedup_vs_reference'), '6.2f')} {fmt(row.get('memory_vs_reference'), '7.2f')} "
              f"{fmt(row.get('speedup_vs_issue'), '7.2f')} {fmt(row.get('memory_vs_issue'), '7.2f')} "
              f"{fmt(row.get('loss_diff_vs_reference'), '9.1e')}"
              + (f"  max batch in {args.fit_budget_gb:g} GB: {row['max_batch']}" if 'max_batch' in row else ''))
    print('x ref / mem/ref: ours against the upstream-style reference of this run; loss diff: relative difference '
          'of their first-step losses (same seed and batch)')
    if comparable:
        print('x issue / mem/iss: against the issue table (upstream on the issue\'s machine; absolute figures vary)')
    for row in rows:
        if 'step_vs_duo_base' in row:
            print(f"{row['algo']} ({row['impl']}) against duo_base ({row['impl']}): step time x{row['step_vs_duo_base']:.2f}, "
                  f"peak memory x{row['memory_vs_duo_base']:.2f}")
    record = {'date': datetime.now(timezone.utc).isoformat(timespec='seconds'), 'device': device,
              'device_name': device_name, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
              'preset': args.preset, 'sizes': sizes, 'dropout': args.dropout, 'tau_log10': args.tau_log10,
              'top_k': args.top_k,
              'steps': args.steps, 'warmup': args.warmup, 'repeats': args.repeats, 'compile': args.compile,
              'tf32': args.tf32, 'thp': args.thp, 'peak_tflops': peak, 'load_avg': os.getloadavg(),
              'results': rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"train-{device}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + '\n')
    print(f'wrote {path}')
    return record


if __name__ == '__main__':
    main()
