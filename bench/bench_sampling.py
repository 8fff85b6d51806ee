"""Sampling throughput and the samplers' overhead on top of the network (SPEC §6, SPEC-2 §13).

For each algorithm (ar, mdlm with the per-sequence cache, mdlm_uncached, sedd with the analytic
predictor, d3pm on its T = 1000 grid, duo_base) and step count, samples one batch from a DiT with
random weights and reports tokens/s and the share of the wall time spent outside the backbone's
forward passes. Target: the sampler adds at most 15% to the forwards; SEDD's analytic sampler
within 10% of MDLM's uncached one. The same run times an upstream-style reference (`naive`):
float64 probabilities over the whole vocabulary, a one-hot posterior (B, L, K) per step, float64
Gumbel draws over all of it, MDLM caching decided for the whole batch, SEDD's (B, L, K) float64
staggered-score product, AR recomputing the whole prefix for every token (mdlm_uncached and d3pm
have none: their upstream samplers are the mdlm one and a wrong one, SPEC-2 §12 pitfall (c)).
For mdlm and duo_base it also times the Ψ-sampler (`psi`, sampling.predictor=psi with the
published ReMDM-cap setting, max-capped-0.01 on the linear grid: kappa < 1 at every step, so
every step is a Ψ-step and MDLM's network sees the whole batch); "vs ancestral" is its wall time
over ours' (same steps; target: at most 1.10). --repeats alternates ours and psi and keeps the
median of each.

    python bench/bench_sampling.py                      # the default preset (see --help)
    python bench/bench_sampling.py --steps 8 --length 64 --algos mdlm duo_base
    python bench/bench_sampling.py --algos mdlm duo_base --no-naive --repeats 3   # Ψ vs ancestral
"""
import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import samplers  # noqa: E402
from models.dit import DiT  # noqa: E402

ALGOS = ('ar', 'mdlm', 'mdlm_uncached', 'sedd', 'd3pm', 'duo_base')
DEFAULT_ALGOS = ('ar', 'mdlm', 'duo_base')
NAIVE = ('ar', 'mdlm', 'sedd', 'duo_base')
PSI_ALGOS = ('mdlm', 'duo_base')
D3PM_T = 1000
EPS = 1e-3  # log-linear schedule alpha_t = 1 - (1 - eps) t
# The Ψ rows: the published ReMDM-cap setting (SPEC-2 §13.5), the sampling.psi.* keys.
PSI = dict(time_profile='linear', high_mode='max-capped-0.01', middle_mode='max-capped-0.01',
           low_mode='max-capped-0.01', high_frac=0.0, middle_frac=0.0)


def alpha_fn(t):
    return 1 - (1 - EPS) * t


class Timer:
    """Accumulates the wall time of the wrapped calls (synchronising CUDA around them)."""

    def __init__(self, device):
        self.device, self.seconds, self.calls, self.rows = device, 0.0, 0, 0

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize()

    def wrap(self, fn):
        def timed(*args):
            self.sync()
            start = time.perf_counter()
            out = fn(*args)
            self.sync()
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.rows += args[0].shape[0]
            return out
        return timed


def random_dit(args, causal, device):
    torch.manual_seed(0)
    model = DiT(args.vocab, args.hidden, args.cond, args.blocks, args.heads, args.length, causal=causal)
    with torch.no_grad():  # fresh adaLN and output layers are zero: give the logits some structure
        for name, p in model.named_parameters():
            if 'norm' not in name:
                p.normal_(0, 0.02 if p.dim() == 2 else 0.01)
    return model.to(device).eval()


# ---------------------------------------------------------------------------- ours

