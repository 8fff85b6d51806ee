"""The Python API (duo.py) and mode=sample_eval's conditional sampling through it (SPEC-2 §15):
prompts and templates kept, prompt and continuation apart, semi-autoregressive lengths, the
variable-length rules, AR windows through the KV cache."""
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

import duo
import settings
from conftest import ROOT
from dataloader import Text8Tokenizer, model_vocab
from diffusion import Diffusion
from errors import ConfigError

TOKENIZER = Text8Tokenizer()
L = 16
TINY = ['data=local', 'data.tokenizer_name_or_path=text8', 'model=micro', f'model.length={L}', 'model.hidden_size=32',
        'model.n_heads=2', 'model.n_blocks=1', 'model.cond_dim=16', 'training.ema=0', 'trainer.accelerator=cpu']


def config(*overrides, mode='sample_eval'):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return settings.resolve(compose(config_name='config', overrides=[f'mode={mode}', *TINY, *overrides]))


def checkpoint(tmp_path, algo, eos_bias=0.0, seed=0):
    """A random-weight checkpoint of `algo` (text8 vocabulary, L = 16); eos_bias added to the [EOS] logit."""
    torch.manual_seed(seed)
    module = Diffusion(config(f'algo={algo}', mode='train'), *model_vocab(TOKENIZER), TOKENIZER.bos_token_id)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.normal_(0, 0.3)
        module.backbone.output_layer.linear.bias[TOKENIZER.eos_token_id] += eos_bias
    saved = {'state_dict': module.state_dict(), 'global_step': 1}
    module.on_save_checkpoint(saved)
    path = tmp_path / f'{algo}_{eos_bias}.ckpt'
    torch.save(saved, path)
    return path


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp('duo_api')
    return {algo: duo.load(checkpoint(d, algo), device='cpu', steps=4) for algo in ('ar', 'mdlm', 'duo_base')}


ALGOS = ['ar', 'mdlm', 'duo_base']


@pytest.mark.parametrize('algo', ALGOS)
def test_generate_continues_every_prompt(models, algo):
    texts = duo.generate(models[algo], ['the cat ', 'a dog'], num_samples=2, seed=0)
    assert len(texts) == 4
    assert [t[:len(p)] for t, p in zip(texts, ['the cat ', 'a dog'] * 2)] == ['the cat ', 'a dog'] * 2
    assert all(len(t) <= L - 1 for t in texts)  # specials removed
    assert texts == duo.generate(models[algo], ['the cat ', 'a dog'], num_samples=2, seed=0)  # seeded


@pytest.mark.parametrize('algo', ALGOS)
def test_samples_keep_prompt_and_continuation_apart(models, algo):
    model = models[algo]
    templates = [duo.conditioning.parse('the cat ', TOKENIZER), duo.conditioning.parse('ab[GAP:3]', TOKENIZER)]
    with model.using(steps=3):
        samples = model.sample(4, templates, generator=torch.Generator().manual_seed(0))
    record = samples.record()
    assert record['prompts'] == ['the cat ', 'ab[GAP:3]'] * 2
    assert record['fixed_spans'] == [[[0, 9]], [[0, 3]]] * 2
    for ids, text, continuation, spans in zip(record['token_ids'], record['generated_seqs'], record['continuations'],
                                              record['fixed_spans']):
        end = spans[-1][1]
        assert text == TOKENIZER.decode(ids) and continuation == TOKENIZER.decode(ids[end:])
        assert len(ids) == L and text.startswith('[BOS]')
    assert record['token_ids'][0][:9] == [TOKENIZER.bos_token_id, *TOKENIZER.encode('the cat ')]
    assert 'infills' not in record  # a gap at the end is a prompt
    assert [len(r) for r in samples.generated_ids()] == [L - 9, L - 3] * 2


