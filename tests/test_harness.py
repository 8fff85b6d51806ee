"""harness.py: lm-eval's `dlm` model, in-process and through lm-eval's real command line.

Skipped where lm-eval is not installed (CI installs requirements.txt only; the estimator maths is
tested without it in test_likelihood.py). The slow tests train tiny ar, mdlm, duo_base, sedd and d3pm
models with main.py and run the local multiple-choice task tests/lm_eval_tasks/duo_local_mc.yaml end to end.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip('lm_eval')

from conftest import ROOT  # noqa: E402
from errors import ConfigError  # noqa: E402
from test_likelihood import naive_ar  # noqa: E402
from test_main import common, only_letter, run_main, saved_model, write_markov_corpus  # noqa: E402

ENV = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', WANDB_MODE='offline')
# Python code that a test's interpreter runs first: the environment may hold another checkout's
# duo_lm_eval.pth (its plugin imported at start-up, its directory on the path, its import hook waiting
# for lm-eval), which would register that checkout's harness as `dlm`; forget it, so that the
# subprocesses below run this checkout's code.
FORGET_INSTALLED_PLUGIN = ('import sys; sys.modules.pop("duo_lm_eval", None); '
                           'sys.path[:] = [p for p in sys.path if not p.endswith("lm_eval_plugin")]; '
                           'sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_RegisterDLM"]; ')


def instance(context, continuation, kind='loglikelihood'):
    from lm_eval.api.instance import Instance
    args = (context, continuation) if kind == 'loglikelihood' else (context,)
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def dlm(path, **kwargs):
    import harness
    return harness.DLM(checkpoint_path=str(path), device='cpu', **{'batch_size': 8, **kwargs})


def random_weights(name, p):
    torch.manual_seed(sum(map(ord, name)))
    return torch.randn_like(p) * 0.3


@pytest.fixture(scope='module')
def ar_checkpoint(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp('ar'), 'ar', raw=random_weights, ema=random_weights)


def encode(text):
    from dataloader import Text8Tokenizer
    return Text8Tokenizer().encode(text)


BOS, MASK = 2, 4  # Text8Tokenizer's [BOS] and [MASK]


def exact(model, prefix, continuation):
    """(log p(continuation | prefix), greedy) by test_likelihood's per-token loop."""
    return naive_ar(model.model.backbone, prefix, continuation, MASK)


def test_dlm_uses_the_ema_weights(tmp_path):
    """Raw weights that write only 'z', an EMA that writes only 'b': the harness scores with the EMA."""
    model = dlm(saved_model(tmp_path, 'ar', raw=only_letter('z'), ema=only_letter('b')))
    (b_ll, b_greedy), (z_ll, _) = model.loglikelihood([instance('ab', 'bbb'), instance('ab', 'zzz')])
    assert b_ll > -0.1 and b_greedy and z_ll < -50


def test_dlm_tokenises_as_lm_eval_with_bos_first(ar_checkpoint):
    """[BOS] + context + continuation, the context's trailing spaces moved to the continuation."""
    model = dlm(ar_checkpoint)
    (ll, greedy), = model.loglikelihood([instance('abc d ', 'cab')])
    prefix, continuation = [BOS, *encode('abc d')], encode(' cab')
    expected, expected_greedy = exact(model, prefix, continuation)
    assert ll == pytest.approx(expected, abs=1e-5) and greedy == expected_greedy
    (empty, _), = model.loglikelihood([instance('', 'cab')])
    assert empty == pytest.approx(exact(model, [BOS], encode('cab'))[0], abs=1e-5)
    assert model.scores[-1].tokens == 3


def test_over_length_item_is_truncated_never_scored_zero(ar_checkpoint):
    """A context longer than the model loses its oldest tokens (BOS kept first); the item is scored,
    and its log-likelihood is that of the truncated sequence, not upstream's 0.0."""
    model = dlm(ar_checkpoint)
    length = int(model.config.model.length)  # AR: a scored sequence may have length + 1 tokens
    context = 'abcd' * 10
    (ll, _), = model.loglikelihood([instance(context, 'dab')])
    kept = encode(context)[-(length + 1 - 1 - 3):]
    assert ll == pytest.approx(exact(model, [BOS, *kept], encode('dab'))[0], abs=1e-5)
    assert ll < 0 and model.scores[-1].dropped == 40 - len(kept)


