"""algorithms.py: the forward processes by their empirical law, the registry, families and hooks,
which sampler a config drives (SPEC §6, SPEC-2 §13), and SEDD and D3PM as training and sampling
call them (SPEC-2 §11, §12): what they draw, what they feed the network, what loss they return,
which settings they refuse, how a checkpoint's algorithm configures a run.

The losses and samplers the algorithms call are tested against independent computations in
test_losses.py, test_samplers.py and test_duality.py; here is what the classes add.
`sampling.predictor` picks ancestral, Ψ (psi) or ReMDM-conf sampling; the `sampling.psi.*` keys
become the time grid and kappas that samplers.sample_diffusion receives: tested against grids and
kappas worked out by hand, the published command lines of README.md, and the one-line errors of
settings that cannot work.
"""
import itertools
import math
import shlex
import types

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import stats

import algorithms
import checkpoints
import diffusion
import errors
import losses
import runtime
import samplers
import settings
from conftest import ROOT
from errors import ConfigError
from diffusion import Diffusion

K, MASK = 7, 6


def make_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        return compose(config_name='config', overrides=list(overrides))


@pytest.mark.parametrize('alpha', [0.1, 0.5, 0.93])
def test_uniform_forward_process_has_its_law(alpha):
    """q(z_t | x) = Cat(alpha e_x + (1 - alpha)/K 1) (SPEC §3): P(z = x) = alpha + (1 - alpha)/K and
    every other id (1 - alpha)/K; chi-square against these probabilities."""
    torch.manual_seed(0)
    algo = algorithms.DUOBase(make_config('algo=duo_base'), K, MASK)
    x0 = torch.full((400, 500), 3)
    z = algo.corrupt(x0, torch.full((400, 1), alpha))
    counts = np.bincount(z.flatten().numpy(), minlength=K)
    expected = np.full(K, (1 - alpha) / K)
    expected[3] += alpha
    assert stats.chisquare(counts, expected * counts.sum()).pvalue > 1e-3


@pytest.mark.parametrize('alpha', [0.1, 0.5, 0.93])
def test_absorbing_forward_process_has_its_law(alpha):
    """q(z_t | x) = Cat(alpha e_x + (1 - alpha) e_mask): masked w.p. 1 - alpha, else x itself."""
    torch.manual_seed(0)
    algo = algorithms.MDLM(make_config('algo=mdlm'), K, MASK)
    x0 = torch.randint(0, MASK, (400, 500))
    z = algo.corrupt(x0, torch.full((400, 1), alpha))
    assert set(z[z != MASK].unique().tolist()) <= set(range(MASK)) and torch.equal(z[z != MASK], x0[z != MASK])
    n, masked = z.numel(), int((z == MASK).sum())
    assert abs(masked / n - (1 - alpha)) < 5 * math.sqrt(alpha * (1 - alpha) / n)


def test_unknown_algorithm_gives_one_line():
    with pytest.raises(errors.ConfigError, match=r'^algo=sedx is unknown: use one of .*duo_base.*\(e.g. algo=duo_base\)$'):
        algorithms.build(make_config('algo=duo_base', 'algo.name=sedx'), K, MASK)


def test_families_say_which_checkpoints_load_into_which_algorithms():
    assert algorithms.family('duo') == algorithms.family('duo_base') == algorithms.family('distillation') == 'uniform'
    assert len({algorithms.family(name) for name in ('ar', 'mdlm', 'duo_base')}) == 3


def test_time_conditioning_off_feeds_sigma_zero():
    alpha = torch.tensor([[0.2], [0.7]])
    on = algorithms.DUOBase(make_config('algo=duo_base'), K, MASK)
    off = algorithms.DUOBase(make_config('algo=duo_base', 'algo.time_conditioning=false'), K, MASK)
    torch.testing.assert_close(on.sigma(alpha), -torch.log(alpha.reshape(-1)))
    assert torch.equal(off.sigma(alpha), torch.zeros(2))
    assert torch.equal(algorithms.MDLM(make_config('algo=mdlm'), K, MASK).sigma(alpha), torch.zeros(2))


# ------------------------------------------------------------------------- sampling.predictor and sampling.psi.*

