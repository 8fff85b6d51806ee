"""Train, evaluate and sample DUO on Kaggle (or any machine) with one command.

    python kaggle_train.py [--model small] [--algo duo_base] [--subset 11000] [--steps N]
                           [--data-files PATH ...] [--dry-run] [extra Hydra overrides ...]

What it does, in order (each main.py command is printed before it runs):
 1. runs the setup checks (test_kaggle_setup.py);
 2. plans the run: devices (two GPUs -> DDP), precision (bf16 on Ampere+, fp16 with loss scaling
    on older GPUs, fp32 on the CPU), attention backend (FlashAttention or SDPA), the largest
    per-device batch that fits (an analytic memory model, hardware.py, confirmed on a GPU by a
    short probe) and the gradient accumulation that reaches --global-batch-size;
 3. trains with `python main.py mode=train ...`, stopping cleanly (last.ckpt saved) before
    --time-limit; re-running the same command resumes from the last checkpoint;
 4. evaluates the likelihood bound (mode=ppl_eval) and draws samples (mode=sample_eval);
 5. prints a summary and writes, in the run directory: loss_curve.png (from logs/metrics.csv),
    samples.txt, summary.json (next to ppl_eval.json, samples.json and checkpoints/).

Outputs go to --output-dir (default /kaggle/working when it exists, else ./outputs), in
<output-dir>/<run name>/. Weights & Biases stays off (CSV logs) unless --wandb offline|online.
--dry-run prints the plan and the exact commands and runs nothing (with --assume-gpu t4x2 it
plans for hardware this machine does not have). Arguments that are not flags are Hydra
overrides passed to every main.py command (last, so they win), e.g. `optim.lr=1e-4`.
"""
import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import HydraException

import checkpoints
import dataloader
import hardware
import runtime
from atomic import atomic_write

ROOT = Path(__file__).resolve().parent
KAGGLE_WORKING = Path('/kaggle/working')
DEFAULT_TIME_LIMIT = '11:30:00'     # Kaggle stops a session at 12 h; leave room for setup cells
DEFAULT_EVAL_RESERVE = '00:20:00'   # kept for ppl_eval, sample_eval and the summary
GPU_DEFAULTS = {'model': 'small', 'length': 512, 'global_batch_size': 64, 'num_samples': 8}
CPU_DEFAULTS = {'model': 'micro', 'length': 128, 'global_batch_size': 4, 'num_samples': 4, 'eval_batches': 10}
STAGES = ('train', 'eval', 'sample')
MAIN_MODES = {'train': 'train', 'eval': 'ppl_eval', 'sample': 'sample_eval'}


class UsageError(ValueError):
    """A flag value that cannot work; the message names it and a valid example."""


