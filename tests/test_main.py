"""End to end through `python main.py`, as a user runs it: train -> checkpoint -> resume -> ppl_eval.

The corpus is drawn from a first-order Markov chain over 5 characters, so the exact
log-likelihood of every validation block is known: a reported bound must never fall below
it, and AR (which can represent the chain exactly) must come close to it.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

ALPHABET = 'abcd '
TRANSITIONS = np.array([[0.05, 0.80, 0.05, 0.05, 0.05],
                        [0.10, 0.10, 0.70, 0.05, 0.05],
                        [0.05, 0.05, 0.10, 0.70, 0.10],
                        [0.60, 0.10, 0.10, 0.10, 0.10],
                        [0.35, 0.35, 0.20, 0.10, 0.00]])  # no double spaces: text8 would merge them
LENGTH = 32  # blocks are [BOS] + 30 characters + [EOS]


def stationary(P):
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmax(np.real(w))])
    return pi / pi.sum()


def markov_text(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    pi, cdf = stationary(TRANSITIONS), TRANSITIONS.cumsum(1)
    states = [rng.choice(len(pi), p=pi)]
    for u in rng.random(n - 1):
        states.append(min(int(np.searchsorted(cdf[states[-1]], u)), len(pi) - 1))
    return ''.join(ALPHABET[s] for s in states)


def exact_block_nll(text: str) -> tuple[float, int]:
    """(sum of -log p(block) over the wrapped validation blocks, number of blocks).

    BOS and EOS are deterministic, so a block's probability is that of its 30 characters under
    the stationary chain: pi(c_0) prod P(c_i, c_i+1).
    """
    states = np.array([ALPHABET.index(c) for c in text])
    chunk = LENGTH - 2
    n = len(states) // chunk
    blocks = states[:n * chunk].reshape(n, chunk)
    log_p = np.log(stationary(TRANSITIONS))[blocks[:, 0]].sum()
    log_p += np.log(TRANSITIONS[blocks[:, :-1], blocks[:, 1:]]).sum()
    return -float(log_p), n


@pytest.fixture(scope='module')
def markov_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('markov')
    valid = write_markov_corpus(d, 100_000, 30_000)
    from dataloader import Text8Tokenizer
    tok = Text8Tokenizer()
    assert tok.decode(tok.encode(valid)) == valid  # the tokenizer sees exactly the chain's text
    return d, valid


def write_markov_corpus(d, n_train: int, n_valid: int) -> str:
    """d/train.txt and d/valid.txt: n_train and n_valid characters of the chain; returns the validation text."""
    (d / 'train.txt').write_text(markov_text(n_train, seed=0))
    valid = markov_text(n_valid, seed=1)
    (d / 'valid.txt').write_text(valid)
    return valid


def run_main(*overrides, check=True, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               WANDB_MODE='offline')
    proc = subprocess.run([sys.executable, 'main.py', *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'main.py {" ".join(overrides)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
    return proc


def common(corpus_dir, run_dir, algo):
    return [f'algo={algo}', 'data=local', f'data.train_files={corpus_dir}/train.txt',
            f'data.valid_files={corpus_dir}/valid.txt', 'data.tokenizer_name_or_path=text8',
            f'data.cache_dir={corpus_dir}/cache', 'model=micro', f'model.length={LENGTH}', 'model.hidden_size=64',
            'model.n_heads=2', 'model.n_blocks=2', 'model.cond_dim=32', 'loader.global_batch_size=32',
            'loader.num_workers=0', 'optim.lr=3e-3', 'lr_scheduler.num_warmup_steps=20',
            'trainer.num_sanity_val_steps=0', 'trainer.val_check_interval=1000', f'hydra.run.dir={run_dir}']


@pytest.mark.slow
def test_ar_train_resume_eval_reaches_the_source_entropy(markov_corpus, tmp_path):
    corpus_dir, valid = markov_corpus
    args = common(corpus_dir, tmp_path / 'run', 'ar') + ['training.ema=0', 'checkpointing.every_n_train_steps=100']
    run_main('mode=train', 'trainer.max_steps=150', *args)
    ckpts = tmp_path / 'run' / 'checkpoints'
    assert (ckpts / 'last.ckpt').exists() and (ckpts / 'step-100.ckpt').exists()
    resumed = run_main('mode=train', 'trainer.max_steps=300', *args)
    assert 'Resuming from' in resumed.stderr + resumed.stdout
    assert (ckpts / 'step-300.ckpt').exists()
    run_main('mode=ppl_eval', *args)
    result = json.loads((tmp_path / 'run' / 'ppl_eval.json').read_text())
    assert set(result) >= {'nll', 'ppl', 'bpd', 'tokens'}
    total, n_blocks = exact_block_nll(valid)
    assert result['tokens'] == n_blocks * (LENGTH - 1)  # AR predicts positions 1..L-1
    exact = total / result['tokens']
    assert result['ppl'] == pytest.approx(np.exp(result['nll']), rel=1e-5)
    assert result['bpd'] == pytest.approx(result['nll'] / np.log(2), rel=1e-5)
    # Cross-entropy >= entropy (tolerance: the estimate is on a finite sample), and AR gets close.
    assert exact - 2e-3 <= result['nll'] <= 1.05 * exact, (result['nll'], exact)

    # Its samples follow the chain: every row of the empirical transition matrix is close to P's.
    run_main('mode=sample_eval', 'sampling.num_sample_batches=4', 'loader.eval_batch_size=32',
             'eval.compute_generative_perplexity=false', *args)
    samples = json.loads((tmp_path / 'run' / 'samples.json').read_text())['generated_seqs']
    assert len(samples) == 128
    assert transition_error(samples) < 0.08


def transition_error(samples) -> float:
    """Largest |P_empirical - P| over the letter-transition matrix of sampled texts (special tokens
    such as [BOS]/[EOS] removed); letters the corpus never has must be rare."""
    chars = [re.sub(r'\[[A-Z]+\]', '', text) for text in samples]
    # Letters the corpus never has keep a small probability after a short training: rare, not absent.
    assert sum(c not in ALPHABET for text in chars for c in text) <= 0.005 * sum(map(len, chars))
    counts = np.zeros_like(TRANSITIONS)
    for text in chars:
        pairs = [(ALPHABET.index(a), ALPHABET.index(b)) for a, b in zip(text, text[1:])
                 if a in ALPHABET and b in ALPHABET]
        np.add.at(counts, tuple(np.array(pairs).T), 1)
    assert counts.sum() >= len(samples) * 25
    empirical = counts / counts.sum(1, keepdims=True)
    return float(np.abs(empirical - TRANSITIONS).max())


def unigram_nll(text: str, n_blocks: int) -> float:
    """Per-position NLL of the validation blocks under the chain's stationary letter distribution (a
    model of letter frequencies only: it knows the BOS/EOS positions, nothing of the transitions)."""
    states = np.array([ALPHABET.index(c) for c in text[:n_blocks * (LENGTH - 2)]])
    return float(-np.log(stationary(TRANSITIONS))[states].sum() / (n_blocks * LENGTH))


@pytest.mark.slow
@pytest.mark.parametrize('algo', ['mdlm', 'duo_base'])
def test_diffusion_bound_is_never_below_the_source_entropy(markov_corpus, tmp_path, algo):
    corpus_dir, valid = markov_corpus
    args = common(corpus_dir, tmp_path / 'run', algo)
    run_main('mode=train', 'trainer.max_steps=250', *args)
    run_main('mode=ppl_eval', *args)
    result = json.loads((tmp_path / 'run' / 'ppl_eval.json').read_text())
    total, n_blocks = exact_block_nll(valid)
    assert result['tokens'] == n_blocks * LENGTH  # diffusion counts every position
    assert result['nll'] >= total / result['tokens'], (result['nll'], total / result['tokens'])
    # ... and from above: trained, the bound comes within 0.75 nats of the exact NLL (an untrained
    # model is at about log K = 3.6, a bound counted twice at about 2 x 1.5)
    assert result['nll'] < total / result['tokens'] + 0.75, (result['nll'], total / result['tokens'])


def run_script(name, *args, out_dir):
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(out_dir), HF_HUB_OFFLINE='1',
               HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', WANDB_MODE='offline')
    proc = subprocess.run(['bash', f'scripts/{name}', *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f'{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}'
    return proc.stdout + proc.stderr


# The SEDD / D3PM runs below: 800 steps at lr 1e-3 without EMA reach a bound about 0.05-0.07
# nats above the chain's entropy rate (0.98 nats/position here, the unigram model 1.44) and
# sample transitions within 0.11-0.15 of P (measured; letters drawn from the stationary
# distribution, ignoring the chain, would be 0.55 off; with 64, 128, 256 sampling steps the same
# SEDD model gave 0.13, 0.14, 0.11: what is left is the model's, not the sampler's).
CHAIN_RUN = ['trainer.max_steps=800', 'optim.lr=1e-3', 'training.ema=0', 'loader.batch_size=32', 'loader.eval_batch_size=32']
SAMPLES = ['sampling.num_sample_batches=1', 'loader.eval_batch_size=128', 'eval.compute_generative_perplexity=false']


def check_learnt_the_chain(result, samples, valid, algo):
    total, n_blocks = exact_block_nll(valid)
    assert result['algo'] == algo and result['tokens'] == n_blocks * LENGTH  # every position counts
    exact, unigram, error = total / result['tokens'], unigram_nll(valid, n_blocks), transition_error(samples)
    print(f"{algo}: bound {result['nll']:.4f} nats/position, exact {exact:.4f}, unigram {unigram:.4f}; "
          f"sample transitions {error:.3f} from the chain's")  # shown with pytest -s
    assert exact <= result['nll'] < unigram, (exact, result['nll'])  # a bound, and learnt
    assert len(samples) == 128 and error < 0.2


@pytest.mark.slow
def test_sedd_learns_the_chain_through_its_scripts(markov_corpus, tmp_path):
    """algo=sedd trained, evaluated and sampled (analytic predictor) through train_owt_sedd.sh,
    eval_owt_sedd.sh and gen_ppl_owt_sedd.sh (each main.py underneath) on the local corpus."""
    corpus_dir, valid = markov_corpus
    args = common(corpus_dir, tmp_path / 'run', 'sedd')
    run_script('train_owt_sedd.sh', *args, *CHAIN_RUN, out_dir=tmp_path)
    ckpt = tmp_path / 'run' / 'checkpoints' / 'last.ckpt'
    log = run_script('eval_owt_sedd.sh', ckpt, *args, out_dir=tmp_path)
    assert 'mode=ppl_eval' in log
    result = json.loads((tmp_path / 'run' / 'ppl_eval.json').read_text())
    log = run_script('gen_ppl_owt_sedd.sh', '--steps', 64, '--seed', 2, ckpt, *args, *SAMPLES, out_dir=tmp_path)
    assert 'sampling.predictor=analytic' in log
    samples = json.loads((tmp_path / 'gen_ppl_owt_sedd' / '2-64-last.json').read_text())
    assert samples['steps'] == 64 and samples['algo'] == 'sedd'
    check_learnt_the_chain(result, samples['generated_seqs'], valid, 'sedd')


@pytest.mark.slow
def test_d3pm_learns_the_chain(markov_corpus, tmp_path):
    """algo=d3pm (T = 1000) trained through train_lm1b_d3pm.sh, evaluated and sampled (64 steps of
    its training grid) through main.py."""
    corpus_dir, valid = markov_corpus
    args = common(corpus_dir, tmp_path / 'run', 'd3pm')
    run_script('train_lm1b_d3pm.sh', *args, *CHAIN_RUN, out_dir=tmp_path)
    run_main('mode=ppl_eval', *args)
    result = json.loads((tmp_path / 'run' / 'ppl_eval.json').read_text())
    run_main('mode=sample_eval', 'sampling.steps=64', *SAMPLES, *args)
    samples = json.loads((tmp_path / 'run' / 'samples.json').read_text())['generated_seqs']
    check_learnt_the_chain(result, samples, valid, 'd3pm')


def test_ddp_on_two_cpu_processes(markov_corpus, tmp_path):
    """strategy=ddp with 2 CPU processes (gloo): each rank trains on its own shard with its own noise,
    the global batch is kept (2 x 8 x accumulation 2 = 32) and the checkpoint evaluates as usual."""
    import checkpoints
    corpus_dir, _ = markov_corpus
    args = common(corpus_dir, tmp_path / 'run', 'duo_base') + ['loader.batch_size=8', 'loader.eval_batch_size=8']
    run_main('mode=train', 'strategy=ddp', 'trainer.accelerator=cpu', 'trainer.devices=2', 'trainer.max_steps=6',
             *args)
    config = (tmp_path / 'run' / 'config_train.yaml').read_text()
    assert 'accumulate_grad_batches: 2' in config
    step, micro_step = checkpoints.read_progress(tmp_path / 'run' / 'checkpoints' / 'last.ckpt')
    assert (step, micro_step) == (6, 12)  # per rank: 6 optimizer steps of 2 micro-batches
    run_main('mode=ppl_eval', 'trainer.limit_val_batches=2', *args)
    assert json.loads((tmp_path / 'run' / 'ppl_eval.json').read_text())['tokens'] == 2 * 8 * LENGTH


# ---- the modes in-process (fast) ---------------------------------------------------------
def in_process_config(tmp_path, *overrides, run='run'):
    """A resolved configuration for main's modes called directly (no Hydra run directory)."""
    import settings
    from hydra import compose, initialize_config_dir
    corpus = tmp_path / 'corpus'
    if not corpus.exists():
        corpus.mkdir()
        write_markov_corpus(corpus, 6_000, 1_000)
    base = ['data=local', f'data.train_files={corpus}/train.txt', f'data.valid_files={corpus}/valid.txt',
            'data.tokenizer_name_or_path=text8', f'data.cache_dir={corpus}/cache', 'model=micro', 'model.length=16',
            'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1', 'model.cond_dim=16', 'loader.num_workers=0',
            'loader.global_batch_size=4', 'trainer.accelerator=cpu', 'trainer.num_sanity_val_steps=0',
            'trainer.val_check_interval=1000', 'training.ema=0.9', 'optim.lr=1e-2', 'lr_scheduler.num_warmup_steps=0',
            f'checkpointing.save_dir={tmp_path / run}', f'eval.results_path={tmp_path / "ppl_eval.json"}',
            f'eval.generated_samples_path={tmp_path / "samples.json"}']
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return settings.resolve(compose(config_name='config', overrides=[*base, *overrides]))