def test_rolling_loglikelihood_sums_non_overlapping_windows(ar_checkpoint):
    """AR: log p(document) over lm-eval's windows, recomputed here token by token: token j is predicted
    from [BOS] + d_<j in the first window, from d_15.. in the second, and the last (partial) window
    takes as much earlier context as fits."""
    model = dlm(ar_checkpoint)
    length = int(model.config.model.length)
    assert length == 16
    text = 'abcd abd cab dcba bdca abcdab cd abc'
    d = encode(text)
    assert len(d) == 36
    total = 0.0
    for j in range(len(d)):
        if j < 16:
            context = [BOS, *d[:j]]
        elif j < 32:
            context = d[15:j]
        else:
            context = d[36 - 16 - 1:j]  # the last window's input is the 16 tokens before its end
        total += exact(model, context, [d[j]])[0]
    (rolled,) = model.loglikelihood_rolling([instance(text, None, 'loglikelihood_rolling')])
    assert rolled == pytest.approx(total, abs=1e-4)


def test_diffusion_rolling_window_agrees_with_its_loglikelihood(tmp_path):
    """mdlm: a document shorter than a window is one request ([BOS] + document), so its rolling value
    and the loglikelihood of the document after an empty context estimate the same bound."""
    model = dlm(saved_model(tmp_path, 'mdlm', raw=random_weights, ema=random_weights), num_mc_samples=256,
                estimator='llada')
    (ll, _), = model.loglikelihood([instance('', 'abcd ab')])
    se_ll = model.scores[-1].se
    (rolled,) = model.loglikelihood_rolling([instance('abcd ab', None, 'loglikelihood_rolling')])
    se_rolled = model.scores[-1].se
    assert ll < 0 and rolled < 0 and se_ll > 0 and se_rolled > 0
    assert abs(ll - rolled) < 5 * math.hypot(se_ll, se_rolled)


def test_bad_model_args_give_one_line(ar_checkpoint, tmp_path, caplog):
    with pytest.raises(ConfigError, match=r'^model_args num_samples unknown to --model dlm: use checkpoint_path'):
        dlm(ar_checkpoint, num_samples=5)
    with pytest.raises(ConfigError, match=r'^--model dlm needs a checkpoint'):
        dlm('')
    with pytest.raises(ConfigError, match=r'^estimator=exact is unknown: use t or llada'):
        dlm(ar_checkpoint, estimator='exact')
    with pytest.raises(ConfigError, match=r'^--batch_size auto is not supported'):
        dlm(ar_checkpoint, batch_size='auto')
    duo = saved_model(tmp_path, 'duo_base', raw=random_weights, ema=random_weights)
    with pytest.raises(ConfigError, match=r'^estimator=llada does not apply to algo=duo_base: use t'):
        dlm(duo, estimator='llada')
    dlm(ar_checkpoint, loss_avg_mode='full', num_proc=8)  # upstream's command lines keep working
    assert 'loss_avg_mode, num_proc: upstream settings' in caplog.text


def plugin():
    """This checkout's lm_eval_plugin/duo_lm_eval.py (not one an installed .pth may have imported)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('duo_lm_eval_here', ROOT / 'lm_eval_plugin' / 'duo_lm_eval.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plugin_registers_dlm_only_when_lm_eval_is_imported(tmp_path):
    """The .pth that ./install.sh --lm-eval writes: a fresh interpreter imports neither lm-eval nor
    harness.py at start-up, and lm-eval's registry then knows `dlm` (a lazy reference to harness.DLM)."""
    pth = plugin().install(str(tmp_path))
    assert open(pth).read() == f'{ROOT / "lm_eval_plugin"}\nimport duo_lm_eval\n'
    code = (FORGET_INSTALLED_PLUGIN + 'import site, sys; site.addsitedir(sys.argv[1]); '
            'print(sorted(m for m in ("lm_eval", "harness", "torch") if m in sys.modules)); '
            'from lm_eval.api.registry import model_registry; print(model_registry._objs["dlm"])')
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, cwd='/',
                         env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split('\n')[:2] == ['[]', 'duo_lm_eval:DLM']


