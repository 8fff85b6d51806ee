"""Prompts and infilling templates (conditioning.py, SPEC-2 §15): text -> the positions held fixed."""
import json
import shlex
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import conditioning
import dataloader
import duo
import samplers
from errors import ConfigError

TEXT8 = dataloader.Text8Tokenizer()
BOS = TEXT8.bos_token_id


@pytest.fixture(scope='module')
def gpt2():
    return dataloader.load_tokenizer('gpt2')


def test_a_prompt_is_bos_then_its_tokens():
    template = conditioning.parse('ab c', TEXT8)
    assert template.ids == (BOS, *TEXT8.encode('ab c'))
    assert template.span == 5 and template.is_prefix


def test_gaps_are_free_positions_between_the_pieces():
    template = conditioning.parse('is [GAP:3] and', TEXT8)  # characters: the spaces stay
    assert template.ids == (BOS, *TEXT8.encode('is '), None, None, None, *TEXT8.encode(' and'))
    assert not template.is_prefix
    assert conditioning.parse('ab[GAP:2]', TEXT8).is_prefix  # a gap at the end is a prompt


def test_with_gpt2_the_space_before_a_gap_goes_to_the_gap(gpt2):
    """Filling the gap with ' Paris' gives the tokens of the whole sentence, as GPT-2 tokenizes it."""
    template = conditioning.parse('The capital of France is [GAP:1] .', gpt2)
    whole = gpt2.encode('The capital of France is Paris .')
    assert len(whole) == template.span - 1
    filled = [whole[i - 1] if token is None else token for i, token in enumerate(template.ids)]
    assert filled == [gpt2.bos_token_id, *whole]


@pytest.mark.parametrize('text', ['a [GAP:0] b', 'a [GAP:x] b', 'a [GAP:-2] b', 'a [GAP5] b'])
def test_malformed_gaps_give_one_line(text):
    with pytest.raises(ConfigError, match=r'^sampling.prompt: .*(\[GAP:n\]|whole number).*e.g. sampling.prompt='):
        conditioning.parse(text, TEXT8)


def test_explicit_positions():
    template = conditioning.from_positions({0: [BOS], 3: 'ab', 7: [9]}, TEXT8)
    assert template.ids == (BOS, None, None, *TEXT8.encode('ab'), None, None, 9)
    assert template.text == '[BOS][GAP:2]ab[GAP:2]b'
    with pytest.raises(ConfigError, match='position 4 is given twice'):
        conditioning.from_positions({3: 'ab', 4: 'c'}, TEXT8)
    with pytest.raises(ConfigError, match='positions must be integers'):
        conditioning.from_positions({-1: 'ab'}, TEXT8)


def test_canvas_cycles_templates_over_the_rows():
    templates = [conditioning.parse('ab', TEXT8), conditioning.parse('c[GAP:2]d', TEXT8)]
    mask, tokens = conditioning.canvas(templates, 5, 8)
    assert mask.shape == tokens.shape == (5, 8)
    assert mask[0].tolist() == [True] * 3 + [False] * 5
    assert mask[1].tolist() == [True, True, False, False, True, False, False, False]
    assert torch.equal(mask[2], mask[0]) and torch.equal(tokens[3], tokens[1]) and torch.equal(mask[4], mask[0])
    assert tokens[1, 4].item() == TEXT8.encode('d')[0]
    assert conditioning.generated_start(mask).tolist() == [3, 5, 3, 5, 3]
    assert conditioning.generated_start(torch.zeros(2, 4, dtype=torch.bool)).tolist() == [0, 0]


def test_canvas_refuses_what_cannot_be_sampled():
    long = conditioning.parse('abcdefgh', TEXT8)
    with pytest.raises(ConfigError, match=r'covers 9 positions .* but a sample has 8 \(model.length=8\).*semi_ar'):
        conditioning.canvas([long], 2, 8, width_note=' (model.length=8)')
    gap = conditioning.parse('a[GAP:2]b', TEXT8)
    with pytest.raises(ConfigError, match=r'algo=ar generates left to right and cannot fill a gap.*algo=mdlm'):
        conditioning.canvas([gap], 2, 8, causal=True)
    conditioning.canvas([conditioning.parse('ab[GAP:3]', TEXT8)], 2, 8, causal=True)  # a gap at the end: fine


def settings(**values):
    return OmegaConf.create({'prompt': None, 'prompts_file': None, **values})