def saved_model(tmp_path, algo, raw, ema):
    """A checkpoint of `algo` whose weights are raw(p) and whose EMA is ema(p), parameter by parameter."""
    import torch
    from dataloader import Text8Tokenizer, model_vocab
    from diffusion import Diffusion
    config = in_process_config(tmp_path, f'algo={algo}')
    module = Diffusion(config, *model_vocab(Text8Tokenizer()), 2)
    with torch.no_grad():
        for name, p in module.backbone.named_parameters():
            p.copy_(raw(name, p))
    module.ema.shadow_params = [ema(name, p).detach().clone() for name, p in module.backbone.named_parameters()]
    checkpoint = {'state_dict': module.state_dict(), 'global_step': 1}
    module.on_save_checkpoint(checkpoint)
    path = tmp_path / f'{algo}.ckpt'
    torch.save(checkpoint, path)
    return path


def only_letter(letter):
    """Weights whose every prediction is `letter` (output bias +30 there), whatever the input."""
    import torch
    from dataloader import Text8Tokenizer
    target = Text8Tokenizer().encode(letter)[0]

    def weights(name, p):
        if name == 'output_layer.linear.bias':
            bias = torch.zeros_like(p)
            bias[target] = 30.0
            return bias
        return torch.zeros_like(p)
    return weights


