"""DUO at CPU scale: does the Gaussian curriculum lower the validation bound, and does Discrete
Consistency Distillation make 8-step samples closer to the data? (SPEC §5, §7)

On the shared English corpus (../shared/corpus/english.jsonl.gz, read character by character with
the text8 alphabet, K = 35) it runs the commands a user types, through main.py:
  1. an AR model (algo=ar): the judge of generative perplexity, and its validation perplexity;
  2. DUO-base (algo=duo_base), DUO (algo=duo: curriculum for the first half of the steps, then the
     exact loss) and DUO with the Duo++ top-k curriculum (algo.curriculum.mode=poly9, top_k=2:
     SPEC-2 §14), same steps, seed and data; all evaluated with mode=ppl_eval on the same
     validation blocks and noise (the exact DUO-base bound), with the wall time of each training run;
  3. DCD (algo=distillation) of the DUO model (training.finetune_path), rounds of doubling steps;
  4. mode=sample_eval of the DUO model and of the distilled one with sampling.steps=8 (ancestral
     and Greedy-Tail; 64 steps for reference): generative perplexity under the AR judge
     (eval.gen_ppl_eval_model_name_or_path=<its .ckpt>) and sample entropy, beside those of real
     validation blocks and of the AR model's own samples.
With --seeds 1 2 ... the DUO-base / DUO / top-k comparison is repeated for each seed; --curricula-only
runs that comparison alone (no AR judge, distillation or sampling).
The curriculum's and the distillation's gamma ranges are those of the paper mapped to K = 35: the
gammas whose uniform-state alphas T(gamma) equal the paper's at K = 50258 (noise_schedule).

    python bench/duo_small_scale.py                 # ~25 min on 2 free CPU cores
    python bench/duo_small_scale.py --steps 60 --round-steps 10 --samples 64 --val-batches 4   # smoke run
    python bench/duo_small_scale.py --curricula-only --seeds 1 2     # the curricula, ~25 min
Prints a table and writes bench/results/duo_small_scale.json; runs live in --work-dir.
"""
import argparse
import csv
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import noise_schedule  # noqa: E402

CORPUS = ROOT.parent / 'shared' / 'corpus' / 'english.jsonl.gz'
K = 35  # text8 tokenizer: 27 characters + 8 special ids
PAPER_K = 50258
PAPER_CURRICULUM = (-3.5, -1.75)   # LM1B curriculum gammas (SPEC §5)
PAPER_DISTILLATION = (-4.0, -1.0)  # upstream's distillation gammas


def gamma_for_alpha(alpha: float, vocab_size: int) -> float:
    """The gamma with T(gamma) = alpha for this vocabulary (T decreases in gamma): bisection."""
    lo, hi = -20.0, 30.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if noise_schedule.gaussian_to_uniform_alpha(torch.tensor(mid, dtype=torch.float64), vocab_size).item() > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mapped_gammas(paper_gammas):
    """The paper's gamma range at K = 50258 -> the gammas giving the same alphas at K = 35."""
    alphas = [noise_schedule.gaussian_to_uniform_alpha(torch.tensor(g, dtype=torch.float64), PAPER_K).item()
              for g in paper_gammas]
    return [round(gamma_for_alpha(a, K), 4) for a in alphas], alphas


class Runner:
    """Runs `python main.py ...` with a log file per command; stops the benchmark on a failure."""

    def __init__(self, work_dir: Path, threads: int):
        self.work_dir = work_dir
        self.env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
                        WANDB_MODE='offline', OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.seconds = {}

    def __call__(self, name, *overrides):
        argv = [sys.executable, 'main.py', *overrides]
        print(f'[{time.strftime("%H:%M:%S")}] {name}: python main.py {shlex.join(overrides)}', flush=True)
        start = time.perf_counter()
        log_path = self.work_dir / f'{name}.log'
        with open(log_path, 'w') as log:
            code = subprocess.run(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT).returncode
        self.seconds[name] = round(time.perf_counter() - start, 1)
        if code != 0:
            tail = ''.join(log_path.read_text().splitlines(keepends=True)[-30:])
            sys.exit(f'{name} failed (exit {code}); the end of {log_path}:\n{tail}')
        print(f'    done in {self.seconds[name]:.0f} s', flush=True)


def open_work_dir(work_dir: str, threads: int) -> tuple[Path, 'Runner']:
    """The benchmark's work directory (relative paths under the checkout), made, and its Runner;
    exits with one line when the shared corpus is missing."""
    if not CORPUS.exists():
        sys.exit(f'the shared corpus {CORPUS} is missing: this benchmark needs it')
    work = Path(work_dir)
    work = work if work.is_absolute() else ROOT / work
    work.mkdir(parents=True, exist_ok=True)
    return work, Runner(work, threads)


