"""algorithms.py: the forward processes by their empirical law, the registry, families and hooks,
and which sampler a config drives (SPEC §6, SPEC-2 §13).

The losses and samplers the algorithms call are tested against independent computations in
test_losses.py, test_samplers.py and test_duality.py; here is what the classes add.
`sampling.predictor` picks ancestral, Ψ (psi) or ReMDM-conf sampling; the `sampling.psi.*` keys
become the time grid and kappas that samplers.sample_diffusion receives: tested against grids and
kappas worked out by hand, the published command lines of README.md, and the one-line errors of
settings that cannot work.
"""
import math
import shlex

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import stats

import algorithms
import errors
import samplers
import settings
from conftest import ROOT
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


@pytest.mark.parametrize('algo', ['duo_base', 'duo', 'distillation', 'mdlm'])
def test_psi_keys_become_the_grid_and_kappas_the_sampler_gets(spy, algo):
    module = tiny_module(f'algo={algo}', *HAND)
    with torch.no_grad():
        out = module.generate(3, generator=torch.Generator().manual_seed(0))
    (call,) = spy.calls
    assert call['kind'] == ('absorbing' if algo == 'mdlm' else 'uniform')
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
     'sampling.psi.negative_kappa=true is for absorbing diffusion (algo=mdlm), not algo=duo_base: use '
     'sampling.psi.negative_kappa=false'),
])
def test_settings_the_algorithm_cannot_sample_with_fail_before_weights_load(algo, overrides, message):
    with pytest.raises(errors.ConfigError) as error:
        Diffusion(resolved_config(*TINY, f'algo={algo}', *overrides), vocab_size=K_S, mask_id=MASK_S, bos_id=BOS_S)
    assert str(error.value) == message


def test_an_unused_negative_kappa_is_not_an_error():
    """negative_kappa only matters to psi sampling: training a DUO model with it set is fine."""
    Diffusion(resolved_config(*TINY, 'algo=duo_base', 'sampling.psi.negative_kappa=true', mode='train'),
              vocab_size=K_S, mask_id=MASK_S, bos_id=BOS_S)
