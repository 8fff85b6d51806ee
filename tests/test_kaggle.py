"""The Kaggle layer: hardware decisions, the memory model, kaggle_train.py, the setup checks,
the scripts and the notebook.

The memory model is checked against what autograd actually keeps (saved-tensor hooks) and, in
a slow test, against the CPU profiler's memory timeline of a whole training step; the decisions
for GPUs this machine lacks are checked on simulated devices (hardware.preset).
"""
import csv
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

import algorithms
import hardware
import kaggle_train
import test_kaggle_setup as setup
from conftest import ROOT

GIB = hardware.GIB


def shape(name, length=1024, K=hardware.GPT2_VOCAB, causal=False):
    return hardware.ModelShape(length=length, vocab_size=K, causal=causal, **hardware.MODEL_SIZES[name])


# ---- decisions for simulated hardware ------------------------------------------------------
@pytest.mark.parametrize('spec, precision, backend_without_flash, backend_with_flash', [
    ('t4', '16', 'sdpa', 'sdpa'),          # Turing: no bf16, no FlashAttention 2
    ('p100', '16', 'sdpa', 'sdpa'),        # Pascal
    ('a100-40', 'bf16', 'sdpa', 'flash'),
    ('a100-80', 'bf16', 'sdpa', 'flash'),
    ('h100', 'bf16', 'sdpa', 'flash'),
    ('cpu', '32', 'sdpa', 'sdpa'),
])
def test_precision_and_attention_per_device(spec, precision, backend_without_flash, backend_with_flash):
    assert hardware.precision_for(hardware.preset(spec)) == precision
    assert hardware.attn_backend_for(hardware.preset(spec)) == backend_without_flash
    assert hardware.attn_backend_for(hardware.preset(spec, flash_attn=True)) == backend_with_flash


def test_presets_describe_the_kaggle_gpus():
    t4 = hardware.preset('t4x2')
    assert (t4.count, t4.capability, t4.is_gpu) == (2, (7, 5), True)
    assert 14 * GIB < t4.memory_bytes <= 16 * GIB
    assert hardware.preset('P100').capability == (6, 0)
    for bad in ('v100', 't4x', 't4x0', 'a100'):
        with pytest.raises(ValueError, match='--assume-gpu'):
            hardware.preset(bad)