def common_overrides(work: Path, eval_batch: int = 64) -> list:
    """Data, model and loader of every run of the small-scale benches (bench/psi_small_scale.py too)."""
    return ['data=local', f'data.train_files={CORPUS}', 'data.valid_docs=500', 'data.tokenizer_name_or_path=text8',
            f'data.cache_dir={work / "cache"}', 'model=micro', 'model.length=64', 'model.hidden_size=96',
            'model.n_blocks=3', 'model.n_heads=4', 'model.cond_dim=64', 'loader.global_batch_size=32',
            f'loader.eval_batch_size={eval_batch}', 'loader.num_workers=0', 'trainer.num_sanity_val_steps=0']


def training_overrides(steps: int) -> list:
    """The training recipe of the small-scale models (AR, DUO-base, DUO, MDLM)."""
    return ['optim.lr=1e-3', 'lr_scheduler.num_warmup_steps=100', 'training.ema=0.99',
            f'trainer.max_steps={steps}', f'trainer.val_check_interval={max(steps // 4, 1)}',
            'trainer.limit_val_batches=8', f'checkpointing.every_n_train_steps={steps}']


def val_curve(run_dir: Path):
    """[(step, val/nll)] logged during training (EMA weights, trainer.limit_val_batches)."""
    with open(run_dir / 'logs' / 'metrics.csv') as f:
        return [(int(r['step']) + 1, float(r['val/nll'])) for r in csv.DictReader(f) if r.get('val/nll')]


def data_reference(overrides, judge_path, n_blocks):
    """(generative perplexity, entropy) of the first n_blocks validation blocks under the judge: what
    samples "close to the data" would score."""
    from hydra import compose, initialize_config_dir
    import dataloader
    import metrics
    import settings
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        config = compose(config_name='config', overrides=['mode=ppl_eval', 'algo=ar', 'trainer.accelerator=cpu',
                                                          *overrides])
    config = settings.resolve(config)
    tokenizer = dataloader.get_tokenizer(config)
    _, valid = dataloader.get_dataloaders(config, tokenizer)
    batches = []
    for batch in valid:
        batches.append(batch['input_ids'])
        if sum(len(b) for b in batches) >= n_blocks:
            break
    blocks = torch.cat(batches)[:n_blocks]
    judge = metrics.GenerativePerplexity(str(judge_path), tokenizer=tokenizer)
    texts = tokenizer.batch_decode(blocks.tolist())
    return judge.compute(texts, tokenizer.eos_token, token_ids=blocks.tolist()), metrics.sample_entropy(blocks)


COMPARED = ('duo_base', 'duo', 'duo_topk')  # DUO-base, the simple curriculum, the top-k curriculum