# ---- the real command line on trained models -------------------------------------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Tiny ar, mdlm, duo_base, sedd and d3pm models trained with main.py on the Markov chain the task is
    drawn from."""
    base = tmp_path_factory.mktemp('harness_cli')
    write_markov_corpus(base, 60_000, 3_000)
    site = base / 'site'
    site.mkdir()
    plugin().install(str(site))
    paths = {}
    # SEDD at common()'s optim.lr=3e-3 learned the chain but not for rows shorter than its training blocks
    # (local-task accuracy 0.6, as a time-conditioned MDLM's); at 1e-3 it does in the same 300 steps
    for algo, steps, extra in (('ar', 150, []), ('mdlm', 300, []), ('duo_base', 300, []),
                               ('sedd', 300, ['optim.lr=1e-3']), ('d3pm', 300, [])):
        run_main('mode=train', f'trainer.max_steps={steps}', 'training.ema=0.9', *common(base, base / algo, algo),
                 *extra)
        paths[algo] = base / algo / 'checkpoints' / 'last.ckpt'
    return base, site, paths


def local_task(command, out_dir):
    """Run a command line of lm-eval on the local task; its results JSON."""
    proc = subprocess.run(command + ['--tasks', 'duo_local_mc', '--include_path', 'tests/lm_eval_tasks',
                                     '--output_path', str(out_dir)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted(out_dir.rglob('results_*.json'))
    assert found, proc.stderr[-2000:]
    return json.loads(found[-1].read_text())['results']['duo_local_mc'], proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('algo', ['ar', 'mdlm', 'duo_base', 'sedd', 'd3pm'])
def test_lm_eval_command_line_runs_the_local_task(trained, algo):
    """`lm_eval --model dlm` (lm-eval's own CLI, finding dlm through the installed .pth) on the local task:
    the most likely continuation wins (every distractor is 50 times less likely under the chain)."""
    base, site, paths = trained
    launcher = (FORGET_INSTALLED_PLUGIN + 'import site, sys; site.addsitedir(sys.argv.pop(1)); '
                'sys.argv[0] = "lm_eval"; from lm_eval.__main__ import cli_evaluate; cli_evaluate()')
    args = f'checkpoint_path={paths[algo]},num_mc_samples=64'
    results, log = local_task([sys.executable, '-c', launcher, str(site), '--model', 'dlm', '--model_args', args,
                               '--batch_size', '64'], base / f'out_{algo}')
    print(f'{algo}: acc {results["acc,none"]:.3f} acc_norm {results["acc_norm,none"]:.3f}')
    assert results['acc,none'] >= 0.75 and results['acc_norm,none'] >= 0.75
    assert 'over-length requests lost their oldest context tokens' in log
    if algo != 'ar':
        assert 'samples each: standard error of ll median' in log


@pytest.mark.slow
def test_harness_py_takes_lm_evals_command_line(trained):
    """`python harness.py` (no plugin needed) with LLaDA's estimator on the mdlm model (run as that command
    runs it, after FORGET_INSTALLED_PLUGIN)."""
    base, _, paths = trained
    python_harness_py = [sys.executable, '-c', FORGET_INSTALLED_PLUGIN + 'import runpy; sys.argv[0] = "harness.py"; '
                         'runpy.run_path("harness.py", run_name="__main__")']
    args = f'checkpoint_path={paths["mdlm"]},num_mc_samples=64,estimator=llada'
    results, _ = local_task([*python_harness_py, '--model', 'dlm', '--model_args', args, '--batch_size', '64'],
                            base / 'out_wrapper')
    print(f'mdlm (llada): acc {results["acc,none"]:.3f} acc_norm {results["acc_norm,none"]:.3f}')
    assert results['acc,none'] >= 0.75
    bad = subprocess.run([*python_harness_py, '--model', 'dlm', '--model_args',
                          f'checkpoint_path={paths["mdlm"]},estimator=exact', '--tasks', 'duo_local_mc',
                          '--include_path', 'tests/lm_eval_tasks'], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        'error: estimator=exact is unknown: use t or llada (e.g. estimator=t)'
