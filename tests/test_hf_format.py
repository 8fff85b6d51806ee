"""Hugging Face checkpoint layout (SPEC §8): round trip through our writer and loader, the other
weight-file forms of released checkpoints, and one clear line for every broken directory."""
import json
import time

import pytest
import torch

import checkpoints
from errors import CheckpointError
from models import hf_format
from models.dit import DiT

SIZES = dict(vocab_size=29, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, max_length=12)


def random_dit(causal=False, seed=0):
    torch.manual_seed(seed)
    model = DiT(**SIZES, causal=causal).eval()
    with torch.no_grad():  # fresh adaLN / output layers are zero, which would hide a bad load
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def dit_from(settings, causal=False):
    return DiT(settings['vocab_size'], settings['hidden_size'], settings['cond_dim'], settings['n_blocks'],
               settings['n_heads'], settings['length'], causal=causal).eval()


@pytest.mark.parametrize('causal', [False, True])
def test_round_trip_gives_the_same_logits(tmp_path, causal):
    model = random_dit(causal)
    hf_format.save_hf(model, tmp_path, model_type='ar' if causal else 'duo')
    config, state_dict = hf_format.load_hf(str(tmp_path))
    assert config['hidden_dim'] == 32 and config['model_length'] == 12 and config['causal'] == causal
    settings = hf_format.model_settings(config)
    assert settings == {'hidden_size': 32, 'cond_dim': 16, 'n_blocks': 2, 'n_heads': 4, 'length': 12,
                        'vocab_size': 29}
    loaded = dit_from(settings, causal)
    loaded.load_state_dict(state_dict)
    x = torch.randint(0, 29, (3, 12))
    sigma = None if causal else torch.rand(3)
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma), model(x, sigma))
    assert not torch.equal(model(x, sigma), dit_from(settings, causal)(x, sigma))


def test_read_source_routes_hf_directories(tmp_path):
    model = random_dit()
    hf_format.save_hf(model, tmp_path)
    source = checkpoints.read_source(str(tmp_path))
    state_dict = source.state_dict
    assert source.ema is None and source.model['n_heads'] == 4
    checkpoints.check_compatible(state_dict, random_dit(seed=1), 'test')
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())


def write_released(directory, model, form):
    """The layouts of released checkpoints: config.json plus bin, single or sharded safetensors."""
    from safetensors.torch import save_file
    directory.mkdir(exist_ok=True)
    config = {'model_type': 'mdlm', 'architectures': ['MDLM'], 'vocab_size': 29, 'model_length': 12,
              'hidden_dim': 32, 'cond_dim': 16, 'n_blocks': 2, 'n_heads': 4, 'dropout': 0.1,
              'time_conditioning': False}
    (directory / 'config.json').write_text(json.dumps(config))
    tensors = {'backbone.' + k: v.contiguous() for k, v in model.state_dict().items()}
    tensors['noise.sigma_min'] = torch.zeros(())  # upstream modules keep other keys beside the backbone
    if form == 'bin':
        torch.save(tensors, directory / 'pytorch_model.bin')
    elif form == 'safetensors':
        save_file(tensors, directory / 'model.safetensors')
    else:
        names = sorted(tensors)
        shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
                  'model-00002-of-00002.safetensors': names[len(names) // 2:]}
        for shard, keys in shards.items():
            save_file({k: tensors[k] for k in keys}, directory / shard)
        index = {'metadata': {}, 'weight_map': {k: shard for shard, keys in shards.items() for k in keys}}
        (directory / 'model.safetensors.index.json').write_text(json.dumps(index))
    return directory


@pytest.mark.parametrize('form', ['bin', 'safetensors', 'sharded'])
def test_released_weight_files(tmp_path, form):
    model = random_dit()
    _, state_dict = hf_format.load_hf(str(write_released(tmp_path / form, model, form)))
    assert set(state_dict) == set(model.state_dict())
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())


def test_missing_rotary_buffer_is_derived(tmp_path):
    model = random_dit()
    directory = write_released(tmp_path / 'd', model, 'bin')
    tensors = torch.load(directory / 'pytorch_model.bin')
    del tensors['backbone.rotary_emb.inv_freq']
    torch.save(tensors, directory / 'pytorch_model.bin')
    _, state_dict = hf_format.load_hf(str(directory))
    assert torch.allclose(state_dict['rotary_emb.inv_freq'], model.rotary_emb.inv_freq, rtol=1e-6)


def broken(tmp_path, how):
    directory = hf_format.save_hf(random_dit(), tmp_path / how)
    config = json.loads((directory / 'config.json').read_text())
    weights = directory / 'model.safetensors'
    if how == 'truncated':
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == 'no_weights':
        weights.unlink()
    elif how == 'bad_json':
        (directory / 'config.json').write_text('{"hidden_dim": 32,')
    elif how == 'missing_key':
        del config['n_heads']
    elif how in ('hidden', 'blocks', 'cond', 'heads'):
        key, value = {'hidden': ('hidden_dim', 64), 'blocks': ('n_blocks', 3), 'cond': ('cond_dim', 8),
                      'heads': ('n_heads', 8)}[how]
        config[key] = value
    elif how == 'no_prefix':
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in random_dit().state_dict().items()}, weights)
    if how not in ('bad_json',):
        (directory / 'config.json').write_text(json.dumps(config))
    return str(directory)


@pytest.mark.parametrize('how,message', [
    ('truncated', r'model.safetensors cannot be read .*incomplete or corrupted'),
    ('no_weights', r'has no weights: expected one of model.safetensors'),
    ('bad_json', r'config.json cannot be read'),
    ('missing_key', r'config.json lacks integer n_heads'),
    ('hidden', r'says vocab_size=29, hidden_dim=64 but the weights have an embedding of shape \(29, 32\)'),
    ('blocks', r'says n_blocks=3 but the weights have 2 blocks'),
    ('cond', r'says cond_dim=8 but the weights have 16'),
    ('heads', r'says n_heads=8 \(head size 4\) but the rotary buffer is for head size 8'),
    ('no_prefix', r"has no 'backbone.\*' weights"),
])
def test_broken_directories_give_one_clear_line(tmp_path, how, message):
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoints.read_source(broken(tmp_path, how))
    assert '\n' not in str(info.value)


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match='config.json cannot be read'):
        checkpoints.read_source(str(tmp_path))


def test_hub_id_offline_fails_fast_with_one_line():
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r'^eval.checkpoint_path=s-sahoo/duo is not a local directory and the '
                                              r'Hugging Face hub cannot provide it .*huggingface-cli download') as info:
        checkpoints.read_source('s-sahoo/duo')
    assert '\n' not in str(info.value)
    assert time.monotonic() - start < 10
