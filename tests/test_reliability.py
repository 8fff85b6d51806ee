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

import atomic
import callbacks
import checkpoints
import cli
import errors
import main
import runtime
from conftest import ROOT

pytestmark = [pytest.mark.filterwarnings('ignore:You defined a `validation_step` but have no `val_dataloader`'),
              pytest.mark.filterwarnings('ignore:.*isinstance\\(treespec, LeafSpec\\)')]

TINY = ['model=micro', 'model.length=32', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    from test_main import write_markov_corpus
    d = tmp_path_factory.mktemp('corpus')
    write_markov_corpus(d, 12_000, 2_000)
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
    """SIGKILL at random moments (duo's first kill lands before its curriculum ends at step 6, later ones after);
    re-running the same command resumes from last.ckpt, and the final state equals that of a run
    never interrupted: weights, optimizer, EMA, schedule and data position."""
    rng = random.Random(f'{algo}-{kills}')
    straight = train_args(corpus, tmp_path / 'straight', algo) + [f'trainer.max_steps={MAX_STEPS}']
    assert runner.run(straight, tmp_path / 'straight.log') == 0

    run_dir = tmp_path / 'killed'
    ckpts = run_dir / 'checkpoints'
    argv = train_args(corpus, run_dir, algo) + [f'trainer.max_steps={MAX_STEPS}']
    step = killed = 0
    for target in sorted(rng.sample(range(1, MAX_STEPS - 4), kills)):  # the kill lands in step target + 2 or later
        began = time.time()
        pid = runner.start(argv, tmp_path / 'killed.log')
        first = max(target, step + 1)
        if wait_for_step(ckpts, first, began):
            seen = time.monotonic()
            if wait_for_step(ckpts, first + 1, began):  # one step, its save included, takes this long now
                time.sleep(rng.uniform(0, 1) * (time.monotonic() - seen))  # anywhere in the next step
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


@pytest.mark.slow
def test_a_second_signal_stops_at_once(runner, corpus, tmp_path):
    """Ctrl-C twice: the first asks for a clean stop after the current step, the second stops now;
    the checkpoints on disk are whole (atomic writes)."""
    run_dir = tmp_path / 'run'
    argv = train_args(corpus, run_dir, 'mdlm') + ['trainer.max_steps=100000', 'checkpointing.every_n_train_steps=1',
                                                  'loader.global_batch_size=64']  # slow steps: the signals land inside one
    log = tmp_path / 'run.log'
    pid = runner.start(argv, log)
    deadline = time.monotonic() + 90

    def reached(step):
        while not (run_dir / 'checkpoints' / f'step-{step}.ckpt').exists():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        return time.monotonic()
    second = reached(2)
    step_seconds = reached(3) - second
    # Halfway through step 4: at a step boundary the clean stop can be over before the second signal
    # is sent (the process has then exited with 128 + SIGINT, saved and whole, which is not this test).
    time.sleep(step_seconds / 2)
    os.kill(pid, signal.SIGINT)
    while 'Received SIGINT' not in log.read_text():
        assert time.monotonic() < deadline + 30, log.read_text()[-3000:]
        time.sleep(0.01)
    sent = time.monotonic()
    os.kill(pid, signal.SIGINT)
    code = runner.wait(pid, timeout=30)
    assert code == -signal.SIGINT, (code, log.read_text()[-3000:])  # the default action: no clean-up, no save
    assert time.monotonic() - sent < 10
    for path in (run_dir / 'checkpoints').glob('*.ckpt'):
        checkpoints.read_checkpoint(path)


@pytest.mark.parametrize('validated', [False, True])
def test_a_run_interrupted_before_its_first_step_leaves_no_empty_run_directory(tmp_path, capsys, validated):
    """Ctrl-C before training began: a new run directory is removed (its log was still held back); one
    whose inputs were already validated keeps a log that says why."""
    import logging
    from omegaconf import OmegaConf
    run_dir = tmp_path / 'new_run'
    run_dir.mkdir()
    handler = logging.FileHandler(run_dir / 'main.log')  # what Hydra opens for a run
    logging.getLogger().addHandler(handler)

    def interrupted(config, run_dir):
        if validated:
            cli.begin_run(config, run_dir)
        raise KeyboardInterrupt

    try:
        with pytest.raises(SystemExit) as stop:
            cli.run(interrupted, OmegaConf.create({'mode': 'train'}), run_dir)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert stop.value.code == 128 + signal.SIGINT and 'error: interrupted' in capsys.readouterr().err
    if validated:
        assert 'Interrupted before training began: nothing was saved' in (run_dir / 'main.log').read_text()
    else:
        assert not run_dir.exists()


# ---- bad input: one line, exit code 2, no file of an existing run modified --------------------
K_TEXT8 = 35  # the text8 tokenizer's vocabulary


def tiny_backbone(vocab_size=K_TEXT8, hidden_size=32, length=32, causal=False):
    from models.dit import DiT
    return DiT(vocab_size, hidden_size, 16, 1, 2, length, causal=causal)


def save_lightning_like(backbone, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': {checkpoints.PREFIX + k: v for k, v in backbone.state_dict().items()},
                'global_step': 3, 'micro_step': 3}, path)
    return path


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory, corpus):
    """Files for the bad-input cases: an existing run (whose files must stay untouched),
    checkpoints good, corrupt, truncated, of another size and vocabulary, a Hugging Face
    directory of 12 positions, empty and tiny corpora."""
    from models import hf_format
    d = tmp_path_factory.mktemp('bad')
    run = d / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    (run / 'main.log').write_text('an earlier run\n')
    (run / 'config_train.yaml').write_text('mode: train\n')
    save_lightning_like(tiny_backbone(), run / 'checkpoints' / 'last.ckpt')
    save_lightning_like(tiny_backbone(), d / 'good.ckpt')
    save_lightning_like(tiny_backbone(hidden_size=64), d / 'wide.ckpt')
    save_lightning_like(tiny_backbone(vocab_size=50), d / 'vocab50.ckpt')
    (d / 'garbage.ckpt').write_bytes(b'this is not a checkpoint')
    data = (d / 'good.ckpt').read_bytes()
    (d / 'truncated.ckpt').write_bytes(data[:len(data) // 2])
    corrupt_run = d / 'corrupt_run' / 'checkpoints'
    corrupt_run.mkdir(parents=True)
    (corrupt_run / 'last.ckpt').write_bytes(data[:len(data) // 3])
    save_lightning_like(tiny_backbone(), corrupt_run / 'step-2.ckpt')
    save_lightning_like(tiny_backbone(hidden_size=64), d / 'other_run' / 'checkpoints' / 'last.ckpt')
    hf_format.save_hf(tiny_backbone(length=12), d / 'hf12')
    (d / 'empty.txt').write_text('')
    (d / 'tiny.txt').write_text('ab cd\n')
    (d / 'three_prompts.txt').write_text('one\ntwo\nthree\n')
    save_lightning_like(tiny_backbone(causal=True), d / 'ar.ckpt')
    return d


def data_overrides(corpus_dir, train=None):
    args = data_args(corpus_dir)
    return args if train is None else [f'data.train_files={train}' if a.startswith('data.train_files') else a
                                       for a in args]


def bad_input_cases(d: Path, corpus_dir: Path):
    """(name, overrides, environment) of every bad input the issue lists, and more."""
    run = [f'hydra.run.dir={d}/run']  # an existing run, resumed by mode=train
    fresh = [f'hydra.run.dir={d}/new_run']
    tiny = [*TINY]
    sample = ['mode=sample_eval', *data_overrides(corpus_dir), *tiny, 'eval.compute_generative_perplexity=false',
              'sampling.steps=4', *run]
    train = ['mode=train', *data_overrides(corpus_dir), *tiny, 'loader.global_batch_size=8', *run]
    return [
        ('unknown algo', ['algo=mdml', *run], {}),
        ('unknown data', ['data=owt', *run], {}),
        ('unknown model', ['model=huge', *run], {}),
        ('misspelt setting', ['trainer.max_step=10', *run], {}),
        ('unknown mode', ['mode=eval', *run], {}),
        ('OWT_SUBSET_NUM not a number', ['data=openwebtext-split', *tiny, *fresh], {'OWT_SUBSET_NUM': 'ten'}),
        ('OWT_SUBSET_NUM too small', ['data=openwebtext-split', *tiny, *fresh], {'OWT_SUBSET_NUM': '1'}),
        ('model.length too short', ['model.length=2', *run], {}),
        ('model.length beyond the checkpoint', [*sample, f'eval.checkpoint_path={d}/hf12'], {}),
        ('batch does not divide the global batch', ['loader.global_batch_size=10', 'loader.batch_size=4', *run], {}),
        ('batch size zero', ['loader.batch_size=0', *run], {}),
        ('global batch not a number', ['loader.global_batch_size=lots', *run], {}),
        ('missing checkpoint', [*sample, f'eval.checkpoint_path={d}/nowhere.ckpt'], {}),
        ('corrupt checkpoint', [*sample, f'eval.checkpoint_path={d}/garbage.ckpt'], {}),
        ('truncated checkpoint', [*sample, f'eval.checkpoint_path={d}/truncated.ckpt'], {}),
        ('checkpoint of another size', [*sample, f'eval.checkpoint_path={d}/wide.ckpt'], {}),
        ('checkpoint of another vocabulary', [*sample, f'eval.checkpoint_path={d}/vocab50.ckpt'], {}),
        ('corrupt last.ckpt on resume', [*train, f'hydra.run.dir={d}/corrupt_run'], {}),
        ('last.ckpt of another size on resume', [*train, f'hydra.run.dir={d}/other_run'], {}),
        ('sampling.steps < 1', ['sampling.steps=0', *run], {}),
        ('p_nucleus = 0', ['sampling.p_nucleus=0', *run], {}),
        ('p_nucleus > 1', ['sampling.p_nucleus=1.5', *run], {}),
        ('unknown precision', ['trainer.precision=64', *run], {}),
        ('GPU asked on a machine without one', ['trainer.accelerator=gpu', *run], {}),
        ('FlashAttention forced on the CPU', [*sample, f'eval.checkpoint_path={d}/good.ckpt',
                                             'model.attn_backend=flash'], {}),
        ('local data files missing', [*data_overrides(corpus_dir, f'{d}/missing/*.txt'), *tiny, *run], {}),
        ('local data file empty', [*data_overrides(corpus_dir, f'{d}/empty.txt'), *tiny, *run], {}),
        ('corpus too small for one block', [*data_overrides(corpus_dir, f'{d}/tiny.txt'), *tiny, *run], {}),
        ('training split smaller than one batch', [*train[:-1], 'loader.global_batch_size=4096', *run], {}),
        ('training steps < 1', ['trainer.max_steps=0', *run], {}),
        ('keep_last < 0', ['checkpointing.keep_last=-1', *run], {}),
        ('max_time malformed', ['trainer.max_time=12h', *run], {}),
        # checked before the checkpoint is read: the missing one is never reported
        ('malformed kappa mode', [*sample, f'eval.checkpoint_path={d}/nowhere.ckpt', 'sampling.predictor=psi',
                                  'sampling.psi.middle_mode=constant-remdm-eta'], {}),
        ('psi predictor for AR', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=ar', 'sampling.predictor=psi'],
         {}),
        ('negative kappa for a uniform model', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=duo_base',
                                                'sampling.predictor=psi', 'sampling.psi.negative_kappa=true'], {}),
        ('curriculum setting in both spellings, different', [*train, 'algo=duo', 'algo.curriculum.gamma_min=-3.5',
                                                              'algo.gamma_min=-3.55'], {}),
        ('curriculum top_k out of range', [*train, 'algo=duo', 'algo.curriculum.mode=poly9',
                                           'algo.curriculum.top_k=-1'], {}),
        ('top_k with mode=simple', [*train, 'algo=duo', 'algo.curriculum.top_k=2'], {}),
        ('sigmoid curriculum mode', [*train, 'algo=duo', 'algo.curriculum.mode=sigmoid'], {}),
        ('fitted curriculum operator invalid on the gamma range', [*train, 'algo=duo', 'algo.curriculum.mode=poly9',
                                                                   'algo.gamma_min=-5', 'algo.gamma_max=5'], {}),
        ('sedd with greedy noise removal', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=sedd',
                                            'sampling.noise_removal=greedy'], {}),
        ('sedd with the cached predictor', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=sedd',
                                            'sampling.predictor=ancestral_cache'], {}),
        ('d3pm with T < 1', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=d3pm', 'algo.T=0'], {}),
        ('unknown set in eval.datasets', ['mode=ppl_eval', *data_overrides(corpus_dir), *tiny,
                                          f'eval.checkpoint_path={d}/good.ckpt', 'eval.datasets=[ptb,ptbb]', *run], {}),
        ('malformed gap in a prompt', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=mdlm',
                                       'sampling.prompt="a [GAP:x] b"'], {}),
        ('infilling with an AR model', [*sample, f'eval.checkpoint_path={d}/ar.ckpt', 'algo=ar',
                                        'sampling.prompt="ab [GAP:3] cd"'], {}),
        ('prompt longer than a sample', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=mdlm',
                                         f'sampling.prompt="{"x" * 40}"'], {}),
        ('prompts file missing', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=mdlm',
                                  f'sampling.prompts_file={d}/prompts.txt'], {}),
        ('more prompts than samples', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=mdlm',
                                       'loader.eval_batch_size=2', 'sampling.num_sample_batches=1',
                                       f'sampling.prompts_file={d}/three_prompts.txt'], {}),
        ('semi-autoregressive stride too long', [*sample, f'eval.checkpoint_path={d}/good.ckpt', 'algo=mdlm',
                                                 'sampling.semi_ar=true', 'sampling.stride_length=32'], {}),
    ]