# ---- arguments -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='model size: tiny | small | medium (GPU default small) | micro (CPU default)')
    p.add_argument('--algo', default='duo_base', help='ar | mdlm | duo_base | duo | distillation (default duo_base)')
    p.add_argument('--subset', default='11000',
                   help='OWT_SUBSET_NUM: first N documents, 90%% train / 10%% validation; "all" for everything '
                        '(default 11000)')
    p.add_argument('--data-files', nargs='+', metavar='PATH',
                   help='local .parquet/.jsonl/.txt files (paths or globs) standing in for OpenWebText '
                        '(default: stream it from the Hugging Face hub)')
    p.add_argument('--steps', type=int, help='training steps (default: train until --time-limit)')
    p.add_argument('--length', type=int, help='sequence length (default 512 on a GPU, 128 on the CPU)')
    p.add_argument('--batch-size', type=int, help='per-device batch (default: the largest that fits)')
    p.add_argument('--global-batch-size', type=int,
                   help='sequences per optimizer step (default 64 on a GPU, 4 on the CPU; the papers use 512)')
    p.add_argument('--output-dir', help='default /kaggle/working when it exists, else ./outputs')
    p.add_argument('--run-name', help='default <data>-<algo>-<model>-L<length>')
    p.add_argument('--time-limit', default=DEFAULT_TIME_LIMIT,
                   help=f'wall-clock limit of this command, [[DD:]HH:]MM:SS or e.g. 11.5h / 90m (default {DEFAULT_TIME_LIMIT})')
    p.add_argument('--eval-reserve', default=DEFAULT_EVAL_RESERVE,
                   help=f'time kept after training for evaluation and sampling when they follow in the same '
                        f'command (default {DEFAULT_EVAL_RESERVE})')
    p.add_argument('--stages', default='train,eval,sample',
                   help='what to run, comma-separated: train, eval (ppl_eval), sample (sample_eval); '
                        'default all three (a notebook can run them cell by cell)')
    p.add_argument('--resume-from', metavar='PATH',
                   help="a previous session's run directory or last.ckpt (e.g. under /kaggle/input/...) to continue")
    p.add_argument('--checkpoint-every', type=int, default=1000, help='steps between periodic checkpoints (default 1000)')
    p.add_argument('--eval-batches', type=int,
                   help='validation batches for the bound (default all on a GPU, 10 on the CPU)')
    p.add_argument('--num-samples', type=int, help='sequences to sample (default 8 on a GPU, 4 on the CPU)')
    p.add_argument('--sampling-steps', type=int, default=8, help='sampling steps (default 8)')
    p.add_argument('--noise-removal', default='greedy', help='ancestral | greedy | none (default greedy: Greedy-Tail)')
    p.add_argument('--gen-ppl-model', default='gpt2-large',
                   help='judge of generative perplexity, hub id or local directory (default gpt2-large; '
                        'skipped offline unless a local directory)')
    p.add_argument('--wandb', choices=('off', 'offline', 'online'), default='off',
                   help='Weights & Biases logging besides the CSV logs (default off; offline never uploads)')
    p.add_argument('--offline', action='store_true',
                   help='no Hugging Face hub: skip hub checks and hub downloads (automatic when it is unreachable)')
    p.add_argument('--skip-checks', action='store_true', help='do not run test_kaggle_setup.py first')
    p.add_argument('--no-probe', action='store_true', help='trust the memory estimate; no GPU probe')
    p.add_argument('--dry-run', action='store_true', help='print the plan and the exact commands; run nothing')
    p.add_argument('--assume-gpu', metavar='KIND',
                   help=f"with --dry-run: plan for {', '.join(hardware.PRESETS)} or cpu, optionally xN "
                        f"(e.g. t4x2 = Kaggle's two T4s)")
    p.add_argument('--probe-worker', help=argparse.SUPPRESS)  # internal: the GPU probe's child process
    return p


def parse_args(argv=None):
    """(flags, Hydra overrides): anything that is not a flag must look like key=value."""
    args, rest = build_parser().parse_known_args(argv)
    if args.data_files:  # nargs='+' also swallows the overrides that follow --data-files
        override = re.compile(r'[+~]?[A-Za-z_][\w.]*=')
        rest += [f for f in args.data_files if override.match(f)]
        args.data_files = [f for f in args.data_files if not override.match(f)] or None
    unknown = [a for a in rest if a.startswith('-') or '=' not in a]
    if unknown:
        raise UsageError(f'{unknown[0]} is neither a flag of kaggle_train.py nor a Hydra override key=value '
                         f'(e.g. optim.lr=1e-4); see python kaggle_train.py --help')
    if args.assume_gpu and not args.dry_run:
        raise UsageError(f'--assume-gpu={args.assume_gpu} plans for hardware this machine lacks: use it with --dry-run')
    stages = [x.strip() for x in args.stages.split(',') if x.strip()]
    if not stages or set(stages) - set(STAGES):
        raise UsageError(f"--stages={args.stages} must list some of {', '.join(STAGES)} (e.g. --stages train,eval,sample)")
    args.stages = [x for x in STAGES if x in stages]
    for name in ('steps', 'length', 'batch_size', 'global_batch_size', 'eval_batches', 'num_samples',
                 'sampling_steps', 'checkpoint_every'):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = '--' + name.replace('_', '-')
            raise UsageError(f'{flag}={value} must be >= 1 (e.g. {flag}=8)')
    return args, rest


def parse_duration(text: str, flag: str) -> int:
    """'11:30:00', '1:00:00:00' (DD:HH:MM:SS), '90:00' (MM:SS), '11.5h', '45m', '30s' -> seconds."""
    s = str(text).strip().lower()
    try:
        if s and s[-1] in 'hms' and ':' not in s:
            seconds = float(s[:-1]) * {'h': 3600, 'm': 60, 's': 1}[s[-1]]
        else:
            parts = [float(x) for x in s.split(':')]
            if not 1 <= len(parts) <= 4 or any(x < 0 for x in parts):
                raise ValueError
            seconds = sum(x * unit for x, unit in zip(reversed(parts), (1, 60, 3600, 86400)))
    except ValueError:
        raise UsageError(f'{flag}={text} is not a duration: use HH:MM:SS, DD:HH:MM:SS or e.g. 11.5h / 45m '
                         f'(e.g. {flag}=11:30:00)') from None
    if seconds < 0:
        raise UsageError(f'{flag}={text} must not be negative (e.g. {flag}=11:30:00)')
    return int(seconds)


