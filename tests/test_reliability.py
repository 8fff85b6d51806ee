"""Reliability (issue 7): nothing is lost when a run is killed, a disk fills, a value goes
non-finite or an input is wrong.

- Kill tests (slow): training runs are killed with SIGKILL at random moments (checkpoints are
  saved every step, so many kills land inside a save); what is left must load, and re-running the
  same command must end exactly where an uninterrupted run ends. SIGTERM/SIGINT save last.ckpt.
- Disk: free space is checked before a save; the oldest periodic checkpoint goes first, never
  last.ckpt; retention keeps `checkpointing.keep_last`.
- Non-finite loss or gradients skip the step; a run of them stops without writing a checkpoint.
- Bad input: one line on stderr (the exact messages are listed in docs/ERRORS.md), exit code 2,
  and no file of an existing run is modified.
"""
import errno
import json
import logging
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import callbacks
import checkpoints
import diffusion
import main
from conftest import ROOT

pytestmark = [pytest.mark.filterwarnings('ignore:You defined a `validation_step` but have no `val_dataloader`'),
              pytest.mark.filterwarnings('ignore:.*isinstance\\(treespec, LeafSpec\\)')]

TINY = ['model=micro', 'model.length=32', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    from test_main import markov_text
    d = tmp_path_factory.mktemp('corpus')
    (d / 'train.txt').write_text(markov_text(12_000, seed=0))
    (d / 'valid.txt').write_text(markov_text(2_000, seed=1))
    return d


def data_args(corpus_dir):
    return ['data=local', f'data.train_files={corpus_dir}/train.txt', f'data.valid_files={corpus_dir}/valid.txt',
            'data.tokenizer_name_or_path=text8', f'data.cache_dir={corpus_dir}/cache', 'loader.num_workers=0']


def train_args(corpus_dir, run_dir, algo):
    """A tiny run that saves a checkpoint every optimizer step (so that kills often hit a save)."""
    extra = ['algo.curriculum_end=6'] if algo == 'duo' else []  # the curriculum ends mid-run
    return [f'algo={algo}', *data_args(corpus_dir), *TINY, *extra, 'loader.global_batch_size=8',
            'optim.lr=1e-2', 'lr_scheduler.num_warmup_steps=2', 'training.ema=0.9', 'trainer.num_sanity_val_steps=0',
            'trainer.val_check_interval=1000', 'checkpointing.every_n_train_steps=1', 'checkpointing.keep_last=2',
            f'hydra.run.dir={run_dir}']


# ---- the complete training state of a checkpoint --------------------------------------------
def training_state(path) -> dict:
    """Every tensor that decides how training goes on: weights, optimizer moments and step counts,
    EMA, learning-rate schedule, and the data position (batches consumed)."""
    ckpt = checkpoints.read_checkpoint(path)
    state = {f'weights.{k}': v for k, v in ckpt['state_dict'].items()}
    for i, opt in enumerate(ckpt['optimizer_states']):
        for p, s in opt['state'].items():
            for k, v in s.items():
                state[f'optim{i}.{p}.{k}'] = torch.as_tensor(v)
    for i, p in enumerate(ckpt['ema']['shadow_params']):
        state[f'ema.{i}'] = p
    state['ema.num_updates'] = torch.as_tensor(ckpt['ema'].get('num_updates', 0))
    for i, sched in enumerate(ckpt['lr_schedulers']):
        state[f'lr{i}'] = torch.as_tensor(sched['last_epoch'])
    state['global_step'] = torch.as_tensor(ckpt['global_step'])
    state['micro_step'] = torch.as_tensor(ckpt['micro_step'])
    return state


def assert_same_state(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f'{k} differs by {diff}'


# ---- a process that runs main.py commands as forked children ---------------------------------
class Runner:
    """tests/forkrun.py: main.py commands whose children start without re-importing torch."""

    def __init__(self):
        env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
        self.proc = subprocess.Popen([sys.executable, str(ROOT / 'tests' / 'forkrun.py')], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _line(self, prefix, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f'no "{prefix}" from the runner within {timeout} s')
        line = self.proc.stdout.readline()
        assert line.startswith(prefix), line
        return int(line.split()[1])

    def start(self, argv, log) -> int:
        self.proc.stdin.write(json.dumps({'argv': [str(a) for a in argv], 'log': str(log)}) + '\n')
        self.proc.stdin.flush()
        return self._line('pid', 120)

    def wait(self, pid, timeout=120) -> int:
        try:
            return self._line('exit', timeout)
        except AssertionError:
            os.kill(pid, signal.SIGKILL)  # never leave a child running
            raise

    def run(self, argv, log, timeout=120) -> int:
        return self.wait(self.start(argv, log), timeout)

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope='module')
def runner():
    r = Runner()
    yield r
    r.close()


def check_checkpoints_load(ckpt_dir: Path, previous_step: int) -> int:
    """Every .ckpt left in `ckpt_dir` loads; last.ckpt never goes back. Returns its step."""
    for path in ckpt_dir.glob('*.ckpt'):
        checkpoints.read_checkpoint(path)
    last = ckpt_dir / checkpoints.LAST
    step = checkpoints.read_progress(last)[0] if last.exists() else 0
    assert step >= previous_step
    return step


MAX_STEPS = 12


def wait_for_step(ckpt_dir: Path, step: int, since: float, timeout: float = 90) -> bool:
    """Wait until this run has saved step-<step>.ckpt (False: the run ended or timed out first)."""
    path = ckpt_dir / f'step-{step}.ckpt'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if path.stat().st_mtime >= since:
                return True
        except FileNotFoundError:
            pass
        if step > MAX_STEPS:
            return False
        time.sleep(0.01)
    return False


@pytest.mark.slow
@pytest.mark.parametrize('algo,kills', [('ar', 1), ('mdlm', 1), ('duo_base', 1), ('duo', 4)])
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(runner, corpus, tmp_path, algo, kills):
    """SIGKILL at random moments (kill 1 of duo lands before its curriculum ends, later ones after);
    re-running the same command resumes from last.ckpt, and the final state equals that of a run
    never interrupted: weights, optimizer, EMA, schedule and data position."""
    rng = random.Random(f'{algo}-{kills}')
    straight = train_args(corpus, tmp_path / 'straight', algo) + [f'trainer.max_steps={MAX_STEPS}']
    began = time.monotonic()
    assert runner.run(straight, tmp_path / 'straight.log') == 0
    duration = time.monotonic() - began

    run_dir = tmp_path / 'killed'
    argv = train_args(corpus, run_dir, algo) + [f'trainer.max_steps={MAX_STEPS}']
    step_time = duration / MAX_STEPS  # an over-estimate: it includes the start-up
    step = killed = 0
    for target in sorted(rng.sample(range(1, MAX_STEPS - 4), kills)):
        began = time.time()
        pid = runner.start(argv, tmp_path / 'killed.log')
        if wait_for_step(run_dir / 'checkpoints', max(target, step + 1), began):
            time.sleep(rng.uniform(0, 1) * step_time)  # anywhere in the next step(s), saves included
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it has just finished
                pass
        code = runner.wait(pid)
        assert code in (-signal.SIGKILL, 0)  # 0: it finished first
        killed += code == -signal.SIGKILL
        step = check_checkpoints_load(run_dir / 'checkpoints', step)
    assert killed >= 1
    assert runner.run(argv, tmp_path / 'killed.log') == 0, (tmp_path / 'killed.log').read_text()[-3000:]
    log = (tmp_path / 'killed.log').read_text()
    assert 'Traceback' not in log
    assert_same_state(training_state(run_dir / 'checkpoints' / 'last.ckpt'),
                      training_state(tmp_path / 'straight' / 'checkpoints' / 'last.ckpt'))
    kept = sorted(p.name for p in (run_dir / 'checkpoints').iterdir())
    assert kept == ['last.ckpt', f'step-{MAX_STEPS - 1}.ckpt', f'step-{MAX_STEPS}.ckpt']  # keep_last=2


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_sigterm_and_sigint_save_last_ckpt_before_exiting(runner, corpus, tmp_path, sig):
    run_dir = tmp_path / 'run'
    argv = train_args(corpus, run_dir, 'mdlm') + ['trainer.max_steps=100000', 'checkpointing.every_n_train_steps=2',
                                                  'checkpointing.keep_last=100']
    log = tmp_path / 'run.log'
    pid = runner.start(argv, log)
    deadline = time.monotonic() + 90
    while not (run_dir / 'checkpoints' / 'step-2.ckpt').exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            runner.wait(pid)
            raise AssertionError('no checkpoint within 90 s:\n' + log.read_text()[-3000:])
        time.sleep(0.05)
    os.kill(pid, sig)
    assert runner.wait(pid) == 128 + sig
    text = log.read_text()
    assert f'Received {sig.name}' in text and 'Traceback' not in text
    stopped = int(text.split('Stopped at step ')[1].split()[0])
    assert stopped >= 2
    assert checkpoints.read_progress(run_dir / 'checkpoints' / 'last.ckpt')[0] == stopped
