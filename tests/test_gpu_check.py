"""bench/gpu_check.py, the device check: at tiny sizes on the CPU it runs every item (so it is known to
start before any GPU time is spent), and its driver isolates items: an item that hangs, crashes its
process or outlives the total budget costs only itself."""
import argparse
import json
import subprocess
import sys
import time

import pytest

import algorithms
from conftest import ROOT

sys.path.insert(0, str(ROOT / 'bench'))
import gpu_check  # noqa: E402

CUDA_ONLY = ('attention/', 'memory/', 'tf32/', 'compile/')
PRECISIONS = ('bf16-mixed', '16-mixed')


def expected_items():
    """What the issue asks for, from the registry: (name prefix, name suffix) pairs."""
    want = [('env', '')] + [(f'train/{a}/', f'/{p}') for a in algorithms.ALGORITHMS for p in PRECISIONS]
    want += [(f'ppl_eval/{a}', '') for a in algorithms.ALGORITHMS]
    want += [('attention/bidirectional', ''), ('attention/causal', ''), ('tf32/duo_base', ''),
             ('compile/duo_base', ''), ('sample/duo_base/ancestral', ''), ('sample/duo_base/greedy_tail', ''),
             ('sample/mdlm/cached', ''), ('sample/ar/kv_cache', '')]
    want += [(f'memory/{a}', '') for a in ('duo_base', 'duo', 'mdlm')]
    return want


def test_every_item_runs_at_tiny_sizes_on_the_cpu_and_passes_its_checks(tmp_path, capsys):
    out = tmp_path / 'check.json'
    rc = gpu_check.main(['--device', 'cpu', '--tiny', '--inline', '--out', str(out)])
    items = json.loads(out.read_text())['items']
    for prefix, suffix in expected_items():
        assert any(n.startswith(prefix) and n.endswith(suffix) for n in items), (prefix, suffix, sorted(items))
    for name, item in items.items():
        if name.startswith(CUDA_ONLY):
            assert item['status'] == 'skipped' and item['reason'], name
            continue
        assert item['status'] == 'ok', (name, item.get('error'), item.get('traceback'))
        assert item['seconds'] > 0 and item['summary']
        failed = {k: c for k, c in item['checks'].items() if not c['pass']}
        assert not failed, (name, failed)
    for name, item in items.items():
        if name.startswith('train/') and name.endswith('/16-mixed'):  # the forced overflow and the checkpoint
            assert {'overflow_step_skipped', 'overflow_no_update', 'overflow_scale_lowered', 'only_forced_step_skipped',
                    'checkpoint_finite'} <= set(item['checks']), name
        if name.startswith('train/'):
            assert item['checks']['loss_vs_fp32']['value'] <= 1e-2
    assert rc == 0
    table = capsys.readouterr().out
    assert all(name in table for name in items) and f'wrote {out}' in table


FAKE_WORKER = '''
import json, os, sys, time
argv = sys.argv[1:]
scratch = argv[argv.index('--scratch') + 1]
names = json.load(open(argv[argv.index('--names-file') + 1])) if '--names-file' in argv else None
ITEMS = {items!r}

def emit(event):
    with open(os.path.join(scratch, 'events.jsonl'), 'a') as f:
        f.write(json.dumps(event) + '\\n')

emit({{'event': 'plan', 'items': [{{'name': n, 'budget_s': {budget}}} for n in ITEMS]}})
for name in ITEMS:
    if names is not None and name not in names:
        continue
    emit({{'event': 'start', 'item': name, 'time': time.time()}})
    if name == 'hang':
        with open(os.path.join(scratch, 'hung.pid'), 'w') as f:
            f.write(str(os.getpid()))
        time.sleep(600)
    if name == 'crash':
        os._exit(3)
    emit({{'event': 'result', 'item': name, 'result': {{'status': 'ok', 'seconds': 0.01, 'checks': {{}}}}}})
'''


def drive_fake(tmp_path, monkeypatch, items, budget, total):
    worker = tmp_path / 'worker.py'
    worker.write_text(FAKE_WORKER.format(items=items, budget=budget))
    scratch = tmp_path / 'scratch'
    scratch.mkdir()
    monkeypatch.setattr(gpu_check, 'KILL_GRACE_S', 0.5)
    monkeypatch.setattr(gpu_check, 'START_MARGIN_S', 0.5)
    args = argparse.Namespace(scratch=str(scratch), deadline=time.time() + total, time_budget=total, device='cpu',
                              tiny=False, memory_cap_gib=1.0, peak_tflops=None, only=None)
    record = gpu_check.Record(args, tmp_path / 'record.json')
    gpu_check.drive(args, record, worker=[sys.executable, str(worker)])
    return json.loads((tmp_path / 'record.json').read_text())['items'], scratch


def test_a_hung_item_is_killed_and_a_crashed_worker_costs_one_item(tmp_path, monkeypatch):
    items, scratch = drive_fake(tmp_path, monkeypatch, ['a', 'hang', 'b', 'crash', 'c'], budget=1, total=60)
    assert {n: r['status'] for n, r in items.items()} == {
        'a': 'ok', 'hang': 'timeout', 'b': 'ok', 'crash': 'crashed', 'c': 'ok'}
    assert 'over its budget' in items['hang']['reason'] and 'status 3' in items['crash']['reason']
    pid = int((scratch / 'hung.pid').read_text())
    assert subprocess.run(['kill', '-0', str(pid)], capture_output=True).returncode != 0  # gone


def test_items_left_when_the_total_budget_runs_out_are_recorded_as_skipped(tmp_path, monkeypatch):
    items, _ = drive_fake(tmp_path, monkeypatch, ['a', 'hang', 'b'], budget=100, total=2.5)
    assert items['a']['status'] == 'ok'
    assert items['hang']['status'] == 'timeout' and 'time-budget' in items['hang']['reason']
    assert items['b']['status'] == 'skipped' and 'not started' in items['b']['reason']


@pytest.mark.slow
def test_the_command_line_writes_the_json_and_the_table(tmp_path):
    out = tmp_path / 'check.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'bench' / 'gpu_check.py'), '--device', 'cpu', '--tiny',
                           '--only', 'env', 'train/duo_base/*', 'attention/*', '--out', str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    items = json.loads(out.read_text())['items']
    assert set(items) == {'env', 'train/duo_base/bf16-mixed', 'train/duo_base/16-mixed', 'attention/bidirectional',
                          'attention/causal'}
    statuses = [items[n]['status'] for n in ('env', 'train/duo_base/16-mixed', 'attention/causal')]
    assert statuses == ['ok', 'ok', 'skipped']
    assert 'train/duo_base/16-mixed' in proc.stdout and f'wrote {out}' in proc.stdout