@pytest.mark.parametrize('algo', ['mdlm', 'duo_base'])
def test_diffusion_models_fill_gaps(models, algo):
    model = models[algo]
    template = duo.conditioning.parse('ab[GAP:3]cd', TOKENIZER)
    samples = model.sample(3, [template], generator=torch.Generator().manual_seed(1))
    record = samples.record()
    for ids, gaps in zip(record['token_ids'], record['infills']):
        assert ids[:3] == [TOKENIZER.bos_token_id, *TOKENIZER.encode('ab')] and ids[6:8] == TOKENIZER.encode('cd')
        assert gaps == [TOKENIZER.decode(ids[3:6])]
    explicit = duo.conditioning.from_positions({0: [TOKENIZER.bos_token_id], 4: 'xy', 10: 'z'}, TOKENIZER)
    ids = model.sample(2, [explicit]).token_ids
    assert all(row[4:6] == TOKENIZER.encode('xy') and row[10] == TOKENIZER.encode('z')[0] for row in ids)
    assert len(duo.generate(model, infill=[{0: [TOKENIZER.bos_token_id], 4: 'xy'}, {3: 'z'}], seed=0)) == 2


def test_ar_refuses_a_gap_followed_by_text(models):
    with pytest.raises(ConfigError, match=r'^prompts\[0\]: algo=ar generates left to right and cannot fill a gap'):
        duo.generate(models['ar'], ['ab[GAP:3]cd'])


@pytest.mark.parametrize('algo', ALGOS)
def test_semi_ar_samples_have_L_plus_n_stride_tokens(models, algo):
    calls = []
    model = models[algo]
    real = model.module.generate
    model.module.generate = lambda *a, **kw: calls.append(kw.get('fixed')) or real(*a, **kw)
    try:
        with model.using(semi_ar=True, stride_length=8, num_strides=4):
            samples = model.sample(2, [duo.conditioning.parse('the cat ', TOKENIZER)])
    finally:
        model.module.generate = real
    assert [len(ids) for ids in samples.token_ids] == [3 * L] * 2 == [L + 4 * 8] * 2
    assert len(calls) == 5 and all(held[0][:, :L - 8].all() for held in calls[1:])
    assert samples.token_ids[0][:9] == [TOKENIZER.bos_token_id, *TOKENIZER.encode('the cat ')]


@pytest.fixture(scope='module')
def eos_models(tmp_path_factory):
    """Models that write [EOS] almost everywhere: every row ends right after its prompt's first free token."""
    d = tmp_path_factory.mktemp('duo_eos')
    return {algo: duo.load(checkpoint(d, algo, eos_bias=30.0), device='cpu', steps=4) for algo in ALGOS}


@pytest.mark.parametrize('algo', ALGOS)
def test_var_length_ends_each_row_after_its_first_generated_eos(eos_models, algo):
    model = eos_models[algo]
    template = duo.conditioning.parse('ab[GAP:2]c', TOKENIZER) if algo != 'ar' else duo.conditioning.parse('abc', TOKENIZER)
    with model.using(var_length=True):
        samples = model.sample(3, [template])
    # diffusion: EOS in the gap does not end the row (it comes before the template's last token)
    assert [len(ids) for ids in samples.token_ids] == [template.span + 1] * 3
    assert all(ids[-1] == TOKENIZER.eos_token_id for ids in samples.token_ids)
    with model.using(var_length=False):
        assert [len(ids) for ids in model.sample(2, [template]).token_ids] == [L] * 2


@pytest.mark.parametrize('algo', ALGOS)
def test_var_length_semi_ar_stops_after_the_window_with_the_eos(eos_models, algo):
    model = eos_models[algo]
    calls = []
    real = model.module.generate
    model.module.generate = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    try:
        with model.using(var_length=True, semi_ar=True, stride_length=4, num_strides=3):
            samples = model.sample(2)
    finally:
        model.module.generate = real
    assert len(calls) == 1
    assert all(TOKENIZER.eos_token_id not in ids[1:-1] and ids[-1] == TOKENIZER.eos_token_id for ids in samples.token_ids)