# The exact message of each case ({d}: the fixture's directory); docs/ERRORS.md lists them.
MESSAGES = {
    'unknown algo': 'algo=mdml is unknown: use one of ar, d3pm, distillation, duo, duo_base, mdlm, sedd '
                    '(e.g. algo=duo_base)',
    'unknown data': 'data=owt is unknown: use one of ag_news, fineweb-edu, lambada, lm1b, lm1b-wrap, local, openwebtext, '
                    'openwebtext-split, openwebtext-streaming, ptb, scientific_papers_arxiv, scientific_papers_pubmed, '
                    'stdlib, text8, text8-crop, wikitext103, wikitext2 (e.g. data=openwebtext-split)',
    'unknown model': 'model=huge is unknown: use one of medium, micro, small, tiny (e.g. model=small)',
    'misspelt setting': 'trainer.max_step is not a setting (misspelt?): see configs/config.yaml for the settings '
                        '(e.g. model.length=128); to add a new key write +trainer.max_step=...',
    'unknown mode': 'mode=eval is unknown: use one of train, ppl_eval, sample_eval (e.g. mode=train)',
    'OWT_SUBSET_NUM not a number': 'OWT_SUBSET_NUM=ten must be an integer >= 2: the number of documents to read, '
                                   'floor(0.9 N) for training and the rest (at least one) for validation, '
                                   'e.g. OWT_SUBSET_NUM=11000',
    'OWT_SUBSET_NUM too small': 'OWT_SUBSET_NUM=1 must be an integer >= 2: the number of documents to read, '
                                'floor(0.9 N) for training and the rest (at least one) for validation, '
                                'e.g. OWT_SUBSET_NUM=11000',
    'model.length too short': 'model.length=2 is too short: use at least 4 (e.g. model.length=128)',
    'model.length beyond the checkpoint': 'model.length=32 exceeds the 12 positions of {d}/hf12: use model.length=12 '
                                          'or less',
    'batch does not divide the global batch': 'loader.global_batch_size=10 is not divisible by loader.batch_size x '
                                              'devices x nodes = 4: use e.g. loader.global_batch_size=8',
    'batch size zero': 'loader.batch_size=0 must be >= 1 (e.g. loader.batch_size=8)',
    'global batch not a number': 'loader.global_batch_size=lots must be an integer (e.g. loader.global_batch_size=512)',
    'missing checkpoint': 'eval.checkpoint_path={d}/nowhere.ckpt does not exist: train first (mode=train) or pass '
                          'eval.checkpoint_path=<a .ckpt file, a Hugging Face directory or hub id>',
    'corrupt checkpoint': 'checkpoint {d}/garbage.ckpt cannot be read (IndexError: pop from empty list); it is '
                          'truncated or not a Lightning checkpoint: use another file, e.g. checkpoints/last.ckpt',
    'truncated checkpoint': 'checkpoint {d}/truncated.ckpt cannot be read (OSError: [Errno 22] Invalid argument); it '
                            'is truncated or not a Lightning checkpoint: use another file, e.g. checkpoints/last.ckpt',
    'checkpoint of another size': 'checkpoint {d}/wide.ckpt has hidden size 64 but model.hidden_size=32: pick the '
                                  'model config it was trained with (e.g. model=small for 768)',
    'checkpoint of another vocabulary': 'checkpoint {d}/vocab50.ckpt has a vocabulary of 50 ids but this '
                                        'data/tokenizer gives 35: use the tokenizer it was trained with '
                                        '(data.tokenizer_name_or_path)',
    'corrupt last.ckpt on resume': '{d}/corrupt_run/checkpoints/last.ckpt cannot be read (OSError: [Errno 22] Invalid '
                                   'argument): copy the newest readable checkpoint over it (cp '
                                   '{d}/corrupt_run/checkpoints/step-2.ckpt {d}/corrupt_run/checkpoints/last.ckpt), '
                                   'or start a new run elsewhere (hydra.run.dir=...)',
    'last.ckpt of another size on resume': 'the run to resume ({d}/other_run/checkpoints/last.ckpt) has hidden size 64 '
                                           'but model.hidden_size=32: pick the model config it was trained with '
                                           '(e.g. model=small for 768)',
    'sampling.steps < 1': 'sampling.steps=0 must be >= 1 (e.g. sampling.steps=128)',
    'p_nucleus = 0': 'sampling.p_nucleus=0 must be in (0, 1] (e.g. sampling.p_nucleus=0.9)',
    'p_nucleus > 1': 'sampling.p_nucleus=1.5 must be in (0, 1] (e.g. sampling.p_nucleus=0.9)',
    'unknown precision': 'trainer.precision=64 is not supported: use one of 16, bf16, 32 or auto '
                         '(e.g. trainer.precision=bf16)',
    'GPU asked on a machine without one': 'trainer.accelerator=gpu but no CUDA GPU is visible: use '
                                          'trainer.accelerator=cpu',
    'FlashAttention forced on the CPU': 'model.attn_backend=flash needs FlashAttention (flash_attn) on a CUDA GPU '
                                        'with compute capability >= 8.0, which this machine lacks; use '
                                        'model.attn_backend=sdpa',
    'local data files missing': 'data.train_files={d}/missing/*.txt matches no files; give a path, directory or glob '
                                'of .parquet, .jsonl or .txt files, e.g. data.train_files=/kaggle/input/owt/*.parquet',
    'local data file empty': 'the train split of data=local has no documents (data.train_files holds no text): give '
                             'files with text (e.g. data.train_files=corpus/*.txt)',
    'corpus too small for one block': 'the train split of data=local has 1 documents and 5 tokens, too few for one '
                                      'block of model.length=32: add documents or lower model.length '
                                      '(e.g. model.length=4)',
    'training split smaller than one batch': 'the training split of data=local has 400 blocks of model.length=32, '
                                             'fewer than loader.batch_size=4096 x 1 devices: add documents or lower '
                                             'loader.batch_size (e.g. loader.batch_size=400)',
    'training steps < 1': 'trainer.max_steps=0 must be >= 1 (e.g. trainer.max_steps=100000)',
    'keep_last < 0': 'checkpointing.keep_last=-1 must be >= 0 (e.g. checkpointing.keep_last=3)',
    'max_time malformed': 'trainer.max_time=12h is not DD:HH:MM:SS (e.g. trainer.max_time=00:11:30:00)',
    'malformed kappa mode': "sampling.psi.middle_mode=constant-remdm-eta: 'eta' after 'constant-remdm-' must be a "
                            "number >= 0 (e.g. sampling.psi.middle_mode=constant-remdm-0.01)",
    'psi predictor for AR': 'sampling.predictor=psi does not apply to algo=ar: use one of ancestral, ancestral_cache '
                            '(e.g. sampling.predictor=ancestral)',
    'negative kappa for a uniform model': 'sampling.psi.negative_kappa=true is for absorbing diffusion (algo=mdlm or '
                                          'sedd), not algo=duo_base: use sampling.psi.negative_kappa=false',
    'curriculum setting in both spellings, different': 'algo.curriculum.gamma_min=-3.5 and algo.gamma_min=-3.55 '
                                                       'disagree: give the setting once (e.g. '
                                                       'algo.curriculum.gamma_min=-3.5)',
    'curriculum top_k out of range': 'algo.curriculum.top_k=-1 must be in [1, K-1 = 34] (e.g. algo.curriculum.top_k=2)',
    'top_k with mode=simple': 'algo.curriculum.top_k=2 needs a top-k mode: algo.curriculum.mode=simple feeds the full '
                              'relaxed one-hot (e.g. algo.curriculum.mode=poly9 algo.curriculum.top_k=2)',
    'sigmoid curriculum mode': "algo.curriculum.mode=sigmoid is not supported: a sigmoid fit misses the operator by up "
                               "to 32% in alpha' (upstream also drops a factor 2); use algo.curriculum.mode=poly9",
    'fitted curriculum operator invalid on the gamma range': 'algo.curriculum.mode=poly9 cannot represent the duality '
                                                             'operator on gamma in [-5.0, 5.0] (K=35): the fitted '
                                                             'alpha_t leaves (0, 1] or stops decreasing; use the exact '
                                                             'operator with the top-k input '
                                                             '(algo.curriculum.mode=efficient_cached) or narrow the '
                                                             'gamma range',
    'sedd with greedy noise removal': 'sampling.noise_removal=greedy does not apply to algo=sedd: use ancestral or '
                                      'none (e.g. sampling.noise_removal=ancestral)',
    'sedd with the cached predictor': 'sampling.predictor=ancestral_cache does not apply to algo=sedd (its ancestral '
                                      'sampler on the normalised score is sampling.predictor=psi with the default '
                                      'sampling.psi.*): use one of analytic, psi (e.g. sampling.predictor=analytic)',
    'd3pm with T < 1': 'algo.T=0 must be an integer >= 1 for algo=d3pm (e.g. algo.T=1000)',
    'unknown set in eval.datasets': 'eval.datasets: ptbb is not a data config (configs/data/<name>.yaml); use names '
                                    'among ag_news, fineweb-edu, lambada, lm1b, lm1b-wrap, local, openwebtext, '
                                    'openwebtext-split, openwebtext-streaming, ptb, scientific_papers_arxiv, '
                                    'scientific_papers_pubmed, stdlib, text8, text8-crop, wikitext103, wikitext2 or '
                                    '{{name: <config>, <data key>: value}} (e.g. eval.datasets=[wikitext2,ptb])',
    'malformed gap in a prompt': 'sampling.prompt: [GAP:x] must give a whole number of positions >= 1 '
                                 '(e.g. sampling.prompt="The capital of France is [GAP:5] .")',
    'infilling with an AR model': 'sampling.prompt: algo=ar generates left to right and cannot fill a gap followed by '
                                  'text: put the gap at the end, or use a diffusion model (e.g. algo=mdlm)',
    'prompt longer than a sample': 'sampling.prompt: the template covers 41 positions (BOS and gaps included) but a '
                                   'sample has 32 (model.length=32): shorten it or sample longer texts '
                                   '(sampling.semi_ar=true sampling.stride_length=... sampling.num_strides=...)',
    'prompts file missing': 'sampling.prompts_file={d}/prompts.txt does not exist: pass a .txt or .jsonl file of '
                            'prompts (e.g. sampling.prompts_file=prompts.txt)',
    'more prompts than samples': 'sampling.prompts_file={d}/three_prompts.txt holds 3 prompts but '
                                 'loader.eval_batch_size=2 x sampling.num_sample_batches=1 draws 2 rows: draw at least '
                                 'one row per prompt (e.g. sampling.num_sample_batches=2)',
    'semi-autoregressive stride too long': 'sampling.stride_length=32 must be an integer in [1, model.length=32) '
                                           '(e.g. sampling.stride_length=16)',
}


