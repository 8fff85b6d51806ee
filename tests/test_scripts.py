"""scripts/*.sh with upstream's names: the shared Python choice, their arguments, and the zero-shot
table (every zero-shot set in one run) on tiny local data. The SEDD / D3PM train, eval and gen
scripts run end to end in test_main.py (the algorithms learning a Markov chain)."""
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

ZERO_SHOT_SETS = ['ag_news', 'scientific_papers_pubmed', 'scientific_papers_arxiv', 'lambada', 'wikitext2',
                  'wikitext103', 'ptb', 'lm1b']
RUNNABLE = ['train_owt_sedd.sh', 'eval_owt_sedd.sh', 'gen_ppl_owt_sedd.sh', 'train_lm1b_d3pm.sh', 'zero_shot.sh',
            'zero_shot_ar.sh', 'zero_shot_mdlm.sh', 'zero_shot_duo.sh', 'zero_shot_sedd.sh']


def script_env(tmp_path, **extra):
    return dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path / 'out'), HF_HUB_OFFLINE='1',
                HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', WANDB_MODE='offline', **extra)


def test_scripts_are_executable_and_parse():
    for name in RUNNABLE:
        path = ROOT / 'scripts' / name
        assert path.stat().st_mode & stat.S_IXUSR, name
        assert subprocess.run(['bash', '-n', str(path)]).returncode == 0, name
    for name in ('env.sh', 'checkpoint_args.sh'):  # sourced, never run
        assert subprocess.run(['bash', '-n', str(ROOT / 'scripts' / name)]).returncode == 0


def test_scripts_use_the_venv_python_when_there_is_one(tmp_path):
    """scripts/env.sh: $PYTHON, else the project's ./.venv/bin/python, else python."""
    project = tmp_path / 'project'
    (project / 'scripts').mkdir(parents=True)
    shutil.copy(ROOT / 'scripts' / 'env.sh', project / 'scripts')
    (project / 'scripts' / 'show.sh').write_text('source "$(dirname "$0")/env.sh"\necho "$PY|$PWD"\n')

    def chosen(**env):
        base = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
        out = subprocess.run(['bash', str(project / 'scripts' / 'show.sh')], cwd=tmp_path, env={**base, **env},
                             capture_output=True, text=True, check=True).stdout.strip()
        py, cwd = out.split('|')
        assert cwd == str(project)  # the scripts run from the project root, wherever they are called from
        return py
    assert chosen() == 'python'
    venv = project / '.venv' / 'bin' / 'python'
    venv.parent.mkdir(parents=True)
    venv.write_text('#!/bin/sh\n')
    venv.chmod(0o755)
    assert chosen() == str(venv)
    assert chosen(PYTHON='/opt/py/bin/python3') == '/opt/py/bin/python3'


@pytest.mark.parametrize('name', ['eval_owt_sedd.sh', 'gen_ppl_owt_sedd.sh', 'zero_shot_sedd.sh', 'zero_shot_ar.sh'])
def test_scripts_without_their_checkpoint_say_so(tmp_path, name):
    proc = subprocess.run(['bash', f'scripts/{name}', 'sampling.steps=4'], cwd=ROOT, env=script_env(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith('error: pass the ') and proc.stderr.count('\n') == 1
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_zero_shot_script_evaluates_every_set_in_one_run(tmp_path):
    """zero_shot_sedd.sh on an upstream-layout SEDD checkpoint, offline: each of the eight sets read
    from ZERO_SHOT_DATA_DIR/<set>/ with its own detokenizer, one table, one JSON; the bound of a set
    equals what a single-set ppl_eval of it reports."""
    from test_checkpoints import save_upstream, trained_sedd
    save_upstream(trained_sedd(), tmp_path / 'sedd.ckpt')
    data = tmp_path / 'zero_shot'
    for i, name in enumerate(ZERO_SHOT_SETS):
        (data / name).mkdir(parents=True)
        words = ['the', 'cat', 'sat', 'on', 'mat', 'while', 'dogs', 'ran', name.replace('_', ' ')]
        g = torch.Generator().manual_seed(i)
        lines = [' '.join(words[j] for j in torch.randint(0, len(words), (12,), generator=g)) for _ in range(20)]
        (data / name / 'valid.txt').write_text('\n'.join(lines) + '\n')
    tiny = ['trainer.accelerator=cpu', 'loader.num_workers=0', f'data.cache_dir={tmp_path}/cache']
    env = script_env(tmp_path, ZERO_SHOT_DATA_DIR=str(data))
    proc = subprocess.run(['bash', 'scripts/zero_shot_sedd.sh', str(tmp_path / 'sedd.ckpt'), *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / 'out' / 'zero_shot_sedd' / 'ppl_eval.json').read_text())
    assert result['algo'] == 'sedd' and list(result['datasets']) == ZERO_SHOT_SETS
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith('dataset'))
    for name, line in zip(ZERO_SHOT_SETS, table[header + 1:header + 9]):
        r = result['datasets'][name]
        assert line.split()[:3] == [name, str(r['tokens']), f"{r['nll']:.4f}"] and r['tokens'] > 0
        assert f'{data}/{name}/*' in r['data']
    # one set alone, as upstream's per-set command: the same bound
    ptb = subprocess.run([sys.executable, 'main.py', 'mode=ppl_eval', 'data=ptb', 'data.tokenizer_name_or_path=text8',
                          f"data.data_files={{validation:'{data}/ptb/*'}}", f'eval.checkpoint_path={tmp_path}/sedd.ckpt',
                          f'hydra.run.dir={tmp_path}/ptb', *tiny], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ptb.returncode == 0, ptb.stderr[-3000:]
    single = json.loads((tmp_path / 'ptb' / 'ppl_eval.json').read_text())
    assert single['nll'] == result['datasets']['ptb']['nll'] and single['tokens'] == result['datasets']['ptb']['tokens']


@pytest.mark.slow
def test_gen_owt_kaggle_samples_a_sedd_checkpoint_with_its_own_noise_removal(tmp_path):
    """gen_owt_kaggle.sh passes Greedy-Tail's sampling.noise_removal=greedy, which SEDD does not
    have (as upstream): for a SEDD checkpoint it reads the algorithm from the file and passes
    ancestral; the samples are written."""
    from test_checkpoints import save_upstream, trained_sedd
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    save_upstream(trained_sedd(), run / 'checkpoints' / 'last.ckpt')
    proc = subprocess.run(['bash', 'scripts/gen_owt_kaggle.sh', str(run / 'checkpoints' / 'last.ckpt'),
                           'trainer.accelerator=cpu', 'loader.eval_batch_size=2', 'sampling.steps=4',
                           'eval.compute_generative_perplexity=false'], cwd=ROOT, env=script_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'sampling.noise_removal=ancestral' in proc.stdout
    samples = json.loads((run / 'samples.json').read_text())
    assert samples['algo'] == 'sedd' and len(samples['generated_seqs']) == 2