def test_prompts_files(tmp_path):
    (tmp_path / 'p.txt').write_text('first one\n\n  second [GAP:2] x\n')
    (tmp_path / 'p.jsonl').write_text('"first one"\n{"prompt": "second"}\n\n')
    txt = conditioning.from_settings(settings(prompts_file=str(tmp_path / 'p.txt')), TEXT8)
    assert [t.text for t in txt] == ['first one', '  second [GAP:2] x'] and None in txt[1].ids
    jsonl = conditioning.from_settings(settings(prompts_file=str(tmp_path / 'p.jsonl')), TEXT8)
    assert [t.text for t in jsonl] == ['first one', 'second']
    assert conditioning.from_settings(settings(prompt='hi'), TEXT8)[0].ids == (BOS, *TEXT8.encode('hi'))
    assert conditioning.from_settings(settings(), TEXT8) is None


@pytest.mark.parametrize('name, content, match', [
    ('missing.txt', None, 'does not exist'),
    ('p.csv', 'a,b', r'must be a \.txt file .* or a \.jsonl file'),
    ('empty.txt', '\n\n', 'holds no prompt'),
    ('bad.jsonl', '"ok"\n{"text": 1}\n', r'line 2 is neither a JSON string nor an object with a "prompt"'),
])
def test_bad_prompts_files_give_one_line(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=rf'^sampling.prompts_file={path}.*{match}'):
        conditioning.from_settings(settings(prompts_file=str(path)), TEXT8)


def test_prompt_and_prompts_file_together_are_refused(tmp_path):
    with pytest.raises(ConfigError, match='are both set'):
        conditioning.from_settings(settings(prompt='a', prompts_file=str(tmp_path / 'p.txt')), TEXT8)


def test_a_jsonl_string_may_hold_a_gap(tmp_path):
    (tmp_path / 'p.jsonl').write_text(json.dumps({'prompt': 'a [GAP:2] b'}) + '\n')
    template, = conditioning.from_settings(settings(prompts_file=str(tmp_path / 'p.jsonl')), TEXT8)
    assert template.ids.count(None) == 2 and 'prompt 1' in template.source


# ------------------------------------------------------------------------- README's commands

ROOT = Path(__file__).resolve().parent.parent
CONDITIONAL_KEYS = ('sampling.prompt=', 'sampling.prompts_file=', 'sampling.semi_ar=', 'sampling.var_length=')


def readme_conditional_lines():
    """The lines of README's "Conditional generation" section (continuations joined)."""
    text = (ROOT / 'README.md').read_text()
    start = text.index('\n## Conditional generation')
    return text[start:text.index('\n## ', start + 1)].replace('\\\n', ' ').splitlines()


def readme_conditional_commands():
    """The section's `python main.py ...` command lines that condition or extend the samples, as override lists."""
    return [shlex.split(line)[2:] for line in readme_conditional_lines()
            if line.startswith('python main.py ') and any(key in line for key in CONDITIONAL_KEYS)]


def write_readme_prompts_files(directory: Path) -> set:
    """Run the section's `printf '%s\\n' ... > FILE` lines in `directory`; the names written."""
    names = set()
    for line in readme_conditional_lines():
        if line.startswith('printf '):
            words = shlex.split(line)
            assert words[1] == '%s\\n' and words[-2] == '>', line
            (directory / words[-1]).write_text(''.join(word + '\n' for word in words[2:-2]))
            names.add(words[-1])
    return names


def test_readme_conditional_commands_resolve_and_their_prompts_fit(tmp_path, gpt2):
    """Every conditional-generation command README prints passes settings.resolve, its prompts (the
    files its printf lines write) parse with GPT-2's tokenizer (the hub checkpoints') and fit the
    samples; each use is shown; the semi-AR command gives MDLM's 2048 tokens."""
    files = write_readme_prompts_files(tmp_path)
    assert files == {'prompts.txt', 'prompts.jsonl'}
    seen = set()
    for overrides in readme_conditional_commands():
        overrides = [f'sampling.prompts_file={tmp_path / o.split("=", 1)[1]}' if o.startswith('sampling.prompts_file=')
                     else o for o in overrides if not o.startswith(('eval.checkpoint_path=', 'mode='))]
        config = duo.compose(overrides)  # mode=sample_eval, resolved (settings.resolve)
        s = config.sampling
        width = int(config.model.length)
        if s.semi_ar:
            samplers.check_semi_ar(width, s.stride_length, s.num_strides)
            width = samplers.semi_ar_length(width, int(s.stride_length), int(s.num_strides))
            assert width == 2048
            seen.add('semi_ar')
        seen |= {'var_length'} if s.var_length else set()
        templates = conditioning.from_settings(s, gpt2)
        if templates is not None:
            rows = int(config.loader.eval_batch_size) * int(s.num_sample_batches)
            assert len(templates) <= rows
            conditioning.canvas(templates, rows, width, causal=config.algo.name == 'ar', algo=config.algo.name)
            seen.add(Path(str(s.prompts_file)).suffix if s.prompts_file else 'prompt')
            seen |= {'gap'} if any(not t.is_prefix for t in templates) else set()
    assert seen == {'prompt', '.txt', '.jsonl', 'gap', 'semi_ar', 'var_length'}