def ours(algo, model, args, steps, timer, generator, psi=False):
    mask_id = args.vocab - 1
    if algo == 'ar':
        cache = model.init_kv_cache(args.batch, args.length)
        forward = timer.wrap(lambda tokens: model(tokens, kv_cache=cache))

        def step(tokens):
            logits = forward(tokens)[:, -1].float()
            logits[:, mask_id] = float('-inf')
            return logits
        return samplers.sample_ar(step, args.batch, args.length, bos_id=args.vocab - 2, generator=generator,
                                  device=args.device)
    # as algorithms._Diffusion.sample does: on the CPU one logits buffer serves every step
    buffer = torch.empty(args.batch, args.length, args.vocab) if args.device.type == 'cpu' else None
    out = lambda z: None if buffer is None else buffer[:len(z)]
    if algo.startswith('mdlm'):
        logits_fn = timer.wrap(lambda z, t: model(z, torch.zeros_like(t), out=out(z)))
    else:  # time conditioned
        logits_fn = timer.wrap(lambda z, t: model(z, -torch.log(alpha_fn(t)), out=out(z)))
    extra = {}
    if psi:
        extra['grid'], extra['kappas'] = samplers.psi_schedule(steps, alpha_fn, **PSI)
    elif algo == 'sedd':
        extra = {'step': samplers.sedd_step}
    elif algo == 'd3pm':  # as algorithms.D3PM: steps points of the training grid i / T, from 1 to 1 / T
        k = torch.arange(steps + 1, dtype=torch.float64)
        extra = {'step': samplers.d3pm_step, 'grid': torch.round(D3PM_T - k * (D3PM_T - 1) / steps) / D3PM_T}
    return samplers.sample_diffusion(logits_fn, args.batch, args.length, args.vocab, alpha_fn, steps,
                                     kind='uniform' if algo == 'duo_base' else 'absorbing', mask_id=mask_id,
                                     cache=algo != 'mdlm_uncached', generator=generator, device=args.device, **extra)


def psi(algo, model, args, steps, timer, generator):
    return ours(algo, model, args, steps, timer, generator, psi=True)


# ---------------------------------------------------------------------------- upstream-style reference

def naive_categorical(probs, generator):
    """Upstream's draw: argmax(p / E) with E = 1e-10 - log(U + 1e-10), all in float64 over (B, L, K)."""
    u = torch.rand(probs.shape, dtype=torch.float64, generator=generator, device=probs.device)
    return (probs / (1e-10 - (u + 1e-10).log())).argmax(-1)


def naive(algo, model, args, steps, timer, generator):
    B, L, K, mask_id = args.batch, args.length, args.vocab, args.vocab - 1
    device = args.device
    if algo == 'ar':
        forward = timer.wrap(lambda tokens: model(tokens))
        x = torch.full((B, L), args.vocab - 2, dtype=torch.long, device=device)
        for i in range(L - 1):
            logits = forward(x[:, :i + 1])[:, -1].double()
            logits[:, mask_id] = float('-inf')
            x[:, i + 1] = naive_categorical(logits.softmax(-1), generator)
        return x
    grid = samplers.time_grid(steps, device=device)
    if algo == 'mdlm':
        forward = timer.wrap(lambda z, t: model(z, torch.zeros_like(t)))
        x = torch.full((B, L), mask_id, dtype=torch.long, device=device)
        p_x0 = None
        for i in range(steps + 1):
            t = grid[i]
            s = grid[i + 1] if i < steps else torch.zeros((), dtype=torch.float64, device=device)
            move_t, move_s = 1 - alpha_fn(t), (1 - alpha_fn(s) if i < steps else 0.0)
            if p_x0 is None:  # recomputed when anything in the batch changed
                logits = forward(x, torch.full((B,), float(t), device=device)).double()
                logits[..., mask_id] = float('-inf')
                p_x0 = logits.softmax(-1)
            q_xs = p_x0 * (move_t - move_s)
            q_xs[..., mask_id] = move_s
            x_new = naive_categorical(q_xs, generator)
            x_new = torch.where(x != mask_id, x, x_new)
            if not torch.equal(x_new, x):
                p_x0 = None
            x = x_new
        return x
    if algo == 'sedd':
        return naive_sedd(model, args, steps, timer, generator, grid)
    forward = timer.wrap(lambda z, t: model(z, -torch.log(alpha_fn(t))))
    x = torch.randint(K, (B, L), generator=generator, device=device)
    for i in range(steps + 1):
        a_t = alpha_fn(grid[i])
        a_s = alpha_fn(grid[i + 1]) if i < steps else torch.ones((), dtype=torch.float64, device=device)
        x_hat = forward(x, torch.full((B,), float(grid[i]), device=device)).double().softmax(-1)
        one_hot = torch.nn.functional.one_hot(x, K).double()
        a_ts = a_t / a_s
        q = ((a_s - a_t) * x_hat + (K * a_t * (x_hat * one_hot).sum(-1, keepdim=True) + a_ts - a_t) * one_hot
             + (1 - a_ts) * (1 - a_s) / K)
        x = naive_categorical(q / q.sum(-1, keepdim=True), generator)
    return x