def snapshot(directory: Path) -> dict:
    """Content and modification time of every file under `directory` except the data caches."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob('*'))
            if p.is_file() and 'cache' not in p.parts}


def run_cli(argv, capsys) -> tuple[int, str]:
    """main.py in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, 'argv', ['main.py', *map(str, argv)])
            cli.main(main.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_every_bad_input_case_has_its_message(bad_inputs, corpus):
    assert [name for name, _, _ in bad_input_cases(bad_inputs, corpus)] == list(MESSAGES)


@pytest.mark.parametrize('name', list(MESSAGES))
def test_bad_input_gives_one_line_exit_2_and_touches_no_file(bad_inputs, corpus, capsys, monkeypatch, name):
    _, argv, env = next(c for c in bad_input_cases(bad_inputs, corpus) if c[0] == name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv('HYDRA_FULL_ERROR', raising=False)
    before = snapshot(bad_inputs)
    code, err = run_cli(argv, capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert errors == [f'error: {MESSAGES[name].format(d=bad_inputs)}'] and err.endswith(errors[0] + '\n')
    assert 'Traceback' not in err
    assert snapshot(bad_inputs) == before  # nothing written, nothing created (run directories included)


def test_bf16_on_a_gpu_without_it_suggests_16(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Tesla T4')
    with pytest.raises(errors.ConfigError) as error:
        runtime.resolve_precision('bf16', 'gpu')
    assert str(error.value) == ('trainer.precision=bf16 needs an Ampere or newer GPU (this Tesla T4 has compute '
                                'capability 7.5): use trainer.precision=16')
    assert runtime.resolve_precision('16', 'gpu') == '16-mixed'


@pytest.mark.parametrize('full_error', [False, True])
def test_command_line_error_through_python_main_py(tmp_path, full_error):
    """The real command: one line and exit 2; with HYDRA_FULL_ERROR=1 the traceback is shown."""
    env = {k: v for k, v in os.environ.items() if k != 'HYDRA_FULL_ERROR'}
    if full_error:
        env['HYDRA_FULL_ERROR'] = '1'
    proc = subprocess.run([sys.executable, 'main.py', 'sampling.steps=0', f'hydra.run.dir={tmp_path}/run'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    if full_error:
        assert 'Traceback' in proc.stderr and 'sampling.steps=0 must be >= 1' in proc.stderr
    else:
        assert (proc.returncode, proc.stderr) == (2, 'error: sampling.steps=0 must be >= 1 (e.g. sampling.steps=128)\n')
    assert not (tmp_path / 'run').exists()


# ---- atomic writes ---------------------------------------------------------------------------
def test_a_write_that_dies_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / 'last.ckpt'
    path.write_bytes(b'old')

    def dies(f):
        f.write(b'half of the new')
        raise KeyboardInterrupt  # a signal in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write(path, dies)
    assert path.read_bytes() == b'old' and sorted(tmp_path.iterdir()) == [path]
    atomic.atomic_write(path, lambda f: f.write(b'new'))
    assert path.read_bytes() == b'new' and sorted(tmp_path.iterdir()) == [path]


def test_temporary_files_of_killed_saves_are_removed(tmp_path):
    (tmp_path / '.last.ckpt.k3j2_x.tmp').write_bytes(b'x' * 10)  # what a SIGKILL mid-save leaves
    (tmp_path / 'last.ckpt').write_bytes(b'good')
    (tmp_path / '.hidden').write_bytes(b'not ours')
    assert atomic.remove_stale_temps(tmp_path) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.hidden', 'last.ckpt']


# ---- disk space ------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A disk of `capacity` bytes holding the files of tmp_path (free space = capacity - their size)."""
    disk = {'capacity': 0}

    def free(directory):
        used = sum(p.stat().st_size for p in tmp_path.rglob('*') if p.is_file())
        return disk['capacity'] - used
    monkeypatch.setattr(checkpoints, 'free_bytes', free)
    return disk


MB = 2 ** 20


def test_low_disk_deletes_the_oldest_periodic_checkpoints_never_last(tmp_path, small_disk):
    for name in ('last.ckpt', 'step-100.ckpt', 'step-200.ckpt', 'step-300.ckpt', 'notes.txt'):
        (tmp_path / name).write_bytes(b'x' * 10 * MB)
    # A 10 MB save needs 10 + 16 MB (headroom); 6 MB are free: deleting step-100 and step-200 gives 26.
    small_disk['capacity'] = 56 * MB
    checkpoints.make_room(tmp_path / 'step-400.ckpt', 10 * MB)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.ckpt', 'notes.txt', 'step-300.ckpt']
    with pytest.raises(errors.DiskFullError) as error:  # still short after deleting step-300
        checkpoints.make_room(tmp_path / 'step-400.ckpt', 40 * MB)
    assert 'not enough disk space to save' in str(error.value) and 'run the same command again' in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last.ckpt', 'notes.txt']
    assert (tmp_path / 'last.ckpt').stat().st_size == 10 * MB


def test_a_full_disk_during_the_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'last.ckpt'
    good = {'state_dict': {'backbone.w': torch.ones(3)}, 'global_step': 1}
    checkpoints.AtomicCheckpointIO().save_checkpoint(good, path)

    def enospc(obj, f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(torch, 'save', enospc)
    with pytest.raises(errors.DiskFullError, match='the disk filled up while saving'):
        checkpoints.AtomicCheckpointIO().save_checkpoint({**good, 'global_step': 2}, path)
    monkeypatch.undo()
    assert checkpoints.read_progress(path)[0] == 1 and sorted(tmp_path.iterdir()) == [path]


def test_non_finite_weights_are_never_written(tmp_path):
    path = tmp_path / 'last.ckpt'
    checkpoints.AtomicCheckpointIO().save_checkpoint({'state_dict': {'backbone.w': torch.ones(2)}, 'global_step': 1},
                                                     path)
    bad = {'state_dict': {'backbone.w': torch.tensor([1.0, float('nan')])}, 'global_step': 2}
    with pytest.raises(errors.RunStopped, match='the weights are not finite at step 2'):
        checkpoints.AtomicCheckpointIO().save_checkpoint(bad, path)
    assert checkpoints.read_progress(path)[0] == 1


# ---- non-finite loss or gradients ------------------------------------------------------------
class Recorder(L.Callback):
    """Weights and EMA after every optimizer step."""

    def __init__(self):
        self.weights, self.ema = [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().reshape(-1).clone() for p in module.backbone.parameters()]))
        self.ema.append(torch.cat([p.reshape(-1).clone() for p in module.ema.shadow_params]))


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose backward pass makes every gradient non-finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float('inf')


def poisoned(model, loss_steps=(), grad_steps=()):
    """Make the loss NaN at the optimizer steps `loss_steps` and the gradients non-finite (the loss
    staying finite) at `grad_steps`."""
    clean = model.algo.loss

    def loss(module, x0, mask, t, step):
        per_token, weight = clean(module, x0, mask, t, step)
        if step in loss_steps:
            per_token = per_token * float('nan')
        if step in grad_steps:
            per_token = InfiniteGradient.apply(per_token)
        return per_token, weight
    model.algo.loss = loss
    return model


def nonfinite_fit(tmp_path, max_steps, limit, **poison):
    from test_duo_train import SameBatch, make_config, new_model
    config = make_config('algo=mdlm', *TINY[:1], 'model.length=8', *TINY[2:], 'training.ema=0.9',
                         f'training.max_nonfinite_steps={limit}', 'lr_scheduler.num_warmup_steps=0', 'optim.lr=1e-2')
    model = poisoned(new_model(config), **poison)
    recorder = Recorder()
    trainer = L.Trainer(accelerator='cpu', devices=1, max_steps=max_steps, gradient_clip_val=1.0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, plugins=[checkpoints.AtomicCheckpointIO()],
                        callbacks=[recorder, callbacks.RunCheckpoint(tmp_path, 1, 100)])
    trainer.fit(model, torch.utils.data.DataLoader(SameBatch(), batch_size=None))
    return model, recorder


def test_non_finite_loss_or_gradients_skip_the_step_with_a_counted_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger='diffusion'):
        model, rec = nonfinite_fit(tmp_path, 6, limit=3, loss_steps={1}, grad_steps={3, 4})
    w, ema = rec.weights, rec.ema
    for skipped in (1, 3, 4):  # neither the weights nor the EMA move
        assert torch.equal(w[skipped], w[skipped - 1]) and torch.equal(ema[skipped], ema[skipped - 1])
    for applied in (2, 5):
        assert not torch.equal(w[applied], w[applied - 1]) and not torch.equal(ema[applied], ema[applied - 1])
    assert model.nonfinite_steps == 3 and model.ema.num_updates == 3
    warnings = [r.getMessage() for r in caplog.records if 'step skipped' in r.getMessage()]
    assert warnings == ['Step 1: non-finite loss, step skipped (1 skipped so far, 1 in a row; the run stops at 3 in a row)',
                        'Step 3: non-finite gradients, step skipped (2 skipped so far, 1 in a row; the run stops at 3 '
                        'in a row)',
                        'Step 4: non-finite gradients, step skipped (3 skipped so far, 2 in a row; the run stops at 3 '
                        'in a row)']


def test_many_non_finite_steps_in_a_row_stop_the_run_without_a_bad_checkpoint(tmp_path):
    with pytest.raises(errors.RunStopped) as error:
        nonfinite_fit(tmp_path, 20, limit=3, loss_steps=set(range(2, 20)))
    assert str(error.value).startswith('non-finite loss or gradients in 3 optimizer steps in a row (up to step 4, '
                                       'training.max_nonfinite_steps=3): training stopped without saving')
    saved = sorted(p.name for p in tmp_path.glob('*.ckpt'))
    assert saved == ['last.ckpt', 'step-1.ckpt', 'step-2.ckpt', 'step-3.ckpt', 'step-4.ckpt']
    for name in saved:  # every checkpoint holds finite weights and EMA
        ckpt = checkpoints.read_checkpoint(tmp_path / name)
        assert all(torch.isfinite(v).all() for v in ckpt['state_dict'].values() if v.is_floating_point())
        assert all(torch.isfinite(p).all() for p in ckpt['ema']['shadow_params'])
