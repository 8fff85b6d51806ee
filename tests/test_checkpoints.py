"""Released baselines (SPEC §8, SPEC-2 §11): an upstream SEDD Lightning .ckpt (built here in
upstream's layout: weights under backbone., the EMA, hyper_parameters holding a pickled OmegaConf
config with algo.name = sedd) and Hugging Face-format SEDD / MDLM weights load through
read_source / configure_from / load_model without remote code, configure the run from what they
record, and evaluate and sample."""
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.data import AttributeDict
from omegaconf import OmegaConf

import checkpoints
import dataloader
import diffusion
from conftest import ROOT
from models import hf_format

SIZES = {'hidden_size': 32, 'cond_dim': 16, 'n_blocks': 2, 'n_heads': 2, 'length': 12}


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=['model=micro', 'data.tokenizer_name_or_path=text8',
                                                        *overrides])


def trained_sedd(seed=0):
    """A 'trained' SEDD module of SIZES (random weights, an EMA that differs from them)."""
    config = make_config('algo=sedd', *(f'model.{k}={v}' for k, v in SIZES.items()))
    tokenizer = dataloader.get_tokenizer(config)
    module = diffusion.Diffusion(config, *dataloader.model_vocab(tokenizer), tokenizer.bos_token_id)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    module.ema.shadow_params = [p.detach() * 0.5 for p in module.backbone.parameters()]
    module.ema.num_updates = 100
    return module


def upstream_config():
    """What upstream's main.py pickles: its whole Hydra config (keys we do not have included)."""
    return OmegaConf.create({
        'mode': 'train', 'seed': 1,
        'algo': {'name': 'sedd', 'backbone': 'dit', 'parameterization': 'score', 'time_conditioning': True, 'T': 0,
                 'subs_masking': False, 'causal_attention': False, 'ignore_bos': False, 'loss_type': 'elbo'},
        'noise': {'type': 'log-linear', 'eps': 1e-3},
        'model': {'name': 'small', 'type': 'ddit', 'hidden_size': 32, 'cond_dim': 16, 'length': SIZES['length'],
                  'n_blocks': 2, 'n_heads': 2, 'scale_by_sigma': True, 'dropout': 0.1, 'tie_word_embeddings': False},
        'data': {'train': 'openwebtext-split', 'valid': 'openwebtext-split', 'tokenizer_name_or_path': 'text8',
                 'wrap': True, 'streaming': False},
        'sampling': {'predictor': 'analytic', 'steps': 128, 'noise_removal': 'ancestral'},
        'training': {'ema': 0.9999, 'antithetic_sampling': True, 'sampling_eps': 1e-3},
    })


def save_upstream(module, path):
    """A Lightning checkpoint as upstream's trainer writes it."""
    torch.save({
        'epoch': 3, 'global_step': 100, 'pytorch-lightning_version': '2.2.1',
        'state_dict': {'backbone.' + k: v for k, v in module.backbone.state_dict().items()},
        'loops': {'fit_loop': {'state_dict': {}}}, 'callbacks': {}, 'optimizer_states': [], 'lr_schedulers': [],
        'hparams_name': 'kwargs', 'hyper_parameters': AttributeDict(config=upstream_config(), tokenizer=None),
        'ema': {'decay': 0.9999, 'num_updates': 100, 'shadow_params': module.ema.shadow_params},
    }, path)


def evaluate(model, seed=0):
    """The validation bound of one fixed batch, and 3 samples."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(5, 30, (4, SIZES['length']), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        per_token, _ = model.algo.eval_loss(model, x0, torch.ones_like(x0), model.algo.times(model, 4), 0)
        samples = model.generate(3, generator=torch.Generator().manual_seed(seed))
    return per_token, samples


def load(path, *overrides, explicit=frozenset()):
    config = make_config(*overrides)  # the default algo (duo_base) and model sizes: the checkpoint decides
    source = checkpoints.read_source(str(path))
    checkpoints.configure_from(config, source, explicit)
    tokenizer = dataloader.get_tokenizer(config)
    return config, checkpoints.load_model(config, tokenizer, source)


def test_upstream_sedd_ckpt_configures_loads_its_ema_evaluates_and_samples(tmp_path):
    trained = trained_sedd()
    save_upstream(trained, tmp_path / 'sedd.ckpt')
    config, model = load(tmp_path / 'sedd.ckpt', 'sampling.steps=4')
    assert config.algo.name == 'sedd' and config.algo.time_conditioning is True
    assert config.sampling.predictor == 'analytic'          # as algo=sedd gives it
    assert {k: config.model[k] for k in SIZES} == SIZES and config.noise.type == 'log-linear'
    for mine, ema in zip(model.backbone.parameters(), trained.ema.shadow_params):
        assert torch.equal(mine, ema)                        # the EMA weights are evaluated
    # the same as the trained module evaluated with its EMA applied
    reference = trained_sedd()
    reference.ema.copy_to(reference.backbone.parameters())
    reference.config.sampling.steps = 4
    got, expected = evaluate(model), evaluate(reference)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert got[0].sum() > 0 and (got[1] != model.mask_id).all()


def test_upstream_ckpt_raw_weights_with_eval_disable_ema(tmp_path):
    trained = trained_sedd()
    save_upstream(trained, tmp_path / 'sedd.ckpt')
    _, model = load(tmp_path / 'sedd.ckpt', 'eval.disable_ema=true')
    for mine, raw in zip(model.backbone.parameters(), trained.backbone.parameters()):
        assert torch.equal(mine, raw)


@pytest.mark.parametrize('model_type', ['sedd', 'mdlm'])
def test_hugging_face_sedd_and_mdlm_weights_configure_load_evaluate_and_sample(tmp_path, model_type):
    trained = trained_sedd()
    trained.ema.copy_to(trained.backbone.parameters())      # released weights have the EMA applied
    hf_format.save_hf(trained.backbone, tmp_path / 'released', model_type=model_type,
                      time_conditioning=model_type == 'sedd')
    config, model = load(tmp_path / 'released', 'sampling.steps=4', 'sampling.predictor=analytic',
                         explicit={'sampling.predictor'})
    assert config.algo.name == model_type and config.algo.time_conditioning == (model_type == 'sedd')
    assert config.sampling.predictor == 'analytic' and {k: config.model[k] for k in SIZES} == SIZES
    for mine, theirs in zip(model.backbone.parameters(), trained.backbone.parameters()):
        assert torch.equal(mine, theirs)
    per_token, samples = evaluate(model)
    assert per_token.isfinite().all() and samples.shape == (3, SIZES['length']) and (samples != model.mask_id).all()
    if model_type == 'sedd':  # the same network as the upstream checkpoint's EMA: the same bound
        save_upstream(trained_sedd(), tmp_path / 'sedd.ckpt')
        assert torch.equal(per_token, evaluate(load(tmp_path / 'sedd.ckpt', 'sampling.steps=4')[1])[0])