def naive_sedd(model, args, steps, timer, generator, grid):
    """Upstream's analytic update the materialising way: the (B, L, K) float64 score of every
    position, the staggered-score x transposed-transition product (p_j = c u_j, p_mask = 1 - c S at
    masked positions, the token kept elsewhere), a float64 Gumbel draw over all of it; the last step
    is the denoiser (c = 1, p_mask = 0)."""
    B, L, K, mask_id = args.batch, args.length, args.vocab, args.vocab - 1
    forward = timer.wrap(lambda z, t: model(z, -torch.log(alpha_fn(t))))
    x = torch.full((B, L), mask_id, dtype=torch.long, device=args.device)
    for i in range(steps + 1):
        a_t = float(alpha_fn(grid[i]))
        a_s = float(alpha_fn(grid[i + 1])) if i < steps else 1.0
        log_score = forward(x, torch.full((B,), float(grid[i]), device=args.device)).double()
        log_score = log_score - math.log((1 - a_t) / a_t) - math.log(K - 1)   # - log(e^sigma - 1) - log(K - 1)
        log_score.scatter_(-1, x[..., None], 0.0)
        score = log_score.exp()
        c = (a_s - a_t) / (1 - a_t)
        probs = c * score
        probs[..., mask_id] = 1 - c * (score.sum(-1) - score[..., mask_id])
        keep = torch.nn.functional.one_hot(x, K).double()
        masked = (x == mask_id)[..., None]
        probs = torch.where(masked, probs, keep).clamp_(min=0)
        x = naive_categorical(probs, generator)
    return x


# ---------------------------------------------------------------------------- driver

SAMPLERS = {'ours': ours, 'psi': psi, 'naive': naive}


def measure(kind, algo, model, args, steps):
    timer = Timer(args.device)
    generator = torch.Generator(args.device).manual_seed(0)
    timer.sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = SAMPLERS[kind](algo, model, args, steps, timer, generator)
    timer.sync()
    total = time.perf_counter() - start
    assert out.shape == (args.batch, args.length)
    outside = total - timer.seconds
    return {'algo': algo, 'sampler': kind, 'steps': steps, 'forward_calls': timer.calls,
            'forward_rows': timer.rows, 'total_s': total, 'forward_s': timer.seconds,
            'outside_share': outside / total, 'overhead_vs_forward': outside / timer.seconds,
            'tokens_per_s': args.batch * args.length / total}


