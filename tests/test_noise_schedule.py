"""noise_schedule.py: noise schedules and stratified time sampling (SPEC §3)."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

import noise_schedule as ns


def _central_difference(f, t, h=1e-5):
    return (f(t + h) - f(t - h)) / (2 * h)


@pytest.mark.parametrize('eps', [1e-3, 0.05])
def test_log_linear(eps):
    """SPEC §3 defines log-linear by its ends and its shape: alpha_0 = 1, alpha_1 = eps, linear in t
    (so the network's sigma = -log alpha is what is log-linear). Checked from that definition: the
    chord through the two ends, and equal steps of alpha for equal steps of t."""
    s = ns.LogLinear(eps)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    ends = s.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([1.0, eps], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.alpha(t), ends[0] + t * (ends[1] - ends[0]), rtol=0, atol=1e-15)
    steps = s.alpha(t).diff()
    torch.testing.assert_close(steps, torch.full_like(steps, -(1 - eps) / 100), rtol=1e-12, atol=0)
    assert s.alpha(torch.tensor(0.0, dtype=torch.float64)) == 1
    assert abs(s.alpha(torch.tensor(1.0, dtype=torch.float64)) - eps) < 1e-15
    inner = t[1:-1]
    torch.testing.assert_close(s.dalpha(inner), _central_difference(s.alpha, inner), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize('eps', [1e-3, 0.05])
def test_cosine(eps):
    s = ns.Cosine(eps)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    # SPEC §3: alpha_t = 1 - cos(pi/2 (1 - (1 - eps) t)), written here with sin for independence
    torch.testing.assert_close(s.alpha(t), 1 - torch.sin(math.pi / 2 * (1 - eps) * t), rtol=1e-12, atol=1e-14)
    assert abs(s.alpha(torch.tensor(0.0, dtype=torch.float64)) - 1) < 1e-15
    assert abs(s.alpha(torch.tensor(1.0, dtype=torch.float64)) - (1 - math.cos(math.pi / 2 * eps))) < 1e-15
    inner = t[1:-1]
    torch.testing.assert_close(s.dalpha(inner), _central_difference(s.alpha, inner), rtol=1e-7, atol=1e-9)
    assert (s.dalpha(t) <= 0).all() and (s.alpha(t).diff() < 0).all()


def test_schedules_keep_dtype_and_shape():
    for schedule in (ns.LogLinear(1e-3), ns.Cosine(1e-3)):
        t = torch.rand(4, 1)
        assert schedule.alpha(t).shape == (4, 1) and schedule.alpha(t).dtype == torch.float32
        assert schedule.dalpha(t).shape == (4, 1) and schedule.dalpha(t).dtype == torch.float32


def test_get_schedule():
    assert isinstance(ns.get_schedule(OmegaConf.create({'type': 'log-linear', 'eps': 1e-3})), ns.LogLinear)
    cosine = ns.get_schedule(OmegaConf.create({'type': 'cosine', 'eps': '1e-3'}))
    assert isinstance(cosine, ns.Cosine) and cosine.eps == 1e-3
    with pytest.raises(ValueError, match='noise.type'):
        ns.get_schedule(OmegaConf.create({'type': 'linear', 'eps': 1e-3}))


# ---------------------------------------------------------------------------------------------
# stratified ("antithetic") times
def _strata(t, eps, n):
    """Index of the stratum of each time in the global batch of n, from t = eps + (1 - eps) t~."""
    return np.floor((t.double().numpy() - eps) / (1 - eps) * n).astype(int)


@pytest.mark.parametrize('batch_size,world_size', [(1, 1), (8, 1), (5, 4)])
def test_stratified_times_one_per_stratum_and_disjoint_across_ranks(batch_size, world_size):
    eps = 1e-3
    n = batch_size * world_size
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        strata = []
        for rank in range(world_size):
            t = ns.stratified_times(batch_size, eps, rank, world_size, generator=g)
            assert t.shape == (batch_size,) and t.dtype == torch.float32
            assert ((t >= eps) & (t <= 1)).all()
            own = _strata(t, eps, n)
            # this rank holds strata [rank * b, (rank + 1) * b): disjoint from every other rank's
            assert (own // batch_size == rank).all()
            strata.extend(own.tolist())
        assert sorted(strata) == list(range(n))


def test_stratified_times_uniform_marginal():
    eps, batch_size, world_size = 1e-3, 4, 2
    g = torch.Generator().manual_seed(1)
    draws = torch.cat([ns.stratified_times(batch_size, eps, rank, world_size, generator=g)
                       for _ in range(2000) for rank in range(world_size)]).double().numpy()
    assert stats.kstest(draws, stats.uniform(loc=eps, scale=1 - eps).cdf).pvalue > 1e-3
    # and uniform within each stratum: the position inside the stratum is U(0, 1)
    within = (draws - eps) / (1 - eps) * (batch_size * world_size) % 1
    assert stats.kstest(within, 'uniform').pvalue > 1e-3


def test_stratified_times_draws_differ_by_generator():
    a = ns.stratified_times(16, 1e-3, generator=torch.Generator().manual_seed(0))
    b = ns.stratified_times(16, 1e-3, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)
    assert torch.equal(a, ns.stratified_times(16, 1e-3, generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------------------------------------
# discrete times (SPEC-2 §12)
@pytest.mark.parametrize('batch_size,world_size,T', [(3, 2, 7), (4, 1, 1000), (5, 4, 10)])
def test_discrete_times_are_uniform_on_1_to_T(batch_size, world_size, T):
    """i ~ U{1..T}, i = 1 included (chi-square), int64, per-rank slices of one stratified batch."""
    g = torch.Generator().manual_seed(T)
    draws = torch.cat([ns.discrete_times(batch_size, T, rank, world_size, generator=g)
                       for _ in range(max(1, 30 * T // (batch_size * world_size))) for rank in range(world_size)])
    assert draws.dtype == torch.int64 and draws.min() >= 1 and draws.max() <= T
    counts = torch.bincount(draws - 1, minlength=T).numpy()
    assert counts[0] > 0
    assert stats.chisquare(counts).pvalue > 1e-3


def test_discrete_times_one_per_step_when_the_global_batch_is_T():
    """With n = T global draws, stratum k maps to i = k + 1 exactly: every step once, rank r the r-th slice."""
    T, batch_size, world_size = 12, 3, 4
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        per_rank = [ns.discrete_times(batch_size, T, rank, world_size, generator=g) for rank in range(world_size)]
        assert torch.equal(torch.cat(per_rank), torch.arange(1, T + 1))
    with pytest.raises(ValueError, match='algo.T=0'):
        ns.discrete_times(4, 0)


@pytest.mark.parametrize('schedule', [ns.LogLinear(1e-3), ns.Cosine(1e-3)])
def test_discrete_alphas(schedule):
    T = 8
    i = torch.tensor([[1, 2], [5, 8]])
    alpha_t, alpha_s = ns.discrete_alphas(schedule, i, T)
    assert alpha_t.dtype == alpha_s.dtype == torch.float64 and alpha_t.shape == i.shape
    for (a_t, a_s), step in zip(zip(alpha_t.flatten().tolist(), alpha_s.flatten().tolist()), i.flatten().tolist()):
        assert a_t == pytest.approx(schedule.alpha(torch.tensor(step / T, dtype=torch.float64)).item(), abs=1e-15)
        previous = schedule.alpha(torch.tensor((step - 1) / T, dtype=torch.float64)).item()
        assert a_s == (1.0 if step == 1 else pytest.approx(previous, abs=1e-15))
    assert alpha_t[1, 1].item() == pytest.approx(1 - (1 - 1e-3) if isinstance(schedule, ns.LogLinear)
                                                 else 1 - math.cos(math.pi / 2 * 1e-3), abs=1e-15)