K_S, MASK_S, BOS_S = 20, 19, 18  # a Diffusion module of a tiny DiT
TINY = ['model=micro', 'model.length=12', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16', 'training.ema=0', 'trainer.accelerator=cpu']
EPS = 1e-3  # configs/noise/log-linear.yaml: alpha_t = 1 - (1 - eps) t


def resolved_config(*overrides, mode='sample_eval'):
    """The resolved config of a command line's overrides (mode= when they give none)."""
    mode = [] if any(o.startswith('mode=') for o in overrides) else [f'mode={mode}']
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        config = compose(config_name='config', overrides=[*mode, *overrides])
    return settings.resolve(config)


def tiny_module(*overrides, seed=0):
    torch.manual_seed(seed)
    module = Diffusion(resolved_config(*TINY, *overrides), vocab_size=K_S, mask_id=MASK_S, bos_id=BOS_S).eval()
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.normal_(0, 0.5)
    return module


class Spy:
    """samplers.sample_diffusion, recording the keyword arguments of every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return REAL_SAMPLE_DIFFUSION(*args, **kwargs)


REAL_SAMPLE_DIFFUSION = samplers.sample_diffusion


@pytest.fixture
def spy(monkeypatch):
    spy = Spy()
    monkeypatch.setattr(samplers, 'sample_diffusion', spy)
    return spy


def loglinear(t):
    return 1 - (1 - EPS) * t


# ------------------------------------------------------------------------- the schedule reaches the sampler

# steps = 8 -> n = 9 points: n_hi = round(0.4 * 9) = 4, n_mid = round(0.3 * 9) = 3, n_lo = 2
HAND = ['sampling.predictor=psi', 'sampling.steps=8', 'sampling.psi.time_profile=linear-constant-linear-0.5',
        'sampling.psi.high_mode=pure-pc', 'sampling.psi.middle_mode=constant-0.3', 'sampling.psi.low_mode=pure-posterior',
        'sampling.psi.high_frac=0.4', 'sampling.psi.middle_frac=0.3']
HAND_GRID = [1, 5 / 6, 4 / 6, 0.5, 0.5, 0.5, 0.5, 0.5, 1e-5]   # linspace(1, .5, 4), .5 x 3, linspace(.5, 1e-5, 2)
HAND_KAPPAS = [0, 0, 0, 0, 0.3, 0.3, 0.3, 1, 1]


@pytest.mark.parametrize('algo', ['duo_base', 'duo', 'distillation', 'mdlm', 'sedd'])
def test_psi_keys_become_the_grid_and_kappas_the_sampler_gets(spy, algo):
    module = tiny_module(f'algo={algo}', *HAND)
    with torch.no_grad():
        out = module.generate(3, generator=torch.Generator().manual_seed(0))
    (call,) = spy.calls
    assert call['kind'] == ('absorbing' if algo in ('mdlm', 'sedd') else 'uniform')
    assert call.get('step') is None  # SEDD: the absorbing Ψ-step, not its analytic step
    assert call['grid'].dtype == call['kappas'].dtype == torch.float64
    assert call['grid'].tolist() == pytest.approx(HAND_GRID, abs=1e-15)
    assert call['kappas'].tolist() == HAND_KAPPAS
    assert call['cache'] is True  # MDLM: the per-sequence cache at the kappa = 1 steps, where it is exact
    assert out.shape == (3, 12) and (out >= 0).all() and (out < K_S).all() and (out != MASK_S).all()


@pytest.mark.parametrize('algo, predictor', [('duo_base', 'ancestral'), ('mdlm', 'ancestral_cache'),
                                             ('mdlm', 'ancestral')])
def test_ancestral_predictors_pass_no_schedule(spy, algo, predictor):
    module = tiny_module(f'algo={algo}', f'sampling.predictor={predictor}', 'sampling.steps=4')
    with torch.no_grad():
        module.generate(2)
    (call,) = spy.calls
    assert 'grid' not in call and 'kappas' not in call and not call.get('remdm_conf', False)
    assert call['cache'] is (predictor == 'ancestral_cache')


@pytest.mark.parametrize('algo, ancestral', [('duo_base', 'ancestral'), ('mdlm', 'ancestral_cache')])
def test_psi_with_its_default_keys_draws_exactly_what_ancestral_draws(algo, ancestral):
    """The defaults of sampling.psi.* are the ancestral sampler (SPEC-2 §13, Config)."""
    draws = {}
    for predictor in (ancestral, 'psi'):
        module = tiny_module(f'algo={algo}', f'sampling.predictor={predictor}', 'sampling.steps=6')
        with torch.no_grad():
            draws[predictor] = module.generate(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(draws[ancestral], draws['psi'])


def test_mdlm_psi_runs_the_whole_batch_at_kappa_below_one_and_the_cache_elsewhere(monkeypatch):
    """Loop profile: the plateau steps (kappa < 1; any token may be remasked) see all B sequences;
    the others (kappa = 1) only those with a token to fill."""
    module = tiny_module('algo=mdlm', 'sampling.predictor=psi', 'sampling.steps=40', 'model.length=4',
                         'sampling.psi.time_profile=linear-constant-linear-0.5', 'sampling.psi.middle_mode=constant-0.5',
                         'sampling.psi.high_frac=0.3', 'sampling.psi.middle_frac=0.4')
    rows = []
    real = module.algo.logits
    monkeypatch.setattr(module.algo, 'logits', lambda m, xt, t, out=None: rows.append((len(xt), float(t[0])))
                        or real(m, xt, t, out))
    B = 16
    with torch.no_grad():
        out = module.generate(B, generator=torch.Generator().manual_seed(0))
    # n = 41 points: n_hi = 12, n_mid = 16, n_lo = 13. Steps 11-27 have dt = 0; step 11 (kappa = 1)
    # is skipped, steps 12-27 (the middle segment: kappa = 0.5) run at t = 0.5, and so does step 28
    # (t = 0.5 -> the low segment, kappa = 1: cached, or skipped when nothing is left to fill).
    at_plateau = [n for n, t in rows if t == 0.5]
    assert at_plateau[:16] == [B] * 16 and len(at_plateau) in (16, 17)
    assert min(n for n, _ in rows) < B and (out != MASK_S).all()


def test_remdm_conf_is_an_mdlm_predictor(spy):
    module = tiny_module('algo=mdlm', 'sampling.predictor=remdm-conf', 'sampling.steps=6')
    with torch.no_grad():
        out = module.generate(3, generator=torch.Generator().manual_seed(0))
    (call,) = spy.calls
    assert call['remdm_conf'] is True and 'kappas' not in call and (out != MASK_S).all()


# ------------------------------------------------------------------------- the published settings (README)

def readme_psi_commands():
    """The README's `python main.py ...` command lines with sampling.predictor=psi, as override lists."""
    text = (ROOT / 'README.md').read_text().replace('\\\n', ' ')
    return [shlex.split(line)[2:] for line in text.splitlines()
            if line.startswith('python main.py ') and 'sampling.predictor=psi' in line]


def schedule_of(overrides):
    """(algo name, grid, kappas) that a command line's algorithm hands the sampler."""
    config = resolved_config(*[o for o in overrides if not o.startswith('eval.checkpoint_path=')])
    algo = algorithms.build(config, 50258, 50257)
    kwargs = algo.sampler_arguments(config.sampling)
    return config, kwargs['grid'], kwargs['kappas']


def remdm_kappas(grid, sigma):
    """κ_j = clip(1 - σ(α_t, α_s)/(1 - α_s), 0, 1) for the pairs of the grid, then κ = 1 (SPEC-2 §13.2)."""
    out = []
    for t, s in zip(grid[:-1], grid[1:]):
        a_t, a_s = loglinear(t), loglinear(s)
        out.append(min(max(1 - sigma(a_t, a_s) / (1 - a_s), 0.0), 1.0))
    return out + [1.0]


def test_readme_prints_the_published_owt_settings_for_both_models():
    """SPEC-2 §13.5: loop, cap and rescale, S = 256, batch 16 x 32, with p = 0.95 / 0.9 / 0.9."""
    seen = set()
    for overrides in readme_psi_commands():
        config, grid, kappas = schedule_of(overrides)
        s = config.sampling
        assert (int(s.steps), int(config.loader.eval_batch_size), int(s.num_sample_batches)) == (256, 16, 32)
        assert config.algo.name in ('duo_base', 'mdlm') and config.noise.type == 'log-linear'
        setting = ('loop' if s.psi.time_profile != 'linear' else s.psi.high_mode.split('-')[1])
        assert s.p_nucleus == {'loop': 0.95, 'capped': 0.9, 'rescale': 0.9}[setting]
        seen.add((config.algo.name, setting))
    assert {setting for _, setting in seen} == {'loop', 'capped', 'rescale'}
    assert {algo for algo, _ in seen} == {'duo_base', 'mdlm'} and ('duo_base', 'loop') in seen


def test_readme_loop_command_gives_the_worked_grid():
    """SPEC-2 §13.3's worked example: n_hi = 116, n_mid = 128, n_lo = 13; steps 115-243 have dt = 0;
    κ = 1 - 0.01/(1 - 0.9) = 0.9 on steps 116-242 (t_c includes ε, so α(t_c) = 0.9 exactly)."""
    loops = [o for o in readme_psi_commands() if 'sampling.psi.time_profile=linear-constant-linear-0.9-inv' in o]
    assert len(loops) == 2
    for overrides in loops:
        _, grid, kappas = schedule_of(overrides)
        t_c = 0.1 / (1 - EPS)
        assert grid.shape == kappas.shape == (257,)
        dt = (grid[:-1] - grid[1:]).tolist()
        assert [i for i, d in enumerate(dt) if d == 0] == list(range(115, 244))
        assert grid[0] == 1 and grid[-1] == 1e-5 and grid[115].item() == pytest.approx(t_c, abs=1e-15)
        assert dt[:115] == pytest.approx([(1 - t_c) / 115] * 115, rel=1e-9)
        assert dt[244:] == pytest.approx([(t_c - 1e-5) / 12] * 12, rel=1e-9)
        assert kappas.tolist() == pytest.approx([1.0] * 116 + [0.9] * 127 + [1.0] * 14, abs=1e-12)


def test_readme_cap_and_rescale_commands_give_remdm_kappas():
    linear = [1 - (1 - 1e-5) * i / 256 for i in range(257)]
    for overrides in readme_psi_commands():
        config, grid, kappas = schedule_of(overrides)
        psi = config.sampling.psi
        if psi.time_profile != 'linear':
            continue
        assert grid.tolist() == pytest.approx(linear, abs=1e-15)
        if psi.high_mode == 'max-capped-0.01':
            expected = remdm_kappas(linear, lambda a_t, a_s: min(0.01, (1 - a_s) / a_t))
        else:
            assert psi.high_mode == 'max-rescale-0.05'
            cap = 0.05 if psi.rescale_compat else 1.0   # upstream's eta * min(eta, .): pitfall (a)
            expected = remdm_kappas(linear, lambda a_t, a_s: 0.05 * min(cap, (1 - a_s) / a_t))
        assert kappas.tolist() == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------- settings that cannot work

@pytest.mark.parametrize('algo, overrides, message', [
    ('ar', ['sampling.predictor=psi'], 'sampling.predictor=psi does not apply to algo=ar: use one of ancestral, '
                                       'ancestral_cache (e.g. sampling.predictor=ancestral)'),
    ('duo_base', ['sampling.predictor=remdm-conf'],
     'sampling.predictor=remdm-conf does not apply to algo=duo_base: use one of ancestral, ancestral_cache, psi '
     '(e.g. sampling.predictor=ancestral)'),
    ('duo_base', ['sampling.predictor=psi', 'sampling.psi.negative_kappa=true'],
     'sampling.psi.negative_kappa=true is for absorbing diffusion (algo=mdlm or sedd), not algo=duo_base: use '
     'sampling.psi.negative_kappa=false'),
    ('sedd', ['sampling.predictor=remdm-conf'],
     'sampling.predictor=remdm-conf does not apply to algo=sedd: use one of analytic, psi '
     '(e.g. sampling.predictor=analytic)'),
    ('sedd', ['sampling.predictor=psi', 'sampling.noise_removal=greedy'],
     'sampling.noise_removal=greedy does not apply to algo=sedd: use ancestral or none '
     '(e.g. sampling.noise_removal=ancestral)'),
    ('sedd', ['sampling.predictor=psi', 'sampling.steps=4', 'sampling.psi.time_profile=linear-constant-linear-0.5',
              'sampling.psi.high_frac=0'],
     None),  # the profile's own one line (settings.check_psi), as for every algorithm
])
def test_settings_the_algorithm_cannot_sample_with_fail_before_weights_load(algo, overrides, message):
    with pytest.raises(errors.ConfigError) as error:
        Diffusion(resolved_config(*TINY, f'algo={algo}', *overrides), vocab_size=K_S, mask_id=MASK_S, bos_id=BOS_S)
    if message is None:
        assert '\n' not in str(error.value) and 'sampling.psi.' in str(error.value)
    else:
        assert str(error.value) == message


def test_an_unused_negative_kappa_is_not_an_error():
    """negative_kappa only matters to psi sampling: training a DUO model with it set is fine."""
    Diffusion(resolved_config(*TINY, 'algo=duo_base', 'sampling.psi.negative_kappa=true', mode='train'),
              vocab_size=K_S, mask_id=MASK_S, bos_id=BOS_S)


# ========================================================================= SEDD and D3PM (SPEC-2 §11, §12)

K_SD, MASK_SD = 11, 10  # the SEDD / D3PM tests' vocabulary
TINY_SD = ['model=micro', 'model.length=8', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1',
        'model.cond_dim=16', 'training.ema=0']


def sd_config(*overrides):
    return make_config(*TINY_SD, *overrides)


class Recorder(torch.nn.Module):
    """A stand-in backbone: records every call and returns fixed random logits of the asked rows."""

    def __init__(self, seed=0):
        super().__init__()
        self.calls = []
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, x, sigma, attention_mask=None, output_rows=None, out=None):
        logits = torch.randn(*x.shape, K_SD, generator=self.g, dtype=torch.float64).float() * 2
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
    x0 = torch.randint(0, K_SD - 1, (B, L), generator=g)
    return x0, torch.ones_like(x0)