def run_record(args, skip=()) -> dict:
    """The start of a bench script's JSON record: when and on what it ran (device and its name, torch,
    CPU threads, the load average: the CPU may be shared, so compare within a run) and its preset
    (the arguments, less out, device and `skip`); 'results' to fill."""
    name = torch.cuda.get_device_name(args.device) if args.device.type == 'cuda' else platform.processor() or 'cpu'
    return {'date': datetime.now(timezone.utc).isoformat(timespec='seconds'), 'device': str(args.device),
            'device_name': name, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'load_average_at_start': os.getloadavg()[0],
            'preset': {k: v for k, v in vars(args).items() if k not in ('out', 'device', *skip)}, 'results': []}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--algos', nargs='+', default=list(DEFAULT_ALGOS), choices=ALGOS)
    parser.add_argument('--steps', nargs='+', type=int, default=[32, 128],
                        help='diffusion steps (AR always runs length - 1 forwards, once)')
    parser.add_argument('--hidden', type=int, default=256)
    parser.add_argument('--blocks', type=int, default=4)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--cond', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=50258, help='K (the last id is the [MASK])')
    parser.add_argument('--length', type=int, default=256)
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    parser.add_argument('--no-naive', action='store_true', help='skip the upstream-style reference')
    parser.add_argument('--no-psi', action='store_true', help='skip the Ψ-sampler rows')
    parser.add_argument('--repeats', type=int, default=1,
                        help='runs of ours and psi per row (alternating; the median is kept); naive runs once')
    parser.add_argument('--out', type=Path, default=ROOT / 'bench' / 'results')
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    record = run_record(args, skip=('algos', 'steps'))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sampling-{args.device.type}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    header = (f"{'algo':9} {'sampler':7} {'steps':>5} {'fwd rows':>8} {'total s':>8} {'fwd s':>8} "
              f"{'outside':>8} {'overhead':>8} {'tok/s':>8} {'speed-up':>8} {'vs ancestral':>12}")
    print(header)
    print('-' * len(header))
    for algo in args.algos:
        model = random_dit(args, algo == 'ar', args.device)
        # AR's warm-up is a whole (short) sequence; a diffusion one is one full-size step (it also
        # maps the logits buffer, whose first use otherwise slows the first timed run)
        warm = argparse.Namespace(**{**vars(args), 'length': min(args.length, 8)}) if algo == 'ar' else args
        repeated = ('ours', 'psi') if algo in PSI_ALGOS and not args.no_psi else ('ours',)
        kinds = repeated if args.no_naive or algo not in NAIVE else (*repeated, 'naive')
        for kind in kinds:  # first calls allocate and spin up thread pools: not timed
            measure(kind, algo, model, warm, 1)
        for steps in ([args.length - 1] if algo == 'ar' else args.steps):
            runs = {kind: [] for kind in kinds}
            for _ in range(max(args.repeats, 1)):
                for kind in repeated:
                    runs[kind].append(measure(kind, algo, model, args, steps))
            if 'naive' in kinds:
                runs['naive'].append(measure('naive', algo, model, args, steps))
            results = [sorted(runs[kind], key=lambda r: r['total_s'])[(len(runs[kind]) - 1) // 2] for kind in kinds]
            by_kind = dict(zip(kinds, results))
            for r in results:
                r['repeats'] = len(runs[r['sampler']])
                if 'naive' in by_kind and r['sampler'] != 'naive':
                    r['speedup_vs_naive'] = by_kind['naive']['total_s'] / r['total_s']
                if r['sampler'] == 'psi':
                    r['vs_ancestral'] = r['total_s'] / by_kind['ours']['total_s']
                print(f"{r['algo']:9} {r['sampler']:7} {r['steps']:5d} {r['forward_rows']:8d} {r['total_s']:8.2f} "
                      f"{r['forward_s']:8.2f} {r['outside_share']:8.1%} {r['overhead_vs_forward']:8.1%} "
                      f"{r['tokens_per_s']:8.1f} {r.get('speedup_vs_naive', float('nan')):8.2f} "
                      f"{r.get('vs_ancestral', float('nan')):12.3f}", flush=True)
            record['results'] += results
            record['load_average_at_end'] = os.getloadavg()[0]
            path.write_text(json.dumps(record, indent=2) + '\n')  # after every row: a long run keeps its rows
    print(f'wrote {path}')
    return record


if __name__ == '__main__':
    main()