@pytest.mark.parametrize('spec', ['t4', 't4x2', 'p100', 'a100-40', 'a100-80', 'h100'])
@pytest.mark.parametrize('algo', ['duo_base', 'duo', 'mdlm', 'ar'])
def test_planned_batch_is_the_largest_that_fits_and_reaches_the_global_batch(spec, algo):
    device = hardware.preset(spec)
    s = shape('small', causal=algo == 'ar')
    plan = hardware.plan_batch(device, s, algo, hardware.precision_for(device), 64)
    assert plan.batch_size * plan.world * plan.accumulation == 64
    assert plan.estimate.total <= plan.budget < device.memory_bytes
    bigger = [d for d in hardware.divisors(64 // plan.world) if d > plan.batch_size]
    if bigger:  # the next batch that keeps the accumulation exact would not fit
        over = hardware.train_step_bytes(s, bigger[0], hardware.precision_for(device), algo, plan.world)
        assert over.total > plan.budget


def test_t4_plan_for_small_at_1024_fits_16_gb():
    device = hardware.preset('t4x2')
    plan = hardware.plan_batch(device, shape('small'), 'duo_base', '16', 64)
    assert (plan.batch_size, plan.accumulation) == (8, 4)
    # Everything on the card: the estimate plus the CUDA context and NCCL's buffers.
    assert plan.estimate.total + hardware.CUDA_CONTEXT_BYTES + hardware.NCCL_BYTES < device.memory_bytes


def test_plans_order_by_memory_and_algorithm():
    s = shape('small')
    batch = {spec: hardware.plan_batch(hardware.preset(spec), s, 'duo_base',
                                       hardware.precision_for(hardware.preset(spec)), 512).batch_size
             for spec in ('t4', 'a100-40', 'a100-80')}
    assert batch['t4'] < batch['a100-40'] < batch['a100-80']
    t4 = hardware.preset('t4')
    # The DUO curriculum keeps a (B, L, K) float32 relaxed input: never a larger batch than DUO-base.
    assert hardware.plan_batch(t4, s, 'duo', '16', 512).batch_size <= hardware.plan_batch(t4, s, 'duo_base', '16', 512).batch_size
    # DDP's gradient buckets cost memory: two T4s never allow a larger per-device batch than one.
    assert hardware.plan_batch(hardware.preset('t4x2'), s, 'duo_base', '16', 512).batch_size <= batch['t4']


def test_a_model_that_cannot_fit_is_an_error_naming_the_fix():
    with pytest.raises(hardware.PlanError, match='smaller --model or --length, or one GPU'):
        hardware.plan_batch(hardware.preset('t4x2'), shape('medium', length=2048), 'duo_base', '16', 64)
    with pytest.raises(hardware.PlanError, match='not divisible by the 2 devices'):
        hardware.plan_batch(hardware.preset('t4x2'), shape('tiny'), 'duo_base', '16', 63)
    with pytest.raises(hardware.PlanError, match=r'must divide .* \[1, 2, 4, 8, 16, 32\]'):
        hardware.plan_batch(hardware.preset('t4x2'), shape('tiny'), 'duo_base', '16', 64, batch_size=3)
    forced = hardware.plan_batch(hardware.preset('t4'), shape('small'), 'duo_base', '16', 64, batch_size=64)
    assert not forced.fits and 'out-of-memory' in forced.note


def test_smaller_batch_steps_through_divisors():
    assert hardware.divisors(12) == [1, 2, 3, 4, 6, 12]
    assert hardware.smaller_batch(12, 12) == 6
    assert hardware.smaller_batch(6, 12) == 3
    assert hardware.smaller_batch(3, 12) == 1
    assert hardware.smaller_batch(1, 12) is None


# ---- the memory model against PyTorch ------------------------------------------------------
@pytest.mark.parametrize('name, millions', [('tiny', 33.8), ('small', 169.6), ('medium', 424.5)])
def test_parameter_counts_match_spec(name, millions):
    assert round(hardware.param_count(shape(name)) / 1e6, 1) == millions  # SPEC §8


@pytest.mark.parametrize('causal', [False, True])
def test_parameter_counts_match_the_dit(causal):
    from models.dit import DiT
    s = hardware.ModelShape(96, 40, 3, 4, 64, 301, causal=causal)
    model = DiT(301, 96, 40, 3, 4, 64, causal=causal)
    counts = hardware.param_counts(s)
    assert hardware.param_count(s) == sum(p.numel() for p in model.parameters())
    assert counts['embedding'] == model.vocab_embed.embedding.numel()
    assert counts['matmul'] == sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
                                   for p in m.parameters())


def saved_bytes(model, x, sigma, dtype):
    """Bytes of the distinct storages autograd saves for backward in one forward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x, sigma)
    return sum(storages.values())


@pytest.mark.parametrize('dtype', [None, torch.bfloat16])
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('dropout', [0.0, 0.1])
def test_block_activation_model_matches_what_autograd_saves(dtype, causal, dropout):
    """Per-block bytes = saved storages of a 3-block model minus those of a 1-block model, / 2,
    less the weights each block's Linears save (their half copies under autocast, the float32
    parameters themselves otherwise) and the LayerNorm weights."""
    from models.dit import DiT
    torch.manual_seed(0)
    d, c, H, B, L = 64, 32, 2, 4, 256
    half = dtype is not None
    x, sigma = torch.randint(50, (B, L)), None if causal else torch.rand(B)
    got = []
    for n_blocks in (1, 3):
        model = DiT(50, d, c, n_blocks, H, L, dropout=dropout, causal=causal)
        got.append(saved_bytes(model, x, sigma, dtype))
    per_block = (got[1] - got[0]) / 2
    weights = (12 * d * d + (0 if causal else 6 * c * d)) * (2 if half else 4) + 2 * 4 * d
    rotary = 2 * L * (d // H // 2) * (2 if half else 4)  # cos, sin cast to the attention dtype
    mask_bytes = (2 if half else 4)  # CPU dropout masks have the input's dtype (CUDA: bool)
    s = hardware.ModelShape(d, c, 3, H, L, 50, dropout, causal)
    expected = B * L * hardware.block_activation_bytes(s, half, mask_bytes) + weights + rotary
    assert per_block == pytest.approx(expected, rel=0.01)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:`export_memory_timeline` is deprecated')
def test_training_step_peak_matches_the_profiler(tmp_path):
    """Whole-step peak (states, activations, logits and their gradients, the loss's temporaries,
    DUO's relaxed input) against the CPU profiler's memory timeline for a bf16-autocast DUO step
    (curriculum) with AdamW and EMA."""
    algo = 'duo'
    import types
    from hydra import compose, initialize_config_dir
    from torch.profiler import ProfilerActivity, profile

    import diffusion
    from ema import EMA
    K, B, L, d = 8000, 4, 512, 128
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        config = compose('config', overrides=[f'algo={algo}', 'model=micro', f'model.hidden_size={d}', 'model.n_blocks=2',
                                              'model.n_heads=4', 'model.cond_dim=64', f'model.length={L}',
                                              'model.dropout=0.1'])
    torch.manual_seed(0)
    algorithm = algorithms.ALGORITHMS[algo](config, K, K - 1)
    backbone = diffusion.make_backbone(config, K, causal=False)
    module = types.SimpleNamespace(backbone=backbone)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3, foreach=True)
    ema = EMA(backbone.parameters(), 0.999)
    x, mask = torch.randint(K - 1, (B, L)), torch.ones(B, L, dtype=torch.long)

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            per_token, weight = algorithm.loss(module, x, mask, torch.rand(B), 0)
        ((per_token * weight).sum() / weight.sum()).backward()
        optimizer.step()
        ema.update(backbone.parameters())
    step()  # optimizer and EMA states exist from here on, as in training
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    timeline = tmp_path / 'memory.json'
    prof.export_memory_timeline(str(timeline), device='cpu')
    _, sizes = json.loads(timeline.read_text())
    measured = max(sum(s) for s in sizes)
    s = hardware.ModelShape(d, 64, 2, 4, L, K, 0.1)
    estimate = hardware.train_step_bytes(s, B, 'bf16', algo, mask_bytes=2, device='cpu').total
    assert estimate == pytest.approx(measured, rel=0.05)


# ---- kaggle_train.py helpers ---------------------------------------------------------------
@pytest.mark.parametrize('text, seconds', [('11:30:00', 41400), ('1:00:00:00', 86400), ('90:00', 5400),
                                           ('11.5h', 41400), ('45m', 2700), ('30s', 30), ('0:00:05', 5)])
def test_parse_duration(text, seconds):
    assert kaggle_train.parse_duration(text, '--time-limit') == seconds


@pytest.mark.parametrize('bad', ['soon', '1:2:3:4:5', '-1:00', '', 'h'])
def test_parse_duration_rejects_nonsense(bad):
    with pytest.raises(kaggle_train.UsageError, match='--time-limit'):
        kaggle_train.parse_duration(bad, '--time-limit')


def test_format_max_time_is_lightnings_dd_hh_mm_ss():
    from lightning.pytorch.callbacks import Timer
    for seconds in (5, 3599, 41400, 90061):
        text = kaggle_train.format_max_time(seconds)
        assert Timer(duration=text)._duration == seconds  # Lightning parses it back


@pytest.mark.parametrize('value', ['/kaggle/input/owt/*.parquet', '/tmp/my data/a,b.jsonl', "/tmp/it's/x.txt",
                                   'C:\\data\\x.txt', '/plain/path-1_2.ckpt', 'ends\\', "a\\'b"])
def test_hydra_values_parse_back_to_the_same_string(value):
    config = kaggle_train.compose_config([f'data.data_files={kaggle_train.hydra_value(value)}'])
    assert config.data.data_files == value
    listed = kaggle_train.compose_config([f'data.data_files={kaggle_train.hydra_list([value, "b.txt"])}'])
    assert list(listed.data.data_files) == [value, 'b.txt']


def write_csv(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_loss_curve_is_plotted_from_the_metrics_log(tmp_path):
    history = tmp_path / 'metrics.csv'
    write_csv(history, [{'step': s, 'train/loss': 10 - s / 10} for s in (9, 19, 29)] + [{'step': 29, 'val/nll': 4.5}])
    png = tmp_path / 'curve.png'
    assert kaggle_train.plot_history(history, png, 'run')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def dry_run(capsys, *argv):
    code = kaggle_train.main(['--dry-run', *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def train_command(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if 'main.py mode=train' in line)
    argv = shlex.split(line)
    return argv[argv.index('main.py') + 1:]


def test_dry_run_for_kaggle_t4s_plans_fp16_sdpa_ddp(capsys, tmp_path):
    code, out, err = dry_run(capsys, '--assume-gpu', 't4x2', '--model', 'small', '--length', '1024',
                             '--output-dir', str(tmp_path), '--time-limit', '2h', '--eval-reserve', '10m')
    assert code == 0, err
    assert 'precision   : 16 = fp16 mixed precision with loss scaling' in out
    assert 'attention   : sdpa' in out
    assert 'batch       : 8 per device x 2 device(s) x 4 accumulation = 64' in out
    assert 'OWT_SUBSET_NUM=11000' in out and '9900 train / 1100 validation' in out
    argv = train_command(out)
    for override in ('trainer.precision=16', 'model.attn_backend=sdpa', 'strategy=ddp', 'trainer.devices=2',
                     'loader.batch_size=8', 'loader.global_batch_size=64', 'model=small', 'model.length=1024',
                     f'hydra.run.dir={tmp_path}/owt11000-duo_base-small-L1024'):
        assert override in argv
    max_time = next(a for a in argv if a.startswith('trainer.max_time='))
    assert kaggle_train.parse_duration(max_time.split('=')[1], 'x') in range(6600 - 30, 6601)  # 2 h - 10 min
    config = kaggle_train.compose_config(argv)  # the printed command is one main.py accepts
    assert (config.loader.batch_size, config.trainer.precision) == (8, 16)
    assert sum('main.py mode=' in line for line in out.splitlines()) == 3


def test_dry_run_on_this_cpu_plans_fp32(capsys, tmp_path):
    code, out, err = dry_run(capsys, '--output-dir', str(tmp_path), '--steps', '50', '--stages', 'train')
    assert code == 0, err
    assert 'precision   : 32' in out and 'model       : micro' in out
    argv = train_command(out)
    assert {'trainer.accelerator=cpu', 'trainer.precision=32', 'trainer.max_steps=50', 'model.length=128'} <= set(argv)
    assert 'mode=ppl_eval' not in out


@pytest.mark.parametrize('algo', sorted(__import__('algorithms').ALGORITHMS))
def test_every_algorithm_runs_through_the_setup_check_and_the_plan(algo, capsys, tmp_path):
    """The setup check's training step (two optimizer steps through diffusion.StepRunner, what the GPU
    probe runs too) and kaggle_train.py's plan work for every registered algorithm."""
    detail = setup.check_training_step(hardware.preset('cpu'), '32', algo)
    assert f'algo={algo} on cpu in 32' in detail and 'weight tensors updated' in detail
    code, out, err = dry_run(capsys, '--output-dir', str(tmp_path), '--algo', algo, '--stages', 'train')
    assert code == 0, err
    assert f'algo={algo}' in train_command(out)


