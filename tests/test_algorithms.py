"""The algorithm classes (algorithms.py) as training and sampling call them: what SEDD and D3PM
draw, what they feed the network, what loss they return, which settings they refuse, and how a
checkpoint's algorithm configures a run.

The losses and sampler steps themselves are pure functions tested against independent
computations in test_losses.py and test_samplers.py; here the wiring around them is checked
against independently written formulas (the log-linear schedule, the discrete grid).
"""
import types

import pytest
import torch
from hydra import compose, initialize_config_dir

import algorithms
import checkpoints
import diffusion
import losses
import runtime
import samplers
from conftest import ROOT
from errors import ConfigError

K, MASK, EPS = 11, 10, 1e-3
TINY = ['model=micro', 'model.length=8', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16', 'training.ema=0']


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=[*TINY, *overrides])


class Recorder(torch.nn.Module):
    """A stand-in backbone: records every call and returns fixed random logits of the asked rows."""

    def __init__(self, seed=0):
        super().__init__()
        self.calls = []
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, x, sigma, attention_mask=None, output_rows=None, out=None):
        logits = torch.randn(*x.shape, K, generator=self.g, dtype=torch.float64).float() * 2
        if output_rows is not None:
            logits = logits[output_rows]
        self.calls.append({'x': x.clone(), 'sigma': sigma.clone(), 'rows': output_rows, 'logits': logits.clone()})
        return logits


def fake_module(seed=0):
    return types.SimpleNamespace(backbone=Recorder(seed), device=torch.device('cpu'))


def alpha_loglinear(t):
    """alpha_t = 1 - (1 - eps) t, written here independently of noise_schedule."""
    return 1 - (1 - EPS) * torch.as_tensor(t, dtype=torch.float64)


def clean_batch(B=6, L=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, K - 1, (B, L), generator=g)
    return x0, torch.ones_like(x0)


# ---- SEDD --------------------------------------------------------------------------------------
def test_sedd_loss_is_the_score_entropy_of_what_the_network_saw():
    algo = algorithms.build(make_config('algo=sedd'), K, MASK)
    module = fake_module()
    x0, mask = clean_batch()
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.99])
    torch.manual_seed(7)
    per_token, weight = algo.loss(module, x0, mask, t, step=0)
    torch.manual_seed(7)
    alpha = alpha_loglinear(t)[:, None]
    xt = torch.where(torch.rand(x0.shape) < 1 - alpha, MASK, x0)   # the forward process, redrawn
    call, = module.backbone.calls
    assert torch.equal(call['x'], xt) and torch.equal(call['rows'], xt == MASK)  # masked rows only
    assert torch.allclose(call['sigma'].double(), -torch.log(alpha[:, 0]), rtol=1e-6)  # time conditioned
    expected = losses.sedd_loss(call['logits'].double(), x0, xt, alpha, torch.full_like(alpha, -(1 - EPS)), MASK)
    assert torch.allclose(per_token.double(), expected, rtol=1e-5, atol=1e-6) and weight is mask
    assert (per_token[xt != MASK] == 0).all() and (per_token[xt == MASK] > 0).all()


def test_sedd_validation_reports_its_bound():
    algo = algorithms.build(make_config('algo=sedd'), K, MASK)
    x0, mask = clean_batch()
    t = torch.full((6,), 0.5)
    torch.manual_seed(1)
    train = algo.loss(fake_module(), x0, mask, t, 0)[0]
    torch.manual_seed(1)
    valid = algo.eval_loss(fake_module(), x0, mask, t, 0)[0]
    assert torch.equal(train, valid)


