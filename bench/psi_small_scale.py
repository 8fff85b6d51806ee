"""Ψ-samplers at CPU scale (SPEC-2 §13): does Ψ sampling keep improving with more steps where
ancestral sampling stops, and does uniform-state diffusion (DUO-base) beat masked diffusion (MDLM)
at matched entropy?

The models are those of bench/duo_small_scale.py (shared English corpus read as characters, K = 35,
DiT d=96 x 3 blocks, L = 64, batch 32, its training recipe), trained through main.py in the same
work directory: runs that duo_small_scale.py (or an earlier run of this script) left there with the
same number of steps are reused. It trains the AR judge (first seed), and DUO-base and MDLM for each
seed, then samples each model with mode=sample_eval at 32, 128 and 512 steps with
  - ancestral: sampling.predictor=ancestral (DUO-base) / ancestral_cache (MDLM);
  - loop: the published ReMDM-loop setting (plateau at alpha = 0.9 for half of the grid points,
    constant-remdm-0.01 there, high_frac 0.45, middle_frac 0.5);
  - cap: the published ReMDM-cap setting (max-capped-0.01 at every step, linear grid);
with the run's seed, and reports generative perplexity under the AR judge and sample entropy.
Adapted to this scale: no nucleus for any sampler (p_nucleus = 1: with 35 characters, nucleus
truncation would change the entropy more than the samplers do, and the published p = 0.9 / 0.95
were tuned for GPT-2's 50K tokens); eta and the fractions as published (a per-step remasking
probability, independent of L and K); 128 samples per cell (two batches of 64; 512 steps of
this model cost about 100 ms per batch and step on one core), two sample_eval runs at a time.

    python bench/psi_small_scale.py                          # ~21 min on 2 CPU cores (9 training, 12 sampling)
    python bench/psi_small_scale.py --steps 60 --samples 16 --sampling-steps 8 16 --seeds 1   # smoke run
Prints a table and writes bench/results/psi_small_scale.json; runs live in --work-dir.
"""
import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

import checkpoints  # noqa: E402
from duo_small_scale import CORPUS, K, common_overrides, data_reference, open_work_dir, training_overrides, val_curve  # noqa: E402

# The samplers compared: sampling.* overrides (besides sampling.steps); SPEC-2 §13.5 without the nucleus.
SAMPLERS = {
    'ancestral': {'duo_base': ['sampling.predictor=ancestral'], 'mdlm': ['sampling.predictor=ancestral_cache']},
    'loop': ['sampling.predictor=psi', 'sampling.psi.time_profile=linear-constant-linear-0.9-inv',
             'sampling.psi.high_mode=pure-posterior', 'sampling.psi.middle_mode=constant-remdm-0.01',
             'sampling.psi.low_mode=pure-posterior', 'sampling.psi.high_frac=0.45', 'sampling.psi.middle_frac=0.5'],
    'cap': ['sampling.predictor=psi', 'sampling.psi.time_profile=linear', 'sampling.psi.high_mode=max-capped-0.01',
            'sampling.psi.middle_mode=max-capped-0.01', 'sampling.psi.low_mode=max-capped-0.01',
            'sampling.psi.high_frac=0.0', 'sampling.psi.middle_frac=0.0'],
}
MODELS = ('duo_base', 'mdlm')


def sampler_overrides(sampler: str, model: str) -> list:
    chosen = SAMPLERS[sampler]
    return chosen[model] if isinstance(chosen, dict) else chosen


def run_dir_name(model: str, seed: int, first_seed: int) -> str:
    """duo_small_scale.py's naming: the first seed's run is `<model>`, the others `<model>_seed<N>`."""
    return model if seed == first_seed else f'{model}_seed{seed}'