def format_max_time(seconds: int) -> str:
    """Seconds -> Lightning's trainer.max_time DD:HH:MM:SS."""
    seconds = max(int(seconds), 1)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    return f'{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}'


def hydra_value(value) -> str:
    """A value for a Hydra override: plain when the grammar allows it, else single-quoted."""
    text = str(value)
    if text and all(c.isalnum() or c in '/._-*?~+:@%' for c in text):
        return text
    # Hydra's quoted strings: backslashes are literal except before a quote or at the end,
    # where they are doubled; the quote itself is escaped.
    quoted = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ('\\' + m[2] if m[2] else ''), text)
    return "'" + quoted + "'"


def hydra_list(values) -> str:
    return '[' + ','.join(hydra_value(v) for v in values) + ']'


def default_output_dir() -> Path:
    return KAGGLE_WORKING if KAGGLE_WORKING.is_dir() else Path.cwd() / 'outputs'


# ---- the plan ------------------------------------------------------------------------------
@dataclass
class Plan:
    device: hardware.Device
    model: str
    algo: str
    length: int
    shape: hardware.ModelShape
    precision: str
    attn_backend: str
    batch: hardware.BatchPlan
    steps: int | None
    subset: int | None
    data_files: list | None
    output_dir: Path
    run_dir: Path
    time_limit: int
    eval_reserve: int
    eval_batches: int | None
    num_samples: int
    sample_batch: int
    gen_ppl: bool
    warmup: int | None = None  # a shorter learning-rate warmup for short runs
    overrides: list = field(default_factory=list)
    probe: dict | None = None

    @property
    def last_ckpt(self) -> Path:
        return self.run_dir / 'checkpoints' / 'last.ckpt'