def test_sample_eval_and_ppl_eval_use_the_ema_weights(tmp_path):
    """An MDLM checkpoint whose raw weights write only 'z' (a letter the corpus never has) and whose
    EMA writes only 'b': sample_eval samples 'b' ('z' with eval.disable_ema=true); ppl_eval's bound is
    the EMA's. A masked token the model predicts costs nothing, any other about 30 nats, so with
    log-linear weights the bound is about 30 (1 - eps) times the share of tokens it does not predict."""
    import main
    path = saved_model(tmp_path, 'mdlm', raw=only_letter('z'), ema=only_letter('b'))
    common = ['mode=sample_eval', f'eval.checkpoint_path={path}', 'sampling.steps=4', 'sampling.num_sample_batches=1',
              'loader.eval_batch_size=2', 'eval.compute_generative_perplexity=false']
    for extra, letter in (([], 'b'), (['eval.disable_ema=true'], 'z')):
        result = main.sample_eval(in_process_config(tmp_path, *common, *extra), tmp_path)
        assert all(set(text[1:-1]) == {letter} for text in result['generated_seqs']), (extra, result['generated_seqs'])
    ema = main.ppl_eval(in_process_config(tmp_path, 'mode=ppl_eval', f'eval.checkpoint_path={path}'), tmp_path)
    raw = main.ppl_eval(in_process_config(tmp_path, 'mode=ppl_eval', f'eval.checkpoint_path={path}',
                                          'eval.disable_ema=true'), tmp_path)
    valid = (tmp_path / 'corpus' / 'valid.txt').read_text()
    share_b = valid.count('b') / len(valid) * (LENGTH - 2) / LENGTH  # BOS and EOS are never 'b'
    assert raw['nll'] == pytest.approx(30 * 0.999, rel=0.1)
    assert ema['nll'] == pytest.approx(30 * 0.999 * (1 - share_b), rel=0.1) and ema['nll'] < raw['nll'] - 3