# ---- SEDD --------------------------------------------------------------------------------------
def test_sedd_loss_is_the_score_entropy_of_what_the_network_saw():
    algo = algorithms.build(sd_config('algo=sedd'), K_SD, MASK_SD)
    module = fake_module()
    x0, mask = clean_batch()
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.99])
    torch.manual_seed(7)
    per_token, weight = algo.loss(module, x0, mask, t, step=0)
    torch.manual_seed(7)
    alpha = alpha_loglinear(t)[:, None]
    xt = torch.where(torch.rand(x0.shape) < 1 - alpha, MASK_SD, x0)   # the forward process, redrawn
    call, = module.backbone.calls
    assert torch.equal(call['x'], xt) and torch.equal(call['rows'], xt == MASK_SD)  # masked rows only
    assert torch.allclose(call['sigma'].double(), -torch.log(alpha[:, 0]), rtol=1e-6)  # time conditioned
    expected = losses.sedd_loss(call['logits'].double(), x0, xt, alpha, torch.full_like(alpha, -(1 - EPS)), MASK_SD)
    assert torch.allclose(per_token.double(), expected, rtol=1e-5, atol=1e-6) and weight is mask
    assert (per_token[xt != MASK_SD] == 0).all() and (per_token[xt == MASK_SD] > 0).all()