def compose_config(overrides: list[str]):
    """The configuration main.py would see (Hydra's own hydra.* keys left out): checks the
    overrides before anything runs and gives the model and data settings the plan needs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose('config', overrides=[o for o in overrides if not o.lstrip('+~').startswith('hydra.')])


def vocab_size(config) -> int:
    return dataloader.model_vocab(dataloader.get_tokenizer(config))[0]


def model_choices() -> list[str]:
    return sorted(p.stem for p in (ROOT / 'configs' / 'model').glob('*.yaml'))


def make_plan(args, overrides, device: hardware.Device) -> Plan:
    defaults = GPU_DEFAULTS if device.is_gpu else CPU_DEFAULTS
    model = args.model or defaults['model']
    if model not in model_choices():
        raise UsageError(f"--model={model} is unknown: use one of {', '.join(model_choices())} (e.g. --model small)")
    algos = sorted(p.stem for p in (ROOT / 'configs' / 'algo').glob('*.yaml'))
    if args.algo not in algos:
        raise UsageError(f"--algo={args.algo} is unknown: use one of {', '.join(algos)} (e.g. --algo duo_base)")
    subset = None if str(args.subset).lower() in ('all', 'none', '0') else args.subset
    if subset is not None:
        subset = dataloader.parse_subset(subset, '--subset')
    output_dir = Path(args.output_dir).expanduser().resolve() if args.output_dir else default_output_dir()
    base = [f'algo={args.algo}', f'model={model}']
    config = compose_config(base + overrides)
    length = args.length or (defaults['length'] if device.is_gpu else min(defaults['length'], int(config.model.length)))
    config = compose_config(base + [f'model.length={length}'] + overrides)
    # Explicit overrides (model=..., model.length=..., algo=...) win over the flags.
    model, length, algo = str(config.model.name), int(config.model.length), str(config.algo.name)
    precision = hardware.precision_for(device)
    global_batch = args.global_batch_size or defaults['global_batch_size']
    shape = hardware.ModelShape.from_config(config.model, vocab_size(config), algo)
    batch = hardware.plan_batch(device, shape, algo, precision, global_batch, args.batch_size,
                                ema=float(config.training.ema) > 0)
    data_tag = ('local' if args.data_files else 'owt') + (str(subset) if subset else '')
    run_name = args.run_name or f'{data_tag}-{algo}-{model}-L{length}'
    num_samples = args.num_samples or defaults['num_samples']
    # The configured warmup (2,500 steps) is for long runs: a run of fewer than ten times that
    # many steps warms up over its first 10% instead, or it would end before reaching optim.lr.
    warmup = int(config.lr_scheduler.num_warmup_steps)
    short_warmup = max(args.steps // 10, 1) if args.steps and args.steps < 10 * warmup else None
    gen_ppl = not args.offline or Path(args.gen_ppl_model).expanduser().is_dir()
    return Plan(device=device, model=model, algo=algo, length=length, shape=shape, precision=precision,
                attn_backend=hardware.attn_backend_for(device), batch=batch, steps=args.steps, subset=subset,
                data_files=args.data_files, output_dir=output_dir, run_dir=output_dir / run_name,
                time_limit=parse_duration(args.time_limit, '--time-limit'),
                eval_reserve=(parse_duration(args.eval_reserve, '--eval-reserve')
                              if set(args.stages) - {'train'} else 0),
                eval_batches=args.eval_batches or (None if device.is_gpu else defaults['eval_batches']),
                num_samples=num_samples, sample_batch=hardware.sample_batch_for(device, shape, num_samples),
                gen_ppl=gen_ppl, warmup=short_warmup, overrides=overrides)


def common_overrides(plan: Plan, eval_batch_size: int) -> list[str]:
    out = [f'algo={plan.algo}', f'model={plan.model}', f'model.length={plan.length}',
           f'model.attn_backend={plan.attn_backend}', f'trainer.precision={plan.precision}']
    if plan.device.is_gpu:
        out += ['trainer.accelerator=gpu', f'trainer.devices={plan.device.count}']
        if plan.device.count > 1:
            out.append('strategy=ddp')
    else:
        out += ['trainer.accelerator=cpu', 'trainer.devices=1']
    if plan.data_files:
        files = plan.data_files
        out.append('data.data_files=' + (hydra_value(files[0]) if len(files) == 1 else hydra_list(files)))
    out += [f'loader.batch_size={plan.batch.batch_size}',
            f'loader.global_batch_size={plan.batch.global_batch_size}',
            f'loader.eval_batch_size={eval_batch_size}']
    if plan.eval_batches:
        out.append(f'trainer.limit_val_batches={plan.eval_batches}')
    out.append(f'hydra.run.dir={hydra_value(plan.run_dir)}')
    return out


def main_commands(plan: Plan, args, train_seconds: int) -> dict:
    """{stage: main.py argv} for the stages of --stages (the user's overrides last)."""
    common = common_overrides(plan, plan.batch.eval_batch_size)
    ckpt = f'eval.checkpoint_path={hydra_value(plan.last_ckpt)}'
    train = ['mode=train', *common, f'trainer.max_time={format_max_time(train_seconds)}',
             f'checkpointing.every_n_train_steps={args.checkpoint_every}',
             'checkpointing.keep_last=1']
    if plan.steps:
        train.append(f'trainer.max_steps={plan.steps}')
    if plan.warmup is not None:
        train.append(f'lr_scheduler.num_warmup_steps={plan.warmup}')
    if args.wandb == 'offline':
        train.append('+wandb.offline=true')
    elif args.wandb == 'online':
        train.append('wandb.enabled=true')
    sample = ['mode=sample_eval', *common_overrides(plan, plan.sample_batch), ckpt,
              f'sampling.steps={args.sampling_steps}', f'sampling.noise_removal={args.noise_removal}',
              f'sampling.num_sample_batches={math.ceil(plan.num_samples / plan.sample_batch)}',
              f'eval.compute_generative_perplexity={str(plan.gen_ppl).lower()}']
    if plan.gen_ppl:
        sample.append(f'eval.gen_ppl_eval_model_name_or_path={hydra_value(args.gen_ppl_model)}')
    commands = {'train': train + plan.overrides, 'eval': ['mode=ppl_eval', *common, ckpt, *plan.overrides],
                'sample': sample + plan.overrides}
    return {stage: commands[stage] for stage in args.stages}


def child_env(plan: Plan, args) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.pop('OWT_SUBSET_NUM', None)
    if plan.subset:
        env['OWT_SUBSET_NUM'] = str(plan.subset)
    if args.wandb != 'online':
        env['WANDB_MODE'] = 'offline'
    if args.offline:  # without these a hub call retries for a minute before failing
        env.update(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    return env


def shown_env(plan: Plan, args) -> str:
    parts = []
    if plan.subset:
        parts.append(f'OWT_SUBSET_NUM={plan.subset}')
    if args.wandb != 'online':
        parts.append('WANDB_MODE=offline')
    if args.offline:
        parts.append('HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1')
    return ' '.join(parts)


def print_plan(plan: Plan, args, commands: dict, train_seconds: int):
    d, b, s = plan.device, plan.batch, plan.shape
    gib = hardware.GIB
    data = ('local files ' + ' '.join(plan.data_files)) if plan.data_files else 'OpenWebText from the Hugging Face hub'
    if plan.subset:
        n_train, n_valid = dataloader.subset_split(plan.subset)
        data += f', first {plan.subset} documents ({n_train} train / {n_valid} validation)'
    lines = [
        'Plan' + ('  [simulated hardware: --assume-gpu]' if d.simulated else ''),
        f'  device      : {d.describe()}',
        f"  strategy    : {'DDP, one process per GPU' if d.is_gpu and d.count > 1 else 'one process'}",
        f'  precision   : {plan.precision} = {hardware.precision_reason(d)}',
        f'  attention   : {plan.attn_backend} = {hardware.attn_reason(d)}',
        f'  model       : {plan.model}, {hardware.param_count(s) / 1e6:.1f}M parameters (K={s.vocab_size}), '
        f'length {plan.length}, algo {plan.algo}',
        f'  batch       : {b.batch_size} per device x {b.world} device(s) x {b.accumulation} accumulation '
        f'= {b.global_batch_size} sequences per step',
        f'  memory      : estimated peak {b.estimate.total / gib:.2f} GiB of a {b.budget / gib:.2f} GiB budget '
        f'per device ({b.estimate.describe()})',
    ]
    if b.note:
        lines.append(f'  WARNING     : --batch-size={b.batch_size}: {b.note}')
    if plan.probe:
        lines.append(f"  probe       : {plan.probe['message']}")
    elif d.is_gpu and not args.no_probe:
        lines.append('  probe       : a forward+backward+step at this batch on the GPU before training (halved on OOM)')
    lines += [
        f'  evaluation  : batch {b.eval_batch_size} per device'
        + (f', first {plan.eval_batches} validation batches' if plan.eval_batches else ', whole validation split'),
        f'  sampling    : {plan.num_samples} sequences in batches of {plan.sample_batch}, {args.sampling_steps} steps, '
        f'noise removal {args.noise_removal}; generative perplexity '
        + (f'by {args.gen_ppl_model}' if plan.gen_ppl else 'skipped (offline)'),
        f'  data        : {data}',
        f'  output      : {plan.run_dir}  (tokenized cache: {dataloader.resolve_cache_dir({})})',
        f'  time        : limit {format_max_time(plan.time_limit)} (DD:HH:MM:SS)'
        + (f'; training stops after {format_max_time(train_seconds)}' if 'train' in args.stages else '')
        + (f', {format_max_time(plan.eval_reserve)} kept for evaluation' if plan.eval_reserve else ''),
        f"  steps       : {plan.steps if plan.steps else 'until the time limit'}"
        + (f', learning-rate warmup {plan.warmup} steps (10%)' if plan.warmup is not None else '')
        + (f'; resuming from {plan.last_ckpt}' if plan.last_ckpt.exists() else ''),
        '',
        'Commands',
    ]
    env = shown_env(plan, args)
    for name, argv in commands.items():
        lines.append('  ' + (env + ' ' if env else '') + shlex.join(['python', 'main.py', *argv]))
    print('\n'.join(lines), flush=True)


# ---- running -------------------------------------------------------------------------------
def run_child(argv: list[str], env: dict, timeout: float | None = None) -> int:
    """Run a command in its own process group (DDP ranks included); on timeout stop them all."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f'\n!! {Path(argv[1]).name} ran past the time limit; stopping it', flush=True)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait()
        raise


def detect_device() -> hardware.Device:
    """hardware.detect() in a child process: the parent never holds a CUDA context."""
    out = subprocess.run([sys.executable, str(ROOT / 'hardware.py')], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f'hardware detection failed:\n{out.stderr[-2000:]}')
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info['capability'] = tuple(info['capability']) if info['capability'] else None
    return hardware.Device(**info)


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step of a checkpoint (read safely, weights left on disk); None when there is none."""
    return checkpoints.read_progress(path)[0] if path.is_file() else None


def import_previous(plan: Plan, source: str):
    """Copy a previous session's last.ckpt (and its metrics log) into the run directory, unless the
    run directory already holds a checkpoint at least as far along."""
    src = Path(source).expanduser()
    # a last.ckpt, a run directory, or the output directory holding this run's directory (a saved
    # notebook version's /kaggle/input/<notebook>/ or .../duo-runs/)
    candidates = [src] if src.is_file() else [src / 'checkpoints' / 'last.ckpt',
                                              src / plan.run_dir.name / 'checkpoints' / 'last.ckpt']
    ckpt = next((c for c in candidates if c.is_file()), None)
    if ckpt is None:
        raise UsageError(f'--resume-from={source} has no checkpoint: give a last.ckpt, a run directory '
                         f'containing checkpoints/last.ckpt, or the folder holding {plan.run_dir.name}/ '
                         f'(e.g. /kaggle/input/<notebook>/duo-runs)')
    src = ckpt.parent.parent
    theirs, ours = checkpoint_step(ckpt), checkpoint_step(plan.last_ckpt)
    if ours is not None and ours >= theirs:
        print(f'Resume: {plan.last_ckpt} (step {ours}) is not behind {ckpt} (step {theirs}); keeping it')
        return
    plan.last_ckpt.parent.mkdir(parents=True, exist_ok=True)
    with open(ckpt, 'rb') as f:
        atomic_write(plan.last_ckpt, lambda out: shutil.copyfileobj(f, out, 16 * 2 ** 20))
    history = src / 'logs' / 'metrics.csv'
    if history.is_file():  # main.py continues it from the checkpoint's step
        (plan.run_dir / 'logs').mkdir(parents=True, exist_ok=True)
        shutil.copyfile(history, plan.run_dir / 'logs' / 'metrics.csv')
    print(f'Resume: copied {ckpt} (step {theirs}) to {plan.last_ckpt}')


def probe(plan: Plan, args) -> dict:
    """Confirm the planned batch on the GPU in a child process (a forward+backward+step at that
    batch, halving on out-of-memory); returns {'batch', 'peak', 'message'}."""
    spec = {'overrides': common_overrides(plan, plan.batch.eval_batch_size) + plan.overrides, 'batch': plan.batch.batch_size,
            'per_device': plan.batch.global_batch_size // plan.batch.world, 'world': plan.batch.world}
    out = subprocess.run([sys.executable, str(ROOT / 'kaggle_train.py'), '--probe-worker', json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT, env=child_env(plan, args))
    lines = [line for line in out.stdout.splitlines() if line.startswith('{')]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f'the GPU probe failed:\n{out.stderr[-3000:]}')
    return json.loads(lines[-1])


def probe_worker(spec_json: str):
    """Child process of probe(): try the batch, then smaller divisors on out-of-memory."""
    import torch

    import main as duo_main
    import settings
    from diffusion import StepRunner
    spec = json.loads(spec_json)
    config = settings.resolve(compose_config(['mode=train'] + spec['overrides']))
    module = duo_main.build_model(config, dataloader.get_tokenizer(config)).cuda()
    runner = StepRunner(module)
    n_params = sum(p.numel() for p in module.backbone.parameters())
    ddp_buckets = torch.empty(n_params if spec['world'] > 1 else 0, device='cuda')  # DDP's gradient copy
    K, L = module.vocab_size, int(config.model.length)
    total = torch.cuda.get_device_properties(0).total_memory
    batch = spec['batch']
    while batch is not None:
        torch.cuda.reset_peak_memory_stats()
        try:
            x = torch.randint(0, K - 1, (batch, L), device='cuda')
            data = {'input_ids': x, 'attention_mask': torch.ones_like(x)}
            # two micro-batches: the second runs with the first one's gradients alive
            runner.step([data, data], sync=torch.cuda.synchronize)
            fitted = True
        except torch.cuda.OutOfMemoryError:
            fitted = False
        if fitted:
            peak = torch.cuda.max_memory_reserved()
            print(json.dumps({'batch': batch, 'peak': peak, 'total': total,
                              'message': f'batch {batch} ran a forward+backward+step; peak {peak / hardware.GIB:.2f} '
                                         f'GiB reserved of {total / hardware.GIB:.2f} GiB'}))
            return
        # Outside the except block: the traceback, and the activations its frames held, are gone.
        x = data = None
        runner.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        print(f'batch {batch}: out of memory', file=sys.stderr)
        batch = hardware.smaller_batch(batch, spec['per_device'])
    del ddp_buckets
    print(json.dumps({'batch': None, 'peak': None, 'total': total,
                      'message': 'even batch 1 ran out of memory'}))


def apply_probe(plan: Plan, result: dict):
    if result['batch'] is None:
        raise hardware.PlanError(f'{plan.model} at length {plan.length} does not fit on {plan.device.describe()} '
                                 f'even with batch 1: use a smaller --model or --length')
    if result['batch'] != plan.batch.batch_size:
        b = plan.batch
        result['message'] += f' (the planned batch {b.batch_size} ran out of memory)'
        b.batch_size = result['batch']
        b.accumulation = b.global_batch_size // (b.world * b.batch_size)
        b.eval_batch_size = min(b.eval_batch_size, b.batch_size)
    plan.probe = result


# ---- after training ------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path, newline='') as f:
        return [r for r in csv.DictReader(f) if r.get('step') not in (None, '')]


def plot_history(history: Path, png: Path, title: str) -> bool:
    """loss_curve.png: training loss (and the validation bound when logged) against the step."""
    rows = read_csv(history)
    series = {}
    for key, label in (('train/loss', 'training loss'), ('val/nll', 'validation NLL bound')):
        points = sorted((float(r['step']), float(r[key])) for r in rows if r.get(key) not in (None, ''))
        if points:
            series[label] = points
    if not series:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        xs, ys = zip(*points)
        # markers where there are few points: a line of one point draws nothing
        ax.plot(xs, ys, marker='o' if label.startswith('validation') or len(xs) < 50 else None, label=label)
    ax.set_xlabel('step')
    ax.set_ylabel('nats per token')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True


def write_samples(samples_json: Path, out: Path) -> list[str]:
    texts = json.loads(samples_json.read_text()).get('generated_seqs') or []
    out.write_text(''.join(f'=== sample {i + 1} ===\n{t}\n\n' for i, t in enumerate(texts)))
    return texts


def summarize(plan: Plan, started: float, notes: list[str]) -> dict:
    run = plan.run_dir
    summary = {'run_dir': str(run), 'algo': plan.algo, 'model': plan.model, 'length': plan.length,
               'device': plan.device.describe(), 'precision': plan.precision, 'attn_backend': plan.attn_backend,
               'batch_size': plan.batch.batch_size, 'accumulation': plan.batch.accumulation,
               'global_batch_size': plan.batch.global_batch_size, 'steps_trained': checkpoint_step(plan.last_ckpt),
               'target_steps': plan.steps, 'wall_seconds': round(time.time() - started, 1), 'notes': notes}
    for name, key in (('ppl_eval.json', 'ppl_eval'), ('samples.json', 'samples')):
        path = run / name
        if path.is_file():
            result = json.loads(path.read_text())
            summary[key] = {k: v for k, v in result.items() if k != 'generated_seqs'}
    history = run / 'logs' / 'metrics.csv'  # main.py continues it across resumed sessions
    png = run / 'loss_curve.png'
    if history.is_file() and plot_history(history, png, run.name):
        summary['loss_curve'] = str(png)
    entropy = summary.get('samples', {}).get('entropy')
    if entropy is not None and entropy < 1.0:  # real text: about 5.5 nats over 1024 tokens (SPEC §10)
        notes.append(f'the samples have entropy {entropy:.2f}: an undertrained model predicts the most frequent '
                     f'tokens, and Greedy-Tail\'s final argmax repeats them; train longer or try '
                     f'--noise-removal ancestral')
    if (run / 'samples.json').is_file():
        texts = write_samples(run / 'samples.json', run / 'samples.txt')
        summary['samples_txt'] = str(run / 'samples.txt')
        summary['num_samples'] = len(texts)
    from main import write_json
    write_json(run / 'summary.json', summary)
    return summary


def print_summary(summary: dict):
    ppl, samples = summary.get('ppl_eval', {}), summary.get('samples', {})
    lines = ['', '=' * 72, f"Summary: {summary['run_dir']}",
             f"  trained     : {summary['steps_trained']} steps"
             + (f" of {summary['target_steps']}" if summary['target_steps'] else '')
             + f" ({summary['model']}, {summary['algo']}, L={summary['length']}, {summary['precision']}, "
               f"batch {summary['batch_size']} x accumulation {summary['accumulation']})"]
    if ppl:
        lines.append(f"  likelihood  : NLL bound {ppl['nll']:.4f} nats/token, PPL <= {ppl['ppl']:.2f}, "
                     f"{ppl['bpd']:.4f} bits/token over {ppl['tokens']} tokens")
    if samples:
        gen = samples.get('generative_ppl')
        lines.append(f"  samples     : {summary.get('num_samples', '?')} in {samples.get('steps')} steps, entropy "
                     f"{samples['entropy']:.3f}" + (f', generative PPL {gen:.2f}' if gen is not None else ''))
    for key, label in (('loss_curve', 'loss curve'), ('samples_txt', 'samples')):
        if key in summary:
            lines.append(f'  {label:<12}: {summary[key]}')
    lines += [f'  {note}' for note in summary['notes']]
    lines.append(f"  wall time   : {summary['wall_seconds'] / 60:.1f} min")
    print('\n'.join(lines + ['=' * 72]), flush=True)


# ---- main ----------------------------------------------------------------------------------
def run(args, overrides) -> int:
    started = time.time()
    if not args.offline and not runtime.hub_reachable():  # asked once, in seconds
        if not args.data_files and not args.dry_run:
            raise UsageError('the Hugging Face hub is unreachable and no --data-files were given: turn on the '
                             'notebook\'s internet, or pass --data-files <local .parquet/.jsonl/.txt> --offline')
        print('The Hugging Face hub is unreachable: planning offline (no hub downloads, no generative perplexity '
              'unless --gen-ppl-model is a local directory)', flush=True)
        args.offline = True
    device = hardware.preset(args.assume_gpu) if args.assume_gpu else detect_device()
    plan = make_plan(args, overrides, device)
    if not args.dry_run and not args.skip_checks:
        checks = [sys.executable, str(ROOT / 'test_kaggle_setup.py'), '--output-dir', str(plan.output_dir),
                  '--model', plan.model, '--length', str(plan.length), '--algo', plan.algo,
                  '--precision', plan.precision]
        if plan.data_files:
            checks += ['--data-files', *plan.data_files]
        if args.offline:
            checks.append('--offline')
        print('$ ' + shlex.join(['python', *checks[1:]]), flush=True)
        if run_child(checks, child_env(plan, args)) != 0:
            print('Setup checks failed (see the fixes above); --skip-checks runs anyway', file=sys.stderr)
            return 1
    if args.resume_from and not args.dry_run:
        import_previous(plan, args.resume_from)
    if device.is_gpu and 'train' in args.stages and not args.dry_run and not args.no_probe:
        print(f'Probing batch {plan.batch.batch_size} on the GPU ...', flush=True)
        apply_probe(plan, probe(plan, args))
    train_seconds = plan.time_limit - plan.eval_reserve - int(time.time() - started)
    commands = main_commands(plan, args, train_seconds)
    print_plan(plan, args, commands, train_seconds)
    if args.dry_run:
        return 0
    if 'train' in args.stages and train_seconds < 1:
        raise UsageError(f'--time-limit={args.time_limit} leaves no time for training after --eval-reserve='
                         f'{args.eval_reserve}: raise the limit or lower the reserve (e.g. --eval-reserve 00:10:00)')
    env, notes = child_env(plan, args), []
    deadline = started + plan.time_limit

    def main_py(stage):
        print('\n$ ' + shlex.join(['python', 'main.py', *commands[stage]]), flush=True)
        # Training stops itself (trainer.max_time); the timeout is a safety net at the hard limit.
        return run_child([sys.executable, str(ROOT / 'main.py'), *commands[stage]], env, deadline - time.time())

    done = checkpoint_step(plan.last_ckpt)
    if 'train' not in args.stages:
        if done is None:
            raise UsageError(f'no checkpoint at {plan.last_ckpt}: run the train stage first (--stages train), '
                             f'with the same --model/--algo/--length/--subset/--run-name')
    elif plan.steps and done is not None and done >= plan.steps:
        print(f'\n{plan.last_ckpt} is already at step {done} >= --steps={plan.steps}: skipping training')
    else:
        code = main_py('train')
        if code != 0:
            print(f'Training failed (exit {code}); fix the error above and re-run the same command to resume',
                  file=sys.stderr)
            return code
        done = checkpoint_step(plan.last_ckpt)
        if done is None:
            print(f'Training wrote no {plan.last_ckpt}', file=sys.stderr)
            return 1
        if plan.steps is None or done < plan.steps:
            notes.append(f'training stopped at step {done} at the time limit: re-run the same command '
                         f'(on Kaggle: --resume-from <previous output>/{plan.run_dir.name}) to continue')
    for stage in ('eval', 'sample'):
        if stage not in args.stages:
            continue
        if deadline - time.time() < 30:
            notes.append(f'{MAIN_MODES[stage]} skipped: the time limit was reached')
            continue
        code = main_py(stage)
        if code != 0:
            notes.append(f'{MAIN_MODES[stage]} failed (exit {code}); see its output above')
    print_summary(summarize(plan, started, notes))
    return 0


def main(argv=None) -> int:
    try:
        args, overrides = parse_args(argv)
        if args.probe_worker:
            probe_worker(args.probe_worker)
            return 0
        return run(args, overrides)
    except (ValueError, HydraException) as e:  # UsageError, PlanError, the data checks, bad overrides
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
