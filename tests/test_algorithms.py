"""algorithms.py: the forward processes by their empirical law, the registry, families and hooks.

The losses and samplers the algorithms call are tested against independent computations in
test_losses.py, test_samplers.py and test_duality.py; here is what the classes add.
"""
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import stats

import algorithms
import errors
from conftest import ROOT

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