def test_sedd_validation_reports_its_bound():
    algo = algorithms.build(sd_config('algo=sedd'), K_SD, MASK_SD)
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
    algo = algorithms.build(sd_config('algo=d3pm', f'algo.T={T}'), K_SD, MASK_SD)
    module = fake_module()
    x0, mask = clean_batch()
    i = torch.tensor([1, T, max(T // 2, 1), 1, min(2, T), T])
    torch.manual_seed(5)
    per_token, weight = algo.loss(module, x0, mask, i, step=0)
    torch.manual_seed(5)
    i = i.double()  # the alphas in float64: 1 - alpha_t and alpha_s - alpha_t are O(1/T)
    alpha_t = alpha_loglinear(i / T)[:, None]
    alpha_s = torch.where(i == 1, 1.0, alpha_loglinear((i - 1) / T))[:, None]  # alpha_0 = 1: the last step
    xt = torch.where(torch.rand(x0.shape) < 1 - alpha_t, MASK_SD, x0)
    noisy, clean = module.backbone.calls
    assert torch.equal(noisy['x'], xt) and torch.equal(noisy['rows'], xt == MASK_SD)
    assert torch.allclose(noisy['sigma'].double(), -torch.log(alpha_t[:, 0]), rtol=1e-6)
    assert torch.equal(clean['x'], x0) and clean['rows'] is None and (clean['sigma'] == 0).all()  # sigma(alpha_0)
    expected = (losses.d3pm_reconstruction_loss(clean['logits'].double(), x0)
                + losses.d3pm_loss(noisy['logits'].double(), x0, xt, alpha_t, alpha_s, T, MASK_SD))
    assert torch.allclose(per_token.double(), expected, rtol=1e-5, atol=1e-6) and weight is mask


def test_d3pm_subs_masking_gives_the_mask_no_probability():
    algo = algorithms.build(sd_config('algo=d3pm', 'algo.T=10', 'algo.subs_masking=true'), K_SD, MASK_SD)
    module = fake_module()
    x0, mask = clean_batch()
    logits = algo.logits(module, x0, torch.rand(6))
    assert (logits[..., MASK_SD] == float('-inf')).all() and logits[..., :MASK_SD].isfinite().all()


def test_d3pm_times_are_stratified_step_indices_covering_1_to_T(monkeypatch):
    """SPEC-2 §12 check (4): a global batch of T draws every i in 1..T exactly once (stratified), the
    last step i = 1 included; across DDP ranks the strata are split; i ~ U{1..T} (chi-square)."""
    algo = algorithms.build(sd_config('algo=d3pm', 'algo.T=7'), K_SD, MASK_SD)
    module = fake_module()
    for _ in range(20):
        assert sorted(algo.times(module, 7).tolist()) == list(range(1, 8))
    # T = 1000 (upstream's t >= 1e-3 never drew i = 1 there, SPEC-2 §12 pitfall (b))
    algo1000 = algorithms.build(sd_config('algo=d3pm', 'algo.T=1000'), K_SD, MASK_SD)
    assert sorted(algo1000.times(module, 1000).tolist()) == list(range(1, 1001))
    algo4 = algorithms.build(sd_config('algo=d3pm', 'algo.T=4'), K_SD, MASK_SD)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(runtime, 'rank_world', lambda rank=rank: (rank, 2))
        parts.append(algo4.times(module, 2).tolist())
    assert parts == [[1, 2], [3, 4]]
    monkeypatch.setattr(runtime, 'rank_world', lambda: (0, 1))
    algo5 = algorithms.build(sd_config('algo=d3pm', 'algo.T=5'), K_SD, MASK_SD)
    draws = torch.cat([algo5.times(module, 3) for _ in range(5000)])
    counts = torch.bincount(draws, minlength=6)[1:].double()
    assert draws.min() == 1 and draws.max() == 5
    stat = ((counts - 3000) ** 2 / 3000).sum().item()
    assert stat < 18.5  # chi-square, 4 degrees of freedom: p ~ 0.001


def test_continuous_algorithms_draw_times_in_sampling_eps_1():
    algo = algorithms.build(sd_config('algo=sedd', 'training.sampling_eps=0.25'), K_SD, MASK_SD)
    t = torch.cat([algo.times(fake_module(), 4) for _ in range(200)])
    assert t.dtype == torch.float32 and t.min() >= 0.25 and t.max() <= 1


# ---- sampling ----------------------------------------------------------------------------------
def test_d3pm_samples_on_its_training_grid():
    """The sampler's times are grid points i/T, from 1 to 1/T; with sampling.steps >= T - 1 every
    step of the grid once, then the last step (noise removal) to alpha = 1."""
    for T, steps in ((10, 9), (10, 40), (1000, 7), (1, 3)):
        algo = algorithms.build(sd_config('algo=d3pm', f'algo.T={T}', f'sampling.steps={steps}'), K_SD, MASK_SD)
        grid = algo.sampler_arguments(algo.config.sampling)['grid']
        i = grid * T
        assert grid.shape == (steps + 1,) and torch.allclose(i, i.round()) and grid[0] == 1 and grid[-1] == 1 / T
        assert (grid[1:] <= grid[:-1]).all()
        if steps >= T - 1:
            assert torch.equal(torch.unique(i.round().long()), torch.arange(1, T + 1))


@pytest.mark.parametrize('algo_name,predictor,step', [
    ('sedd', 'analytic', samplers.sedd_step), ('d3pm', 'ancestral', samplers.d3pm_step),
    ('mdlm', 'analytic', samplers.sedd_step)])
def test_samplers_of_the_algorithms(algo_name, predictor, step, monkeypatch):
    """The configured predictor runs its step on a real module: no [MASK_SD] left after ancestral noise
    removal, and the step is the one of SPEC-2 (MDLM's analytic one with S = 1)."""
    config = sd_config(f'algo={algo_name}', f'sampling.predictor={predictor}', 'sampling.steps=6', 'algo.T=20'
                         if algo_name == 'd3pm' else 'sampling.p_nucleus=1')
    module = diffusion.Diffusion(config, K_SD, MASK_SD, bos_id=K_SD - 2)
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
    assert out.shape == (4, 8) and (out != MASK_SD).all()
    chosen = used[0]
    assert getattr(chosen, 'func', chosen) is step
    assert getattr(chosen, 'keywords', {}).get('normalised', False) == (algo_name == 'mdlm')


# ---- SEDD's Ψ-sampler: the absorbing Ψ-step on the normalised score ---------------------------------
V_PSI, MASK_PSI = 4, 3  # tokens 0, 1, 2 and the [MASK]
PSI_A = torch.tensor([[0.3, -0.5, 0.9], [-0.2, 0.6, 0.1]], dtype=torch.float64)        # (position, token)
PSI_B = torch.tensor([[1.5, -1.0, 0.0], [0.0, 1.2, -0.7], [-1.1, 0.3, 0.9], [0.0, 0.0, 0.0]],
                     dtype=torch.float64)                                              # (other position's id, token)
PSI_D = torch.tensor([[0.4, 0.0, -0.4], [0.0, -0.3, 0.3]], dtype=torch.float64)         # (position, token) per sigma
PSI_SHIFT = 1.2  # log of the score's mass scale: S = e^1.2 (K - 1)^-1 sum_j e^(l_j - 1.2) ~ 2-5, never 1


def psi_logits(z, sigma):
    """(B, 2, V_PSI) float64: a score network whose logits at position p depend on the other position's id
    (or [MASK]) and on sigma, with an unnormalised mass S != 1."""
    logits = torch.zeros(*z.shape, V_PSI, dtype=torch.float64)
    other = z.flip(1)
    logits[..., :3] = PSI_A + PSI_B[other] + PSI_D * sigma.double()[:, None, None] + PSI_SHIFT
    return logits


def law_of_absorbing_sampler(grid, unmask_probability):
    """The exact law {(z_0, z_1): probability} of a 2-token absorbing sampler over `grid` (written here,
    by enumeration): at a step t -> s every masked token unmasks independently w.p.
    unmask_probability(alpha_t, alpha_s, S) (S: the score's mass at that token), to j ∝ exp(l_j), j != mask,
    with the logits at (z_t, sigma_t); then every remaining mask is drawn at t = grid[-1]."""
    def alpha(t):
        return 1 - (1 - EPS) * t

    def xhat_and_mass(z, t):
        logits = psi_logits(torch.tensor([z]), torch.tensor([-math.log(alpha(t))]))[0, :, :3]
        return torch.softmax(logits, -1).numpy(), (logits.exp().sum(-1) / (V_PSI - 1)).numpy()

    law = {(MASK_PSI, MASK_PSI): 1.0}
    steps = [(t, s) for t, s in zip(grid[:-1], grid[1:])] + [(grid[-1], None)]
    for t, s in steps:
        new = {}
        for z, p in law.items():
            xhat, mass = xhat_and_mass(z, t)
            options = []
            for pos in range(2):
                if z[pos] != MASK_PSI:
                    options.append([(z[pos], 1.0)])
                    continue
                q = 1.0 if s is None else unmask_probability(alpha(t), alpha(s), mass[pos])
                options.append([(MASK_PSI, 1 - q)] + [(j, q * xhat[pos, j]) for j in range(3)])
            for (a, pa), (b, pb) in itertools.product(*options):
                new[(a, b)] = new.get((a, b), 0.0) + p * pa * pb
        law = new
    return law


def test_sedd_psi_with_default_keys_is_the_ancestral_sampler_on_the_normalised_score():
    """sampling.predictor=psi with the default sampling.psi.* on a score network with S != 1 whose
    predictions depend on the other token and on sigma: the draws follow the law of the ancestral
    absorbing sampler (unmask w.p. (alpha_s - alpha_t)/(1 - alpha_t), token ∝ exp(l_j)), enumerated here
    (chi-square), not that of SEDD's analytic step (unmask w.p. min(1, c S)), which differs here."""
    steps = 3
    config = sd_config('algo=sedd', 'sampling.predictor=psi', f'sampling.steps={steps}', 'sampling.p_nucleus=1')
    algo = algorithms.build(config, V_PSI, MASK_PSI)
    module = types.SimpleNamespace(backbone=lambda z, sigma, out=None: psi_logits(z, sigma),
                                   device=torch.device('cpu'), compute_dtype=torch.float32)
    n = 30_000
    out = algo.sample(module, n, 2, generator=torch.Generator().manual_seed(0))
    grid = [1 - (1 - 1e-5) * k / steps for k in range(steps + 1)]
    ancestral = law_of_absorbing_sampler(grid, lambda a_t, a_s, S: (a_s - a_t) / (1 - a_t))
    analytic = law_of_absorbing_sampler(grid, lambda a_t, a_s, S: min(1.0, (a_s - a_t) / (1 - a_t) * S))
    outcomes = list(itertools.product(range(3), repeat=2))
    assert sum(ancestral[o] for o in outcomes) == pytest.approx(1, abs=1e-12)
    counts = np.array([int(((out[:, 0] == a) & (out[:, 1] == b)).sum()) for a, b in outcomes])
    assert counts.sum() == n
    assert stats.chisquare(counts, n * np.array([ancestral[o] for o in outcomes])).pvalue > 1e-3
    assert sum(abs(ancestral[o] - analytic[o]) for o in outcomes) > 0.05  # the test tells the two apart


def test_sedd_psi_takes_negative_kappas_as_absorbing_steps():
    """ReMDM-cap with sampling.psi.negative_kappa=true (sigma up to ReMDM's bound: kappa < 0 at the first
    steps) is a valid absorbing step for SEDD too: it samples, and no [MASK] is left."""
    module = tiny_module('algo=sedd', 'sampling.predictor=psi', 'sampling.steps=8', 'sampling.psi.negative_kappa=true',
                         *[f'sampling.psi.{k}_mode=max-capped-0.5' for k in ('high', 'middle', 'low')])
    kappas = module.algo.sampler_arguments(module.config.sampling)['kappas']
    assert kappas.min() < 0
    with torch.no_grad():
        out = module.generate(4, generator=torch.Generator().manual_seed(0))
    assert (out != MASK_S).all()


# ---- settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,message', [
    (['algo=sedd', 'sampling.predictor=ancestral_cache'],
     'sampling.predictor=ancestral_cache does not apply to algo=sedd (its ancestral sampler on the normalised score '
     'is sampling.predictor=psi with the default sampling.psi.*): use one of analytic, psi '
     '(e.g. sampling.predictor=analytic)'),
    (['algo=sedd', 'sampling.predictor=ancestral'],
     'sampling.predictor=ancestral does not apply to algo=sedd (its ancestral sampler on the normalised score is '
     'sampling.predictor=psi with the default sampling.psi.*): use one of analytic, psi '
     '(e.g. sampling.predictor=analytic)'),
    (['algo=sedd', 'sampling.noise_removal=greedy'],
     'sampling.noise_removal=greedy does not apply to algo=sedd: use ancestral or none '
     '(e.g. sampling.noise_removal=ancestral)'),
    (['algo=d3pm', 'sampling.predictor=ancestral_cache'],
     'sampling.predictor=ancestral_cache does not apply to algo=d3pm (its unmask probabilities need the network at '
     'every step: nothing to cache): use ancestral (e.g. sampling.predictor=ancestral)'),
    (['algo=duo_base', 'sampling.predictor=analytic'],
     'sampling.predictor=analytic does not apply to algo=duo_base: use one of ancestral, ancestral_cache, psi '
     '(e.g. sampling.predictor=ancestral)'),
    (['algo=d3pm', 'algo.T=0'], 'algo.T=0 must be an integer >= 1 for algo=d3pm (e.g. algo.T=1000)'),
    (['algo=d3pm', 'algo.T=2.5'], 'algo.T=2.5 must be an integer >= 1 for algo=d3pm (e.g. algo.T=1000)'),
])
def test_bad_settings_give_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        diffusion.Diffusion(sd_config(*overrides), K_SD, MASK_SD, bos_id=K_SD - 2)
    assert str(error.value) == message


def test_algorithm_files_set_their_predictor_and_every_key_is_read():
    """sedd.yaml / d3pm.yaml set the predictor at the global level (command lines still win) and
    hold only keys the code reads."""
    assert sd_config('algo=sedd').sampling.predictor == 'analytic'
    assert sd_config('algo=d3pm').sampling.predictor == 'ancestral'
    assert sd_config('algo=mdlm').sampling.predictor == 'ancestral_cache'
    assert sd_config('algo=mdlm', 'sampling.predictor=analytic').sampling.predictor == 'analytic'
    assert set(sd_config('algo=sedd').algo) == {'name', 'backbone', 'time_conditioning'}
    assert set(sd_config('algo=d3pm').algo) == {'name', 'backbone', 'time_conditioning', 'T', 'subs_masking'}
    assert algorithms.family('sedd') == 'score' and algorithms.family('d3pm') == 'mean'


@pytest.mark.parametrize('algo_name', ['sedd', 'd3pm'])
def test_a_checkpoint_of_sedd_or_d3pm_configures_the_run(tmp_path, algo_name):
    """Evaluating a checkpoint without algo=: its algorithm, with its file's predictor (as algo=
    would give it) unless the command line sets one."""
    trained = diffusion.Diffusion(sd_config(f'algo={algo_name}', 'algo.T=50' if algo_name == 'd3pm' else
                                              'seed=1'), K_SD, MASK_SD, bos_id=K_SD - 2)
    path = tmp_path / 'model.ckpt'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in trained.backbone.state_dict().items()},
                'duo': trained.description()}, path)
    source = checkpoints.read_source(path)
    config = sd_config()                      # algo=duo_base, predictor ancestral_cache
    checkpoints.configure_from(config, source)
    assert config.algo.name == algo_name
    assert config.sampling.predictor == ('analytic' if algo_name == 'sedd' else 'ancestral')
    if algo_name == 'd3pm':
        assert config.algo.T == 50
    config = sd_config('sampling.predictor=ancestral')
    checkpoints.configure_from(config, source, explicit={'sampling.predictor'})
    assert config.sampling.predictor == 'ancestral'
    with pytest.raises(ConfigError, match=f'is a checkpoint of algo={algo_name}, whose network does not fit algo=mdlm'):
        checkpoints.configure_from(sd_config('algo=mdlm'), source, explicit={'algo'})