def trained(run_dir: Path, steps: int) -> bool:
    last = run_dir / 'checkpoints' / checkpoints.LAST
    return last.exists() and checkpoints.read_progress(last)[0] == steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=1000, help='training steps of AR, DUO-base and MDLM')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1, 2],
                        help='training and sampling seeds of DUO-base and MDLM (the AR judge uses the first)')
    parser.add_argument('--sampling-steps', type=int, nargs='+', default=[32, 128, 512])
    parser.add_argument('--samplers', nargs='+', default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument('--samples', type=int, default=128, help='samples per sample_eval (batches of at most 64)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per run (1 was fastest on a shared 2-core machine)')
    parser.add_argument('--jobs', type=int, default=2, help='sample_eval runs at a time (trainings run one by one)')
    parser.add_argument('--work-dir', default='outputs/bench_duo_small_scale',
                        help="runs (duo_small_scale.py's work directory by default: its models are reused)")
    parser.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'psi_small_scale.json'))
    args = parser.parse_args()
    work, run = open_work_dir(args.work_dir, args.threads)
    started = time.perf_counter()

    common = common_overrides(work)  # as duo_small_scale.py trains (validation batches of 64)
    eval_batch = min(64, args.samples)
    first = args.seeds[0]
    jobs = [('ar', first)] + [(model, seed) for seed in args.seeds for model in MODELS]
    dirs, reused = {}, []
    for model, seed in jobs:
        run_dir = work / run_dir_name(model, seed, first)
        dirs[model, seed] = run_dir
        if trained(run_dir, args.steps):
            reused.append(run_dir.name)
            print(f'reusing {run_dir} (trained for {args.steps} steps)', flush=True)
            continue
        run(f'train_{run_dir.name}', 'mode=train', f'algo={model}', *common, f'seed={seed}',
            *training_overrides(args.steps), f'hydra.run.dir={run_dir}')
    bounds = {f'{model}_seed{seed}': val_curve(dirs[model, seed])[-1][1] for model, seed in jobs if model != 'ar'}

    judge = dirs['ar', first] / 'checkpoints' / checkpoints.LAST
    torch.set_num_threads(args.threads)
    data_ppl, data_entropy = data_reference([*common, f'seed={first}'], judge, args.samples)
    def sample(seed, model, steps, sampler):
        run_dir = dirs[model, seed]
        name = f'psi_sample_{run_dir.name}_{sampler}_{steps}'
        out = work / f'{name}.json'
        run(name, 'mode=sample_eval', f'algo={model}', *common_overrides(work, eval_batch), f'seed={seed}',
            f'sampling.steps={steps}', 'sampling.p_nucleus=1.0', 'sampling.noise_removal=ancestral',
            *sampler_overrides(sampler, model), f'sampling.num_sample_batches={max(args.samples // eval_batch, 1)}',
            f'eval.gen_ppl_eval_model_name_or_path={judge}', f'eval.generated_samples_path={out}',
            f'hydra.run.dir={run_dir}')
        result = json.loads(out.read_text())
        return {'model': model, 'seed': seed, 'sampler': sampler, 'steps': steps,
                'generative_ppl': result['generative_ppl'], 'entropy': result['entropy'],
                'samples': len(result['generated_seqs']), 'seconds': run.seconds[name],
                'example': result['generated_seqs'][0]}

    cells = [(seed, model, steps, sampler) for seed in args.seeds for model in MODELS
             for steps in sorted(args.sampling_steps, reverse=True) for sampler in args.samplers]  # longest first
    with concurrent.futures.ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        rows = list(pool.map(lambda cell: sample(*cell), cells))

    report = {
        'benchmark': 'psi_small_scale',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch': torch.__version__,
                    'threads_per_run': args.threads, 'load_average_at_end': os.getloadavg()[0]},
        'settings': {**vars(args), 'corpus': str(CORPUS), 'vocab_size': K, 'model': 'd=96, 3 blocks, 4 heads, L=64',
                     'p_nucleus': 1.0, 'samplers': SAMPLERS, 'reused_runs': reused},
        'validation_bound_nats_per_char': bounds,
        'data': {'generative_ppl': data_ppl, 'entropy': data_entropy, 'samples': args.samples},
        'sampling': rows,
        'seconds': {**run.seconds, 'total': round(time.perf_counter() - started, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')

    print('\nValidation bound (nats/char, 8 batches, EMA weights): ' +
          ', '.join(f'{name} {value:.4f}' for name, value in bounds.items()))
    seeds = ' / '.join(f'seed {s}' for s in args.seeds)
    print(f'\n{args.samples} samples x 64 chars per cell, generative PPL / entropy under the AR judge '
          f'(data: {data_ppl:.2f} / {data_entropy:.3f}); per seed ({seeds}) and their mean:')
    print(f'  {"model":<10}{"sampler":<11}{"steps":>6}  {"gen ppl":<24}{"entropy":<24}')
    for model in MODELS:
        for sampler in args.samplers:
            for steps in args.sampling_steps:
                cell = [r for r in rows if (r['model'], r['sampler'], r['steps']) == (model, sampler, steps)]
                ppl = [r['generative_ppl'] for r in cell]
                ent = [r['entropy'] for r in cell]
                print(f'  {model:<10}{sampler:<11}{steps:>6}  '
                      f'{" / ".join(f"{v:.2f}" for v in ppl) + f"  ({statistics.mean(ppl):.2f})":<24}'
                      f'{" / ".join(f"{v:.3f}" for v in ent) + f"  ({statistics.mean(ent):.3f})":<24}')
    print(f'\nTotal {report["seconds"]["total"] / 60:.1f} min; wrote {out}')


if __name__ == '__main__':
    main()