def test_samples_are_kept_when_the_judge_cannot_load_and_judged_later(tmp_path, caplog):
    import main
    import metrics
    path = saved_model(tmp_path, 'mdlm', raw=only_letter('b'), ema=only_letter('b'))
    config = in_process_config(tmp_path, 'mode=sample_eval', f'eval.checkpoint_path={path}', 'sampling.steps=4',
                               'sampling.num_sample_batches=1', 'loader.eval_batch_size=2',
                               'eval.gen_ppl_eval_model_name_or_path=gpt2-large')  # offline in the tests
    with caplog.at_level('WARNING', logger='duo'):
        main.sample_eval(config, tmp_path)
    saved = json.loads((tmp_path / 'samples.json').read_text())
    assert len(saved['generated_seqs']) == 2 and saved['generative_ppl'] is None and saved['entropy'] >= 0
    assert len(saved['token_ids']) == 2 and saved['tokenizer'] == 'text8'
    assert 'python metrics.py' in caplog.text and str(tmp_path / 'samples.json') in caplog.text
    judge = saved_model(tmp_path, 'ar', raw=lambda n, p: p.detach() * 0, ema=lambda n, p: p.detach() * 0)
    assert metrics.main([str(tmp_path / 'samples.json'), '--judge', str(judge), '--device', 'cpu']) == 0
    judged = json.loads((tmp_path / 'samples.json').read_text())
    # a zero AR model predicts uniformly over the 35 - 1 ids it can emit: exp(log 34) per token
    assert judged['generative_ppl'] == pytest.approx(34.0, rel=1e-4) and judged['judge'] == str(judge)


def test_a_resumed_run_continues_the_data_and_noise_where_it_stopped(tmp_path):
    """Train 4 steps straight, and 2 + 2 with a resume: the weights are bitwise equal (the data
    position and every step's noise come back from the checkpoint)."""
    import torch
    import checkpoints
    import main
    torch.manual_seed(1)  # as main.py seeds before building the model
    main.train(in_process_config(tmp_path, 'mode=train', 'trainer.max_steps=4', run='straight'), tmp_path / 'straight')
    torch.manual_seed(1)
    main.train(in_process_config(tmp_path, 'mode=train', 'trainer.max_steps=2', run='resumed'), tmp_path / 'resumed')
    assert checkpoints.read_progress(tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt') == (2, 2)
    main.train(in_process_config(tmp_path, 'mode=train', 'trainer.max_steps=4', run='resumed'), tmp_path / 'resumed')
    a = checkpoints.read_checkpoint(tmp_path / 'straight' / 'checkpoints' / 'last.ckpt')
    b = checkpoints.read_checkpoint(tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt')
    assert a['global_step'] == b['global_step'] == 4
    for key, value in a['state_dict'].items():
        assert torch.equal(value, b['state_dict'][key]), key