def print_comparison(curriculum, steps, tokens):
    """The validation bound of each compared run per seed, with its training wall time."""
    print(f'\nValidation bound after {steps} steps (nats/char, {tokens} chars, same noise) / training wall time:')
    print(f'  {"seed":<6}' + ''.join(f'{name:>22}' for name in COMPARED))
    for c in curriculum:
        print(f'  {c["seed"]:<6}' + ''.join(f'{c[name]:>13.4f} / {c["train_seconds"][name]:>4.0f} s'
                                            for name in COMPARED))
    for name in COMPARED[1:]:
        gaps = [c['duo_base'] - c[name] for c in curriculum]
        print(f'  mean gap duo_base - {name}: {sum(gaps) / len(gaps):+.4f} nats/char')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=1000, help='training steps of AR, DUO-base and DUO')
    parser.add_argument('--rounds', type=int, default=4, help='distillation rounds (delta doubles each round)')
    parser.add_argument('--round-steps', type=int, default=125, help='steps per distillation round')
    parser.add_argument('--T', type=int, default=64, help='algo.T: first-round delta = 1/T')
    parser.add_argument('--distill-lr', type=float, default=3e-4)
    parser.add_argument('--samples', type=int, default=128, help='samples per sample_eval (batches of 64)')
    parser.add_argument('--val-batches', type=int, default=50, help='validation batches (of 64) for ppl_eval')
    parser.add_argument('--seeds', type=int, nargs='+', default=[1],
                        help='seeds of the DUO-base / DUO / top-k comparison (the AR judge and distillation use the first)')
    parser.add_argument('--top-k', type=int, default=2, help='algo.curriculum.top_k of the top-k curriculum')
    parser.add_argument('--curricula-only', action='store_true',
                        help='only the DUO-base / DUO / top-k curriculum comparison (no AR, distillation, sampling)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads per run (1 was fastest on a shared 2-core machine)')
    parser.add_argument('--work-dir', default='outputs/bench_duo_small_scale')
    parser.add_argument('--out', default=str(ROOT / 'bench' / 'results' / 'duo_small_scale.json'))
    args = parser.parse_args()
    work, run = open_work_dir(args.work_dir, args.threads)
    started = time.perf_counter()

    curriculum_gammas, curriculum_alphas = mapped_gammas(PAPER_CURRICULUM)
    distill_gammas, distill_alphas = mapped_gammas(PAPER_DISTILLATION)
    eval_batch = 64
    common = common_overrides(work, eval_batch)
    training = training_overrides(args.steps)
    seed = args.seeds[0]
    common_seed = [*common, f'seed={seed}']
    dirs = {name: work / name for name in ('ar', *COMPARED, 'distilled')}
    duo = ['algo=duo', f'algo.curriculum_end={args.steps // 2}', f'algo.gamma_min={curriculum_gammas[0]}',
           f'algo.gamma_max={curriculum_gammas[1]}']
    algos = {'ar': ['algo=ar'], 'duo_base': ['algo=duo_base'], 'duo': duo,
             'duo_topk': [*duo, 'algo.curriculum.mode=poly9', f'algo.curriculum.top_k={args.top_k}']}

    def train_and_evaluate(name, algo, seed_value, run_dir):
        """(ppl_eval.json, validation curve) of one training run."""
        seeded = [*common, f'seed={seed_value}']
        run(f'train_{name}', 'mode=train', *algo, *seeded, *training, f'hydra.run.dir={run_dir}')
        curve = val_curve(run_dir)
        run(f'ppl_eval_{name}', 'mode=ppl_eval', *algo, *seeded, f'trainer.limit_val_batches={args.val_batches}',
            f'hydra.run.dir={run_dir}')
        return json.loads((run_dir / 'ppl_eval.json').read_text()), curve

    ppl, curves = {}, {}
    for name in COMPARED if args.curricula_only else ('ar', *COMPARED):
        ppl[name], curves[name] = train_and_evaluate(name, algos[name], seed, dirs[name])
    curriculum = [{'seed': seed, **{name: ppl[name]['nll'] for name in COMPARED},
                   'train_seconds': {name: run.seconds[f'train_{name}'] for name in COMPARED}}]
    for other in args.seeds[1:]:
        nll = {name: train_and_evaluate(f'{name}_seed{other}', algos[name], other, work / f'{name}_seed{other}')[0]['nll']
               for name in COMPARED}
        curriculum.append({'seed': other, **nll,
                           'train_seconds': {name: run.seconds[f'train_{name}_seed{other}'] for name in COMPARED}})
    if args.curricula_only:
        report = {'benchmark': 'duo_small_scale', 'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
                  'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch': torch.__version__,
                              'threads_per_run': args.threads, 'load_avg': os.getloadavg()},
                  'settings': {**vars(args), 'corpus': str(CORPUS), 'vocab_size': K,
                               'model': 'd=96, 3 blocks, 4 heads, L=64', 'batch': 32,
                               'curriculum_gammas': curriculum_gammas, 'curriculum_alphas': curriculum_alphas,
                               'validation_tokens': ppl['duo']['tokens']},
                  'validation': {name: {'nll': r['nll'], 'ppl': r['ppl'], 'curve': curves[name]} for name, r in ppl.items()},
                  'curriculum_vs_base': curriculum,
                  'seconds': {**run.seconds, 'total': round(time.perf_counter() - started, 1)}}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + '\n')
        print_comparison(curriculum, args.steps, ppl['duo']['tokens'])
        print(f'\nTotal {report["seconds"]["total"] / 60:.1f} min; wrote {out}')
        return

    distill_steps = args.rounds * args.round_steps
    distillation = ['algo=distillation', f'algo.T={args.T}', f'algo.update_teacher_every={args.round_steps}',
                    f'algo.gamma_min={distill_gammas[0]}', f'algo.gamma_max={distill_gammas[1]}']
    run('train_distilled', 'mode=train', *distillation, *common_seed, f'optim.lr={args.distill_lr}',
        'lr_scheduler.num_warmup_steps=0', 'training.ema=0.99', f'trainer.max_steps={distill_steps}',
        f'trainer.val_check_interval={args.round_steps}', 'trainer.limit_val_batches=8',
        f'checkpointing.every_n_train_steps={distill_steps}',
        f'training.finetune_path={dirs["duo"] / "checkpoints" / "last.ckpt"}', f'hydra.run.dir={dirs["distilled"]}')
    curves['distilled'] = val_curve(dirs['distilled'])
    run('ppl_eval_distilled', 'mode=ppl_eval', *distillation, *common_seed, f'trainer.limit_val_batches={args.val_batches}',
        f'hydra.run.dir={dirs["distilled"]}')
    ppl['distilled'] = json.loads((dirs['distilled'] / 'ppl_eval.json').read_text())

    judge = dirs['ar'] / 'checkpoints' / 'last.ckpt'
    torch.set_num_threads(args.threads)
    data_ppl, data_entropy = data_reference(common_seed, judge, args.samples)
    sampling = [{'model': 'data', 'steps': None, 'noise_removal': None, 'generative_ppl': data_ppl,
                 'entropy': data_entropy, 'samples': args.samples}]
    for model, steps, removal in (('ar', None, None), ('duo', 8, 'ancestral'), ('distilled', 8, 'ancestral'),
                                  ('duo', 8, 'greedy'), ('distilled', 8, 'greedy'), ('duo', 64, 'ancestral'),
                                  ('distilled', 64, 'ancestral')):
        name = f'sample_{model}' + (f'_{steps}_{removal}' if steps else '')
        out = work / f'{name}.json'
        algo = distillation if model == 'distilled' else algos[model]
        run(name, 'mode=sample_eval', *algo, *common_seed, f'sampling.steps={steps or 8}',
            f'sampling.noise_removal={removal or "ancestral"}',  # (AR ignores both: one token per step)
            f'sampling.num_sample_batches={max(args.samples // eval_batch, 1)}',
            f'eval.gen_ppl_eval_model_name_or_path={judge}', f'eval.generated_samples_path={out}',
            f'hydra.run.dir={dirs[model]}')
        result = json.loads(out.read_text())
        sampling.append({'model': model, 'steps': steps, 'noise_removal': removal,
                         'generative_ppl': result['generative_ppl'], 'entropy': result['entropy'],
                         'samples': len(result['generated_seqs']), 'example': result['generated_seqs'][0]})

    report = {
        'benchmark': 'duo_small_scale',
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'machine': {'platform': platform.platform(), 'cpus': os.cpu_count(), 'torch': torch.__version__,
                    'threads_per_run': args.threads},
        'settings': {**vars(args), 'corpus': str(CORPUS), 'vocab_size': K, 'model': 'd=96, 3 blocks, 4 heads, L=64',
                     'batch': 32, 'curriculum_gammas': curriculum_gammas, 'curriculum_alphas': curriculum_alphas,
                     'distillation_gammas': distill_gammas, 'distillation_alphas': distill_alphas,
                     'validation_tokens': ppl['duo']['tokens']},
        'validation': {name: {'nll': r['nll'], 'ppl': r['ppl'], 'curve': curves[name]}
                       for name, r in ppl.items()},
        'curriculum_vs_base': curriculum,
        'sampling': sampling,
        'seconds': {**run.seconds, 'total': round(time.perf_counter() - started, 1)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + '\n')

    print(f'\nValidation (nats/char; AR exact NLL, diffusion models the exact DUO-base bound; '
          f'{ppl["duo"]["tokens"]} tokens, same noise):')
    print(f'  {"model":<12}{"steps":>7}{"nll":>9}{"ppl":>9}   during training (step: nll, EMA weights, 8 batches)')
    for name, steps in (('ar', args.steps), ('duo_base', args.steps), ('duo', args.steps), ('duo_topk', args.steps),
                        ('distilled', args.steps + distill_steps)):
        r = report['validation'][name]
        curve = ', '.join(f'{s}: {v:.3f}' for s, v in r['curve'])
        print(f'  {name:<12}{steps:>7}{r["nll"]:>9.4f}{r["ppl"]:>9.3f}   {curve}')
    print('  (the distilled model\'s steps count from the DUO checkpoint it starts from)')
    print_comparison(curriculum, args.steps, ppl['duo']['tokens'])
    print(f'\nSamples ({args.samples} x 64 chars), generative perplexity under the AR judge '
          f'(its own validation perplexity: {ppl["ar"]["ppl"]:.3f}):')
    print(f'  {"model":<12}{"steps":>7}  {"noise removal":<14}{"gen ppl":>9}{"entropy":>9}')
    for s in sampling:
        steps = s['steps'] or ('-' if s['model'] == 'data' else 'L')
        print(f'  {s["model"]:<12}{steps:>7}  {s["noise_removal"] or "-":<14}{s["generative_ppl"]:>9.3f}'
              f'{s["entropy"]:>9.3f}')
    print(f'\nTotal {report["seconds"]["total"] / 60:.1f} min; wrote {out}')


if __name__ == '__main__':
    main()