def test_dry_run_on_ampere_uses_bf16_and_passes_overrides_last(capsys, tmp_path):
    code, out, _ = dry_run(capsys, '--assume-gpu', 'a100-80', '--algo', 'mdlm', '--output-dir', str(tmp_path),
                           'optim.lr=1e-4', 'model.length=256')
    assert code == 0
    assert 'trainer.precision=bf16' in out and 'L256' in out
    argv = train_command(out)
    assert argv[-2:] == ['optim.lr=1e-4', 'model.length=256']


def test_overrides_after_data_files_and_model_overrides_are_honoured(capsys, tmp_path):
    code, out, err = dry_run(capsys, '--assume-gpu', 't4', '--output-dir', str(tmp_path), '--data-files',
                             str(tmp_path / 'a.jsonl'), 'model=tiny', 'optim.lr=1e-4')
    assert code == 0, err
    assert 'model       : tiny' in out and 'local11000-duo_base-tiny-L512' in out
    argv = train_command(out)
    assert f'data.data_files={tmp_path}/a.jsonl' in argv and argv[-2:] == ['model=tiny', 'optim.lr=1e-4']


@pytest.mark.parametrize('argv, message', [
    (['--assume-gpu', 't4'], '--assume-gpu=t4 plans for hardware'),
    (['--dry-run', '--assume-gpu', 'cpu', '--model', 'huge'], '--model=huge is unknown'),
    (['--dry-run', '--steps', '0'], '--steps=0 must be >= 1'),
    (['--dry-run', 'trainer.max_steps'], 'neither a flag'),
    (['--dry-run', '--assume-gpu', 'cpu', '--subset', '1'], '--subset=1 must be an integer >= 2'),
    (['--dry-run', '--stages', 'train,deploy'], '--stages=train,deploy'),
    (['--dry-run', '--assume-gpu', 'cpu', 'model.nope=3'], 'nope'),
    (['--dry-run', '--assume-gpu', 't4x2', '--model', 'medium', '--length', '2048'], 'smaller --model'),
])
def test_bad_arguments_fail_with_one_clear_line(capsys, argv, message):
    assert kaggle_train.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith('error: ')