def test_ar_windows_through_the_kv_cache_give_the_logits_of_a_full_recompute(models):
    """Check (4) through AR.sample: a prompt, then sliding windows re-encoding the last L - stride
    tokens; every cached forward's logits equal the full forward of its window's tokens."""
    model = models['ar']
    backbone = model.module.backbone
    real_forward, real_generate = backbone.forward, model.module.generate
    cached, windows = [], []

    def forward(x, *args, kv_cache=None, **kw):
        start = 0 if kv_cache is None else kv_cache.length
        out = real_forward(x, *args, kv_cache=kv_cache, **kw)
        if kv_cache is not None:
            cached.append((len(windows), start, out.clone()))
        return out

    def generate(*args, **kw):
        out = real_generate(*args, **kw)
        windows.append(out.clone())
        return out

    backbone.forward, model.module.generate = forward, generate
    try:
        with model.using(semi_ar=True, stride_length=5, num_strides=2):
            samples = model.sample(3, [duo.conditioning.parse('the ', TOKENIZER),
                                       duo.conditioning.parse('a b c d ', TOKENIZER)])
    finally:
        backbone.forward, model.module.generate = real_forward, real_generate
    assert len(windows) == 3 and [len(ids) for ids in samples.token_ids] == [L + 10] * 3
    assert cached[0][1] == 0 and cached[0][2].shape[1] == 5  # the shortest prompt in one call
    assert any(c[2].shape[1] == L - 5 for c in cached)      # a window's overlap re-encoded in one call
    with torch.no_grad():
        full = [backbone(ids) for ids in windows]
    for window, start, logits in cached:
        torch.testing.assert_close(logits, full[window][:, start:start + logits.shape[1]], rtol=1e-4, atol=1e-4)


def test_using_restores_settings_and_refuses_what_is_wrong(models):
    model = models['mdlm']
    with model.using(steps=7, p_nucleus=0.5, **{'psi.high_mode': 'pure-pc'}):
        assert (model.config.sampling.steps, model.config.sampling.p_nucleus) == (7, 0.5)
        assert model.config.sampling.psi.high_mode == 'pure-pc'
    assert (model.config.sampling.steps, model.config.sampling.p_nucleus) == (4, 1.0)
    with pytest.raises(ConfigError, match='sampling.stepz is not a setting'):
        with model.using(stepz=3):
            pass
    with pytest.raises(ConfigError, match=r'sampling.stride_length=16 must be an integer in \[1, model.length=16\)'):
        duo.generate(model, semi_ar=True, stride_length=16)
    with pytest.raises(ConfigError, match='sampling.p_nucleus=2'):
        duo.generate(model, p_nucleus=2)
    with pytest.raises(ConfigError, match='sampling.predictor=psi does not apply to algo=ar'):
        duo.generate(models['ar'], predictor='psi')
    assert model.config.sampling.p_nucleus == 1.0 and models['ar'].config.sampling.predictor == 'ancestral_cache'


def test_load_takes_the_checkpoint_settings_and_overrides(tmp_path):
    path = checkpoint(tmp_path, 'duo_base')
    model = duo.load(path, 'sampling.noise_removal=greedy', device='cpu', steps=3, **{'eval.disable_ema': True})
    assert model.algo == 'duo_base' and int(model.config.model.length) == L and model.device.type == 'cpu'
    assert (model.config.sampling.steps, model.config.sampling.noise_removal) == (3, 'greedy')
    texts = duo.generate(str(path), ['ab'], steps=2)  # a checkpoint path: loaded, then sampled
    assert texts[0].startswith('ab')


# ---- mode=sample_eval ---------------------------------------------------------------------------
def test_sample_eval_with_a_prompts_file_and_a_template(tmp_path):
    import main
    path = checkpoint(tmp_path, 'mdlm')
    prompts = tmp_path / 'prompts.jsonl'
    prompts.write_text('"the cat "\n{"prompt": "a [GAP:2] b"}\n"ok"\n')
    out = tmp_path / 'samples.json'
    common = [f'eval.checkpoint_path={path}', 'sampling.steps=3', 'loader.eval_batch_size=4',
              'sampling.num_sample_batches=2', f'eval.generated_samples_path={out}',
              'eval.compute_generative_perplexity=false']
    result = main.sample_eval(config(*common, f'sampling.prompts_file={prompts}'), tmp_path)
    saved = json.loads(out.read_text())
    assert saved['scored'] == result['scored'] == 'continuation'
    assert saved['prompts'] == ['the cat ', 'a [GAP:2] b', 'ok'] * 2 + ['the cat ', 'a [GAP:2] b']
    assert len(saved['token_ids']) == len(saved['continuations']) == len(saved['infills']) == 8
    assert saved['infills'][0] == [] and len(saved['infills'][1]) == 1 and saved['fixed_spans'][1] == [[0, 3], [5, 7]]
    assert all(text.startswith('[BOS]the cat ') for text in saved['generated_seqs'][::3])
    plain = main.sample_eval(config(*common, f'eval.generated_samples_path={tmp_path / "plain.json"}'), tmp_path)
    assert plain['scored'] == 'sample' and 'prompts' not in plain