# ---- D3PM --------------------------------------------------------------------------------------
@pytest.mark.parametrize('T', [1, 4, 1000])
def test_d3pm_loss_is_reconstruction_plus_T_kl_with_the_right_alphas(T):
    algo = algorithms.build(make_config('algo=d3pm', f'algo.T={T}'), K, MASK)
    module = fake_module()
    x0, mask = clean_batch()
    i = torch.tensor([1, T, max(T // 2, 1), 1, min(2, T), T])
    torch.manual_seed(5)
    per_token, weight = algo.loss(module, x0, mask, i, step=0)
    torch.manual_seed(5)
    i = i.double()  # the alphas in float64: 1 - alpha_t and alpha_s - alpha_t are O(1/T)
    alpha_t = alpha_loglinear(i / T)[:, None]
    alpha_s = torch.where(i == 1, 1.0, alpha_loglinear((i - 1) / T))[:, None]  # alpha_0 = 1: the last step
    xt = torch.where(torch.rand(x0.shape) < 1 - alpha_t, MASK, x0)
    noisy, clean = module.backbone.calls
    assert torch.equal(noisy['x'], xt) and torch.equal(noisy['rows'], xt == MASK)
    assert torch.allclose(noisy['sigma'].double(), -torch.log(alpha_t[:, 0]), rtol=1e-6)
    assert torch.equal(clean['x'], x0) and clean['rows'] is None and (clean['sigma'] == 0).all()  # sigma(alpha_0)
    expected = (losses.d3pm_reconstruction_loss(clean['logits'].double(), x0)
                + losses.d3pm_loss(noisy['logits'].double(), x0, xt, alpha_t, alpha_s, T, MASK))
    assert torch.allclose(per_token.double(), expected, rtol=1e-5, atol=1e-6) and weight is mask


def test_d3pm_subs_masking_gives_the_mask_no_probability():
    algo = algorithms.build(make_config('algo=d3pm', 'algo.T=10', 'algo.subs_masking=true'), K, MASK)
    module = fake_module()
    x0, mask = clean_batch()
    logits = algo.logits(module, x0, torch.rand(6))
    assert (logits[..., MASK] == float('-inf')).all() and logits[..., :MASK].isfinite().all()


def test_d3pm_times_are_stratified_step_indices_covering_1_to_T(monkeypatch):
    """SPEC-2 §12 check (4): a global batch of T draws every i in 1..T exactly once (stratified), the
    last step i = 1 included; across DDP ranks the strata are split; i ~ U{1..T} (chi-square)."""
    algo = algorithms.build(make_config('algo=d3pm', 'algo.T=7'), K, MASK)
    module = fake_module()
    for _ in range(20):
        assert sorted(algo.times(module, 7).tolist()) == list(range(1, 8))
    # T = 1000 (upstream's t >= 1e-3 never drew i = 1 there, SPEC-2 §12 pitfall (b))
    algo1000 = algorithms.build(make_config('algo=d3pm', 'algo.T=1000'), K, MASK)
    assert sorted(algo1000.times(module, 1000).tolist()) == list(range(1, 1001))
    algo4 = algorithms.build(make_config('algo=d3pm', 'algo.T=4'), K, MASK)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(runtime, 'rank_world', lambda rank=rank: (rank, 2))
        parts.append(algo4.times(module, 2).tolist())
    assert parts == [[1, 2], [3, 4]]
    monkeypatch.setattr(runtime, 'rank_world', lambda: (0, 1))
    algo5 = algorithms.build(make_config('algo=d3pm', 'algo.T=5'), K, MASK)
    draws = torch.cat([algo5.times(module, 3) for _ in range(5000)])
    counts = torch.bincount(draws, minlength=6)[1:].double()
    assert draws.min() == 1 and draws.max() == 5
    stat = ((counts - 3000) ** 2 / 3000).sum().item()
    assert stat < 18.5  # chi-square, 4 degrees of freedom: p ~ 0.001


def test_continuous_algorithms_draw_times_in_sampling_eps_1():
    algo = algorithms.build(make_config('algo=sedd', 'training.sampling_eps=0.25'), K, MASK)
    t = torch.cat([algo.times(fake_module(), 4) for _ in range(200)])
    assert t.dtype == torch.float32 and t.min() >= 0.25 and t.max() <= 1


# ---- sampling ----------------------------------------------------------------------------------
def test_d3pm_samples_on_its_training_grid():
    """The sampler's times are grid points i/T, from 1 to 1/T; with sampling.steps >= T - 1 every
    step of the grid once, then the last step (noise removal) to alpha = 1."""
    for T, steps in ((10, 9), (10, 40), (1000, 7), (1, 3)):
        algo = algorithms.build(make_config('algo=d3pm', f'algo.T={T}', f'sampling.steps={steps}'), K, MASK)
        grid = algo.sampler_options(steps, torch.device('cpu'))['grid']
        i = grid * T
        assert grid.shape == (steps + 1,) and torch.allclose(i, i.round()) and grid[0] == 1 and grid[-1] == 1 / T
        assert (grid[1:] <= grid[:-1]).all()
        if steps >= T - 1:
            assert torch.equal(torch.unique(i.round().long()), torch.arange(1, T + 1))


@pytest.mark.parametrize('algo_name,predictor,step', [
    ('sedd', 'analytic', samplers.sedd_step), ('d3pm', 'ancestral', samplers.d3pm_step),
    ('mdlm', 'analytic', samplers.sedd_step)])
def test_samplers_of_the_algorithms(algo_name, predictor, step, monkeypatch):
    """The configured predictor runs its step on a real module: no [MASK] left after ancestral noise
    removal, and the step is the one of SPEC-2 (MDLM's analytic one with S = 1)."""
    config = make_config(f'algo={algo_name}', f'sampling.predictor={predictor}', 'sampling.steps=6', 'algo.T=20'
                         if algo_name == 'd3pm' else 'sampling.p_nucleus=1')
    module = diffusion.Diffusion(config, K, MASK, bos_id=K - 2)
    torch.manual_seed(0)
    for p in module.backbone.parameters():
        torch.nn.init.normal_(p, std=0.3)
    used = []
    original = samplers.sample_diffusion

    def spy(*args, **kwargs):
        used.append(kwargs.get('step'))
        return original(*args, **kwargs)
    monkeypatch.setattr(samplers, 'sample_diffusion', spy)
    with torch.no_grad():
        out = module.generate(4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 8) and (out != MASK).all()
    chosen = used[0]
    assert getattr(chosen, 'func', chosen) is step
    assert getattr(chosen, 'keywords', {}).get('normalised', False) == (algo_name == 'mdlm')


# ---- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,message', [
    (['algo=sedd', 'sampling.predictor=ancestral_cache'],
     'sampling.predictor=ancestral_cache does not apply to algo=sedd (its unmask probabilities need the network at '
     'every step: nothing to cache): use analytic (e.g. sampling.predictor=analytic)'),
    (['algo=sedd', 'sampling.predictor=ancestral'],
     'sampling.predictor=ancestral does not apply to algo=sedd: use analytic (e.g. sampling.predictor=analytic)'),
    (['algo=sedd', 'sampling.noise_removal=greedy'],
     'sampling.noise_removal=greedy does not apply to algo=sedd: use ancestral or none '
     '(e.g. sampling.noise_removal=ancestral)'),
    (['algo=d3pm', 'sampling.predictor=ancestral_cache'],
     'sampling.predictor=ancestral_cache does not apply to algo=d3pm (its unmask probabilities need the network at '
     'every step: nothing to cache): use ancestral (e.g. sampling.predictor=ancestral)'),
    (['algo=duo_base', 'sampling.predictor=analytic'],
     'sampling.predictor=analytic does not apply to algo=duo_base: use ancestral or ancestral_cache '
     '(e.g. sampling.predictor=ancestral)'),
    (['algo=d3pm', 'algo.T=0'], 'algo.T=0 must be an integer >= 1 for algo=d3pm (e.g. algo.T=1000)'),
    (['algo=d3pm', 'algo.T=2.5'], 'algo.T=2.5 must be an integer >= 1 for algo=d3pm (e.g. algo.T=1000)'),
])
def test_bad_settings_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        diffusion.Diffusion(make_config(*overrides), K, MASK, bos_id=K - 2)
    assert str(error.value) == message


def test_algorithm_files_set_their_predictor_and_every_key_is_read():
    """sedd.yaml / d3pm.yaml set the predictor at the global level (command lines still win) and
    hold only keys the code reads."""
    assert make_config('algo=sedd').sampling.predictor == 'analytic'
    assert make_config('algo=d3pm').sampling.predictor == 'ancestral'
    assert make_config('algo=mdlm').sampling.predictor == 'ancestral_cache'
    assert make_config('algo=mdlm', 'sampling.predictor=analytic').sampling.predictor == 'analytic'
    assert set(make_config('algo=sedd').algo) == {'name', 'backbone', 'time_conditioning'}
    assert set(make_config('algo=d3pm').algo) == {'name', 'backbone', 'time_conditioning', 'T', 'subs_masking'}
    assert algorithms.family('sedd') == 'score' and algorithms.family('d3pm') == 'mean'


@pytest.mark.parametrize('algo_name', ['sedd', 'd3pm'])
def test_a_checkpoint_of_sedd_or_d3pm_configures_the_run(tmp_path, algo_name):
    """Evaluating a checkpoint without algo=: its algorithm, with its file's predictor (as algo=
    would give it) unless the command line sets one."""
    trained = diffusion.Diffusion(make_config(f'algo={algo_name}', 'algo.T=50' if algo_name == 'd3pm' else
                                              'seed=1'), K, MASK, bos_id=K - 2)
    path = tmp_path / 'model.ckpt'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in trained.backbone.state_dict().items()},
                'duo': trained.description()}, path)
    source = checkpoints.read_source(path)
    config = make_config()                      # algo=duo_base, predictor ancestral_cache
    checkpoints.configure_from(config, source)
    assert config.algo.name == algo_name
    assert config.sampling.predictor == ('analytic' if algo_name == 'sedd' else 'ancestral')
    if algo_name == 'd3pm':
        assert config.algo.T == 50
    config = make_config('sampling.predictor=ancestral')
    checkpoints.configure_from(config, source, explicit={'sampling.predictor'})
    assert config.sampling.predictor == 'ancestral'
    with pytest.raises(ConfigError, match=f'is a checkpoint of algo={algo_name}, whose network does not fit algo=mdlm'):
        checkpoints.configure_from(make_config('algo=mdlm'), source, explicit={'algo'})