# ---- test_kaggle_setup.py ------------------------------------------------------------------
def test_setup_attention_check_passes_and_catches_a_wrong_backend(monkeypatch):
    cpu = hardware.preset('cpu')
    assert 'max error' in setup.check_attention(cpu, '32')
    assert 'bfloat16' in setup.check_attention(cpu, 'bf16')
    import models.dit
    monkeypatch.setattr(models.dit, 'sdpa_attention', lambda q, k, v, attn_mask=None, is_causal=False: v)
    with pytest.raises(setup.Fail, match='differs from the reference'):
        setup.check_attention(cpu, '32')


def test_setup_reference_attention_is_softmax_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 1, 2, dtype=torch.float64) for _ in range(3))
    out = setup.reference_attention(q, k, v, None, causal=True)
    # Causal: the first query sees only the first key; the last one all three.
    assert torch.allclose(out[0, 0, 0], v[0, 0, 0])
    w = torch.softmax(torch.stack([q[0, 2, 0] @ k[0, j, 0] for j in range(3)]) / 2 ** 0.5, 0)
    assert torch.allclose(out[0, 2, 0], sum(w[j] * v[0, j, 0] for j in range(3)))


def test_setup_subset_check_reports_a_bad_env(monkeypatch):
    monkeypatch.setenv('OWT_SUBSET_NUM', '5000')
    assert '4500 train / 500 validation' in setup.check_subset()
    monkeypatch.setenv('OWT_SUBSET_NUM', 'lots')
    with pytest.raises(setup.Fail) as e:
        setup.check_subset()
    assert 'export OWT_SUBSET_NUM=11000' in e.value.fix


