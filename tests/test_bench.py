"""The bench/ scripts run from a checkout and write what their tables print (tiny sizes here: the
figures themselves are measured with the scripts' defaults, not in tests)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED_CORPUS

TINY_DIT = ['--hidden', '32', '--blocks', '1', '--heads', '2', '--cond', '16', '--vocab', '64']


def run_bench(script, *args):
    subprocess.run([sys.executable, str(ROOT / 'bench' / script), *args], check=True, cwd=ROOT,
                   capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_train_measures_ours_and_a_reference_that_computes_the_same_loss(tmp_path):
    algos = ('duo_base', 'duo', 'duo-topk', 'sedd', 'd3pm')  # d3pm's reference: upstream's materialising form with the right alpha_s
    run_bench('bench_train.py', '--algos', *algos, *TINY_DIT, '--batch', '2', '--length', '16',
              '--steps', '1', '--repeats', '1', '--out', str(tmp_path))
    record = json.loads(next(tmp_path.glob('train-*.json')).read_text())
    rows = {(r['algo'], r['impl']): r for r in record['results']}
    # the top-k curriculum has no upstream-style reference (upstream's top-k code is wrong, SPEC-2 §14)
    assert set(rows) == {(a, impl) for a in algos for impl in ('ours', 'reference')} - {('duo-topk', 'reference')}
    for (algo, impl), row in rows.items():
        assert row['tokens_per_s'] > 0 and row['peak_rise_bytes'] > 0, (algo, impl)
        if impl == 'ours' and algo != 'duo-topk':  # same seed, batch and Gaussian latent at the first step: the same loss
            assert row['loss_diff_vs_reference'] < 1e-5
    for algo in ('duo', 'duo-topk'):  # both curricula against DUO-base of the same run
        assert rows[(algo, 'ours')]['step_vs_duo_base'] > 0 and rows[(algo, 'ours')]['memory_vs_duo_base'] > 0
    assert record['top_k'] == 2


def test_bench_sampling_reports_throughput_and_overhead_per_algorithm(tmp_path):
    run_bench('bench_sampling.py', *TINY_DIT, '--length', '16', '--batch', '2', '--steps', '4', '--out', str(tmp_path),
              '--algos', 'ar', 'mdlm', 'mdlm_uncached', 'sedd', 'd3pm', 'duo_base')
    record = json.loads(next(tmp_path.glob('sampling-*.json')).read_text())
    rows = {(r['algo'], r['sampler'], r['steps']) for r in record['results']}
    assert rows == {('ar', s, 15) for s in ('ours', 'naive')} | {
        (a, s, 4) for a in ('mdlm', 'duo_base') for s in ('ours', 'psi', 'naive')} | {
        ('sedd', s, 4) for s in ('ours', 'naive')} | {(a, 'ours', 4) for a in ('mdlm_uncached', 'd3pm')}
    for row in record['results']:
        assert row['tokens_per_s'] > 0 and 0 <= row['outside_share'] < 1
        assert ('vs_ancestral' in row) == (row['sampler'] == 'psi')


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CORPUS.exists(), reason='needs ../shared/corpus')
def test_bench_data_builds_the_cache_and_times_a_warm_start(tmp_path):
    out = tmp_path / 'data.json'
    (tmp_path / 'caches').mkdir()
    run_bench('bench_data.py', '--subset', '200', '--length', '128', '--num-proc', '1', '--tmp', str(tmp_path / 'caches'),
              '--out', str(out))
    (row,) = json.loads(out.read_text())['results']
    # OWT_SUBSET_NUM=200 -> 180 train and 20 validation documents (the last 10% held out)
    assert (row['train_documents'], row['validation_documents']) == (180, 20)
    assert row['tokens'] > 0 and row['blocks']['train'] > 0 and row['cache_hit_s'] < row['build_s']
    assert row['fresh_process_start']['total_s'] > 0


def test_bench_harness_reports_each_estimator_against_ar(tmp_path):
    run_bench('bench_harness.py', *TINY_DIT, '--context', '6', '--continuation', '3', '--requests', '3', '--batch', '8',
              '--samples', '4', '--out', str(tmp_path))
    record = json.loads(next(tmp_path.glob('harness-*.json')).read_text())
    rows = {(r['algo'], r['estimator'], r['samples']): r for r in record['results']}
    assert set(rows) == {('ar', 'exact', 0), ('mdlm', 't', 4), ('mdlm', 'llada', 4), ('sedd', 't', 4), ('d3pm', 't', 4),
                         ('duo_base', 't', 4)}
    assert rows['ar', 'exact', 0]['time_vs_ar'] == 1.0
    for row in rows.values():
        assert row['requests_per_s'] > 0 and row['mean_ll'] < 0