def test_setup_disk_check_fails_when_the_disk_is_too_small(monkeypatch, tmp_path):
    assert 'GiB free' in setup.check_disk(tmp_path, 'micro', 128, 'duo_base')
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10 * GIB, 10 * GIB - 2 ** 20, 2 ** 20))
    with pytest.raises(setup.Fail, match='need about') as e:
        setup.check_disk(tmp_path, 'small', 1024, 'duo_base')
    assert 'cleanup_kaggle_cache.sh' in e.value.fix


def test_setup_checkpoint_and_data_checks(tmp_path):
    assert 'bit-identically' in setup.check_checkpoint(tmp_path / 'out')
    assert not list((tmp_path / 'out').iterdir())  # the test checkpoint is removed
    blocked = tmp_path / 'file'
    blocked.write_text('x')
    with pytest.raises(setup.Fail, match='cannot write') as e:
        setup.check_checkpoint(blocked / 'out')
    assert 'writable --output-dir' in e.value.fix
    (tmp_path / 'docs.jsonl').write_text('{"text": "hello there"}\n{"text": "again"}\n')
    assert 'first document 11 characters' in setup.check_local_data([str(tmp_path / 'docs.jsonl')])
    (tmp_path / 'empty.jsonl').write_text('{"text": ""}\n')
    with pytest.raises(setup.Fail, match='no document'):
        setup.check_local_data([str(tmp_path / 'empty.jsonl')])
    with pytest.raises(ValueError, match='matches no files'):
        setup.check_local_data([str(tmp_path / 'nothing*.parquet')])


@pytest.mark.slow
def test_setup_script_passes_offline_and_fails_with_fixes(tmp_path):
    env = dict(os.environ)
    env.pop('OWT_SUBSET_NUM', None)
    ok = subprocess.run([sys.executable, 'test_kaggle_setup.py', '--offline', '--output-dir', str(tmp_path)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.rstrip().endswith('All tests passed!') and '[FAIL]' not in ok.stdout
    env['OWT_SUBSET_NUM'] = 'many'
    bad = subprocess.run([sys.executable, 'test_kaggle_setup.py', '--offline', '--output-dir', str(tmp_path),
                          '--precision', '16'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and 'All tests passed!' not in bad.stdout
    assert '[FAIL] OWT_SUBSET_NUM' in bad.stdout and '[FAIL] precision: fp16 mixed precision needs a GPU' in bad.stdout
    assert bad.stdout.count('[FAIL]') == bad.stdout.count('       fix: ') >= 2


# ---- end to end on the CPU -----------------------------------------------------------------
def markov_corpus(path: Path, n_docs: int, seed: int = 0):
    """Documents of a few hundred characters from a sticky random walk over a tiny alphabet."""
    import random
    rng = random.Random(seed)
    alphabet = 'abcde '
    docs = []
    for _ in range(n_docs):
        state, chars = rng.randrange(6), []
        for _ in range(rng.randrange(200, 400)):
            state = state if rng.random() < 0.7 else rng.randrange(6)
            chars.append(alphabet[state])
        docs.append(''.join(chars))
    path.write_text('\n'.join(json.dumps({'text': d}) for d in docs) + '\n')
    return path


TINY = ['data.tokenizer_name_or_path=text8', 'model.hidden_size=64', 'model.n_heads=2', 'model.n_blocks=2',
        'model.cond_dim=32', 'loader.num_workers=0', 'trainer.num_sanity_val_steps=0', 'optim.lr=3e-3',
        'lr_scheduler.num_warmup_steps=10', 'trainer.log_every_n_steps=2']


def run_kaggle_train(*argv, timeout=300):
    env = dict(os.environ)
    env.pop('OWT_SUBSET_NUM', None)
    proc = subprocess.run([sys.executable, 'kaggle_train.py', *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_kaggle_train_end_to_end_with_a_resume(tmp_path):
    corpus = markov_corpus(tmp_path / 'corpus.jsonl', 300)
    common = ['--data-files', str(corpus), '--subset', '300', '--model', 'micro', '--length', '32',
              '--global-batch-size', '8', '--output-dir', str(tmp_path / 'out'), '--offline',
              '--num-samples', '3', '--eval-batches', '3', '--eval-reserve', '0']
    # Session 1 stops at its time limit (trainer.max_time, as --time-limit sets it) long before 10^6 steps.
    first = run_kaggle_train(*common, '--steps', '1000000', '--stages', 'train', *TINY, 'trainer.max_time=00:00:00:04')
    run = tmp_path / 'out' / 'local300-duo_base-micro-L32'
    step = kaggle_train.checkpoint_step(run / 'checkpoints' / 'last.ckpt')
    assert 0 < step < 1_000_000
    assert 'training stopped at step' in first and 'All tests passed!' in first
    assert not (run / 'ppl_eval.json').exists()  # --stages train
    # Session 2: the same command (and a target) resumes where session 1 stopped, then evaluates.
    second = run_kaggle_train(*common, '--steps', str(step + 6), '--skip-checks', *TINY)
    assert 'Resuming from' in second
    assert kaggle_train.checkpoint_step(run / 'checkpoints' / 'last.ckpt') == step + 6
    assert not list((run / 'checkpoints').glob('last-v*.ckpt'))
    ppl = json.loads((run / 'ppl_eval.json').read_text())
    assert ppl['tokens'] > 0 and ppl['ppl'] > 1
    samples = json.loads((run / 'samples.json').read_text())
    assert len(samples['generated_seqs']) == 3 and samples['steps'] == 8
    assert (run / 'samples.txt').read_text().count('=== sample') == 3
    assert (run / 'loss_curve.png').read_bytes()[:4] == b'\x89PNG'
    steps = [float(r['step']) for r in kaggle_train.read_csv(run / 'logs' / 'metrics.csv') if r.get('train/loss')]
    assert min(steps) < step <= max(steps)  # both sessions are in the curve
    summary = json.loads((run / 'summary.json').read_text())
    assert summary['steps_trained'] == step + 6 and summary['ppl_eval']['nll'] == ppl['nll']
    assert 'Summary:' in second and 'NLL bound' in second


@pytest.mark.slow
def test_scripts_train_evaluate_sample_and_clean(tmp_path):
    corpus = markov_corpus(tmp_path / 'corpus.jsonl', 300)
    out = tmp_path / 'out'
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(out), OWT_SUBSET_NUM='300', MODEL='micro',
               LENGTH='32', HF_HUB_OFFLINE='1', DUO_DATA_CACHE=str(out / 'data_cache'))
    tiny = [f'data.data_files={corpus}', *TINY, 'loader.batch_size=4', 'loader.global_batch_size=8',
            'trainer.max_steps=12', 'trainer.limit_val_batches=2', 'trainer.val_check_interval=1000']

    def script(name, *args):
        proc = subprocess.run(['bash', f'scripts/{name}', *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    script('train_owt_kaggle.sh', *tiny)
    run = out / 'owt300-duo_base-micro-L32'
    assert kaggle_train.checkpoint_step(run / 'checkpoints' / 'last.ckpt') == 12
    # No checkpoint given: the newest last.ckpt; the model comes from the run's config_train.yaml.
    script('eval_owt_kaggle.sh', 'trainer.limit_val_batches=2', 'loader.num_workers=0')
    assert json.loads((run / 'ppl_eval.json').read_text())['tokens'] > 0
    log = script('gen_owt_kaggle.sh', str(run / 'checkpoints' / 'last.ckpt'), 'loader.eval_batch_size=2')
    samples = json.loads((run / 'samples.json').read_text())
    assert len(samples['generated_seqs']) == 2 and samples['generative_ppl'] is None
    assert 'sampling.steps=8' in log and 'sampling.noise_removal=greedy' in log

    # The cleanup script, on a copy of the project so that nothing of this checkout is touched.
    project = tmp_path / 'project'
    (project / 'scripts').mkdir(parents=True)
    shutil.copy(ROOT / 'scripts' / 'cleanup_kaggle_cache.sh', project / 'scripts')
    home = tmp_path / 'home'
    (home / '.cache' / 'huggingface' / 'datasets').mkdir(parents=True)
    (out / 'stale' / '.last.ckpt.x1.tmp').parent.mkdir()
    (out / 'stale' / '.last.ckpt.x1.tmp').write_text('partial')
    cleanup_env = dict(env, HOME=str(home))
    cleanup_env.pop('HF_HOME', None)
    listed = subprocess.run(['bash', 'scripts/cleanup_kaggle_cache.sh', '--dry-run'], cwd=project, env=cleanup_env,
                            capture_output=True, text=True, check=True).stdout
    assert 'data_cache' in listed and (out / 'data_cache').exists()
    subprocess.run(['bash', 'scripts/cleanup_kaggle_cache.sh', '--checkpoints'], cwd=project, env=cleanup_env,
                   capture_output=True, text=True, check=True)
    assert not (out / 'data_cache').exists() and not (home / '.cache' / 'huggingface' / 'datasets').exists()
    assert not (out / 'stale' / '.last.ckpt.x1.tmp').exists()
    assert (run / 'checkpoints' / 'last.ckpt').exists() and not list((run / 'checkpoints').glob('step-*.ckpt'))


def test_scripts_are_executable_and_reject_unknown_cleanup_flags(tmp_path):
    for name in ('train_owt_kaggle.sh', 'eval_owt_kaggle.sh', 'gen_owt_kaggle.sh', 'cleanup_kaggle_cache.sh'):
        path = ROOT / 'scripts' / name
        assert path.stat().st_mode & stat.S_IXUSR
        assert subprocess.run(['bash', '-n', str(path)]).returncode == 0
    proc = subprocess.run(['bash', 'scripts/cleanup_kaggle_cache.sh', '--everything'], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and 'unknown argument' in proc.stderr
    missing = subprocess.run(['bash', 'scripts/eval_owt_kaggle.sh'], cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, OUTPUT_DIR=str(tmp_path), PYTHON=sys.executable))
    assert missing.returncode == 1 and 'no checkpoint' in missing.stderr


# ---- the notebook --------------------------------------------------------------------------
def test_notebook_is_valid_and_runs_the_workflow():
    nb = nbformat.read(ROOT / 'kaggle_notebook.ipynb', as_version=4)
    nbformat.validate(nb)
    code = [c.source for c in nb.cells if c.cell_type == 'code']
    order = ['git', 'install.sh --system', 'test_kaggle_setup.py', '--dry-run', '--stages train',
             '--stages eval', '--stages sample', 'loss_curve.png']
    positions = [next(i for i, src in enumerate(code) if needle in src) for needle in order]
    assert positions == sorted(positions)
    for src in code:  # every Python line compiles (shell lines start with !)
        compile('\n'.join(line for line in src.splitlines() if not line.lstrip().startswith('!')), 'cell', 'exec')
