"""Losses (SPEC §4) against independent computations.

- The continuous-time MDLM and DUO-base NELBOs, integrated exactly over z_t (enumeration) and
  numerically over t, are the limit of a discrete-time NELBO built here from the forward
  transition matrices (sum of KL(q(z_s | z_t, x) || p_theta(z_s | z_t)) + prior term), and bound
  the exact -log p_theta(x) of that discrete-time model, for tiny K and L and a fixed denoiser.
- duo_loss equals the paper's closed form (DUO Eq. 17 = the UDLM NELBO) written with full vectors.
- ar_nll equals torch's cross-entropy; softmax_stats' custom backward passes gradcheck.
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses


# ---------------------------------------------------------------------------------------------
# Reference implementations (float64 numpy), written from the papers' formulas, not from losses.py
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def paper_duo_loss(logits, x0, xt, alpha, dalpha):
    """DUO paper Eq. 17 (UDLM NELBO) per row, with full K-vectors. logits (N, K); x0, xt, alpha, dalpha (N,).

    With x̄θ = K alpha xθ + (1 - alpha) 1, i = z_t, m = x and zeta = (1 - alpha) / (K alpha + 1 - alpha):
    l = alpha' / (K alpha) [ K / x̄_i - K / x̄θ_i
          - (zeta 1[i=m] + 1[i!=m]) sum_j log(x̄θ_i / x̄θ_j)
          - K alpha / (1 - alpha) log(x̄θ_i / x̄θ_m) 1[i!=m]
          - ((K - 1) zeta 1[i=m] - 1[i!=m] / zeta) log zeta ].
    """
    K = logits.shape[-1]
    rows = np.arange(len(x0))
    xbar_theta = K * alpha[:, None] * _softmax(logits) + (1 - alpha[:, None])
    same = xt == x0
    xbar_i = (1 - alpha) + K * alpha * same
    zeta = (1 - alpha) / (K * alpha + 1 - alpha)
    log_i, log_m = np.log(xbar_theta[rows, xt]), np.log(xbar_theta[rows, x0])
    sum_log_ratio = K * log_i - np.log(xbar_theta).sum(-1)
    bracket = (K / xbar_i - K / xbar_theta[rows, xt]
               - np.where(same, zeta, 1.0) * sum_log_ratio
               - np.where(same, 0.0, K * alpha / (1 - alpha) * (log_i - log_m))
               - np.where(same, (K - 1) * zeta, -1 / zeta) * np.log(zeta))
    return dalpha / (K * alpha) * bracket


def _rows(logits, x0, xt, alpha, dalpha):
    """numpy rows -> torch (N, 1, ...) batch with per-sequence alpha (N, 1)."""
    as_t = lambda a: torch.as_tensor(a)[:, None]
    return as_t(logits), as_t(x0), as_t(xt), as_t(alpha), as_t(dalpha)


# ---------------------------------------------------------------------------------------------
# (b) DUO: implementation == paper closed form, >= 0, = 0 for a perfect denoiser
@pytest.mark.parametrize('K', [2, 3, 5, 17])
def test_duo_loss_equals_paper_closed_form(K):
    rng = np.random.default_rng(K)
    n = 400
    logits = rng.normal(size=(n, K)) * rng.uniform(0.1, 6, size=(n, 1))
    x0 = rng.integers(0, K, n)
    xt = np.where(np.arange(n) % 2 == 0, x0, rng.integers(0, K, n))  # half z_t = x, half random
    alpha = rng.uniform(0.001, 0.999, n)
    dalpha = -rng.uniform(0.1, 3, n)
    ref = paper_duo_loss(logits, x0, xt, alpha, dalpha)
    got = losses.duo_loss(*_rows(logits, x0, xt, alpha, dalpha))[:, 0].numpy()
    assert (xt != x0).sum() > n // 4 and (xt == x0).sum() > n // 2
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    assert (got >= -1e-12).all()


@pytest.mark.parametrize('K', [2, 4, 50])
def test_duo_loss_zero_for_perfect_denoiser(K):
    rng = np.random.default_rng(0)
    n = 50
    x0 = rng.integers(0, K, n)
    xt = np.where(np.arange(n) % 2 == 0, x0, rng.integers(0, K, n))
    alpha = rng.uniform(0.01, 0.99, n)
    dalpha = -np.ones(n)
    peaked = rng.normal(size=(n, K))
    peaked[np.arange(n), x0] += 80.0  # x_theta = x up to e^-80
    loss = losses.duo_loss(*_rows(peaked, x0, xt, alpha, dalpha))[:, 0].numpy()
    np.testing.assert_allclose(loss, 0.0, atol=1e-9)
    wrong = peaked.copy()
    wrong[np.arange(n), (x0 + 1) % K] += 100.0  # confidently wrong: strictly positive loss
    assert (losses.duo_loss(*_rows(wrong, x0, xt, alpha, dalpha))[:, 0].numpy() > 1e-3).all()


def test_duo_loss_float32_accuracy_at_gpt2_vocabulary():
    """K = 50258 in float32 (the training precision) stays within 1e-3 relative of the float64 paper form."""
    K, n = 50258, 24
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, K, generator=g, dtype=torch.float64) * 3
    x0 = torch.randint(0, K, (n,), generator=g)
    logits[torch.arange(n), x0] += 8  # a partly confident model
    xt = torch.where(torch.arange(n) % 2 == 0, x0, torch.randint(0, K, (n,), generator=g))
    alpha = torch.tensor([1e-3, 0.05, 0.3, 0.9, 0.99, 0.999], dtype=torch.float64).repeat(n // 6)
    dalpha = -torch.ones(n, dtype=torch.float64)
    ref = paper_duo_loss(logits.numpy(), x0.numpy(), xt.numpy(), alpha.numpy(), dalpha.numpy())
    got = losses.duo_loss(logits[:, None].float(), x0[:, None], xt[:, None], alpha[:, None].float(),
                          dalpha[:, None].float())[:, 0]
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# MDLM
def test_mdlm_loss_matches_masked_cross_entropy():
    K, mask_id = 9, 4  # mask id inside the vocabulary: it must be excluded, not just the last column
    g = torch.Generator().manual_seed(1)
    B, L = 3, 11
    logits = torch.randn(B, L, K, generator=g, dtype=torch.float64)
    logits[..., mask_id] = 50.0  # a huge mask logit must not change anything (SUBS: mask prob 0)
    real = torch.tensor([i for i in range(K) if i != mask_id])
    x0 = real[torch.randint(0, K - 1, (B, L), generator=g)]
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, torch.full_like(x0, mask_id), x0)
    alpha = torch.rand(B, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    dalpha = -torch.rand(B, 1, generator=g, dtype=torch.float64) - 0.1
    loss = losses.mdlm_loss(logits, x0, xt, alpha, dalpha, mask_id)
    ce = F.cross_entropy(logits[..., real].reshape(-1, K - 1), torch.searchsorted(real, x0).reshape(-1),
                         reduction='none').reshape(B, L)
    expected = torch.where(xt == mask_id, -dalpha / (1 - alpha) * ce, 0.0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert (loss[xt != mask_id] == 0).all() and (loss[xt == mask_id] > 0).all()
    # unmasked positions get no gradient at all
    logits.requires_grad_(True)
    losses.mdlm_loss(logits, x0, xt, alpha, dalpha, mask_id).sum().backward()
    assert (logits.grad[xt != mask_id] == 0).all()
    assert (logits.grad[..., mask_id] == 0).all()


# ---------------------------------------------------------------------------------------------
# (a) continuous NELBO == limit of an independent discrete-time NELBO >= exact -log p_theta(x)
class ToyDiffusion:
    """A complete tiny diffusion model: sequences of L tokens over K classes (+ [MASK] for MDLM).

    The denoiser is a fixed random table: logits(z_t, t) = W[z_t] + sin(3t) V[z_t] for each of the
    (K or K+1)^L sequences z_t. MDLM follows SUBS: the [MASK] class gets probability 0 (its table
    logit is large on purpose) and unmasked positions copy their input. The schedule is
    alpha_t = 1 - (1 - eps) sin(pi t / 2).
    """

    def __init__(self, kind: str, K: int, L: int, x: tuple, eps: float, seed: int = 0):
        self.kind, self.K, self.L, self.eps = kind, K, L, eps
        self.n_cls = K + 1 if kind == 'mdlm' else K
        self.mask = K  # MDLM's extra class
        self.x = np.array(x)
        self.states = np.array(list(itertools.product(range(self.n_cls), repeat=L)))  # (S, L)
        rng = np.random.default_rng(seed)
        self.W = rng.normal(size=(len(self.states), L, self.n_cls)) * 1.5
        self.V = rng.normal(size=self.W.shape)
        if kind == 'mdlm':
            self.W[..., self.mask] += 4.0

    def alpha(self, t):
        return 1 - (1 - self.eps) * np.sin(np.pi * t / 2)

    def dalpha(self, t):
        return -(1 - self.eps) * np.pi / 2 * np.cos(np.pi * t / 2)

    def logits(self, t):
        """(T,) -> (T, S, L, n_cls) network logits at every time and every noisy sequence."""
        return self.W[None] + np.sin(3 * t)[:, None, None, None] * self.V[None]

    def x_theta(self, t):
        """(T,) -> (T, S, L, n_cls) predicted distributions of x given z_t."""
        logits = self.logits(t)
        if self.kind == 'duo':
            return _softmax(logits)
        logits[..., self.mask] = -np.inf
        copy = np.eye(self.n_cls)[self.states][None]
        return np.where((self.states != self.mask)[None, :, :, None], copy, _softmax(logits))

    def q_bar(self, a):
        """Forward transition matrix Q[from, to] with signal level a (any shape) -> (..., n, n)."""
        a = np.asarray(a, dtype=float)[..., None, None]
        if self.kind == 'duo':
            return a * np.eye(self.n_cls) + (1 - a) / self.K  # keep w.p. a, else uniform over the K classes
        to_mask = np.zeros((self.n_cls, self.n_cls))
        to_mask[:, self.mask] = 1
        return a * np.eye(self.n_cls) + (1 - a) * to_mask  # keep w.p. a, else [MASK] (absorbing)

    def marginal(self, a):
        """q(z_t | x) of every sequence z_t, (S,), for signal level a (a scalar)."""
        per_position = self.q_bar(a)[self.x]  # (L, n)
        return np.prod(per_position[np.arange(self.L), self.states], axis=1)

    def posterior(self, v, zt, a_s, a_t):
        """q(z_s | z_t, x = v) for class-probability vectors v (..., n) and ids zt (...): Bayes' rule.

        q(z_s = j | z_t = i, v) = Q_{t|s}[j, i] (v Q̄_s)_j / (v Q̄_t)_i, with Q_{t|s} = Q̄(a_t / a_s).
        v one-hot gives the true posterior; v = x_theta gives the model's reverse step.
        """
        q_ts = self.q_bar(a_t / a_s)
        num = q_ts[:, zt].T * (v @ self.q_bar(a_s))
        den = np.take_along_axis(v @ self.q_bar(a_t), zt[..., None], -1)
        with np.errstate(invalid='ignore', divide='ignore'):
            return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)

    def prior(self):
        if self.kind == 'duo':
            return np.full(len(self.states), 1 / len(self.states))
        return (self.states == self.mask).all(1).astype(float)

    def discrete(self, n_steps: int):
        """(discrete NELBO, exact -log p_theta(x)) per sequence, for the chain on t_k = k / n_steps."""
        grid = np.linspace(0, 1, n_steps + 1)
        a = self.alpha(grid)
        x_theta = self.x_theta(grid[1:])  # reverse step k uses x_theta(z_{t_k}, t_k)
        one_hot = np.eye(self.n_cls)[self.x]
        q1 = self.marginal(a[-1])
        prior = self.prior()
        with np.errstate(divide='ignore', invalid='ignore'):
            nelbo = np.sum(np.where(q1 > 0, q1 * (np.log(q1) - np.log(prior)), 0.0))
        message = prior  # p(z_{t_k}) of the model, pushed down the chain
        for k in range(n_steps, 0, -1):
            q_t = self.marginal(a[k])
            step = np.ones((len(self.states),) * 2)  # p_theta(z_s = column | z_t = row)
            for pos in range(self.L):
                zt = self.states[:, pos]
                p = self.posterior(x_theta[k - 1][:, pos], zt, a[k - 1], a[k])
                q = self.posterior(np.broadcast_to(one_hot[pos], p.shape), zt, a[k - 1], a[k])
                with np.errstate(divide='ignore', invalid='ignore'):
                    kl = np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0).sum(-1)
                nelbo += np.sum(np.where(q_t > 0, q_t * kl, 0.0))
                step *= p[:, self.states[:, pos]]
            message = message @ step
        x_index = np.flatnonzero((self.states == self.x).all(1))[0]
        return nelbo, -math.log(message[x_index])

    def continuous(self, nodes_per_panel: int = 30):
        """Prior term + int_0^1 E_{z_t} sum_l loss_l dt with the project's per-token loss.

        z_t is enumerated exactly; t by composite Gauss-Legendre on panels graded towards t = 0,
        where the uniform-state integrand has an integrable log singularity.
        """
        edges = np.concatenate([[0.0], np.logspace(-10, -1, 10), np.linspace(0.2, 1, 9)])
        nodes, weights = np.polynomial.legendre.leggauss(nodes_per_panel)
        t = np.concatenate([(hi - lo) / 2 * nodes + (hi + lo) / 2 for lo, hi in zip(edges[:-1], edges[1:])])
        w_t = np.concatenate([(hi - lo) / 2 * weights for lo, hi in zip(edges[:-1], edges[1:])])
        S = len(self.states)
        logits = torch.tensor(self.logits(t)).reshape(-1, self.L, self.n_cls)
        xt = torch.tensor(np.tile(self.states, (len(t), 1)))
        x0 = torch.tensor(np.tile(self.x, (len(xt), 1)))
        alpha = torch.tensor(np.repeat(self.alpha(t), S))[:, None]
        dalpha = torch.tensor(np.repeat(self.dalpha(t), S))[:, None]
        if self.kind == 'duo':
            loss = losses.duo_loss(logits, x0, xt, alpha, dalpha)
        else:
            loss = losses.mdlm_loss(logits, x0, xt, alpha, dalpha, self.mask)
        per_t = loss.numpy().reshape(len(t), S, self.L).sum(-1)
        q_t = np.stack([self.marginal(a) for a in self.alpha(t)])
        q1 = self.marginal(self.alpha(1.0))
        with np.errstate(divide='ignore', invalid='ignore'):
            prior_kl = np.sum(np.where(q1 > 0, q1 * (np.log(q1) - np.log(self.prior())), 0.0))
        return prior_kl + np.sum(w_t * (q_t * per_t).sum(1))


@pytest.mark.parametrize('kind,K,x,eps', [('duo', 4, (0, 3), 0.02), ('mdlm', 3, (2, 0), 0.0)])
def test_continuous_nelbo_is_limit_of_discrete_nelbo_and_bounds_likelihood(kind, K, x, eps):
    L = len(x)
    toy = ToyDiffusion(kind, K, L, x, eps)
    continuous = toy.continuous() / L  # per token (SPEC §4)
    assert abs(continuous - toy.continuous(nodes_per_panel=45) / L) < 1e-9  # quadrature converged
    steps = [200, 400, 800, 1600]
    results = [toy.discrete(n) for n in steps]
    discrete = np.array([r[0] for r in results]) / L
    exact_nll = np.array([r[1] for r in results]) / L
    errors = discrete - continuous
    # first-order convergence in the step size: the error halves with each doubling ...
    np.testing.assert_allclose(errors[:-1] / errors[1:], 2.0, rtol=0.05)
    assert abs(errors[-1]) < 2e-3
    # ... so the Richardson extrapolation of the discrete NELBO lands on the continuous one
    assert abs(2 * discrete[-1] - discrete[-2] - continuous) < 2e-5 * continuous
    # both are upper bounds on the exact negative log-likelihood of the discrete-time model
    assert (discrete > exact_nll).all() and (continuous > exact_nll).all()
    assert continuous - exact_nll[-1] > 10 * abs(errors[-1])  # the bound holds with room to spare


# ---------------------------------------------------------------------------------------------
# (c) AR
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_ar_nll_equals_cross_entropy(dtype):
    B, L, K, excluded = 3, 9, 13, 12
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(B, L, K, generator=g, dtype=torch.float64) * 2).to(dtype)
    x0 = torch.randint(0, K - 1, (B, L), generator=g)
    nll = losses.ar_nll(logits, x0, excluded_id=excluded)
    ref_logits = logits[:, :-1].double().clone()
    ref_logits[..., excluded] = float('-inf')
    ref = F.cross_entropy(ref_logits.reshape(-1, K), x0[:, 1:].reshape(-1), reduction='none').reshape(B, L - 1)
    assert nll.shape == (B, L - 1)
    assert nll.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)
    # without an excluded id it is the plain cross-entropy
    plain = F.cross_entropy(logits[:, :-1].double().reshape(-1, K), x0[:, 1:].reshape(-1), reduction='none')
    torch.testing.assert_close(losses.ar_nll(logits, x0).double().reshape(-1), plain, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# softmax_stats: values and the custom backward
def test_softmax_stats_values():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    a = torch.rand(2, 5, generator=g, dtype=torch.float64) * 7
    b = torch.rand(2, 5, generator=g, dtype=torch.float64)
    log_z, S = losses.softmax_stats(logits, a, b, excluded_id=2)
    kept = logits.clone()
    kept[..., 2] = float('-inf')
    p = kept.softmax(-1)
    torch.testing.assert_close(log_z, torch.logsumexp(kept, -1))
    torch.testing.assert_close(S, torch.log(a[..., None] * p + b[..., None]).sum(-1))
    log_z2, none = losses.softmax_stats(logits)
    assert none is None
    torch.testing.assert_close(log_z2, torch.logsumexp(logits, -1))


@pytest.mark.parametrize('excluded_id', [None, 0, 4])
@pytest.mark.parametrize('chunk_rows', [1, 3, 1024])
def test_softmax_stats_gradcheck(monkeypatch, excluded_id, chunk_rows):
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)  # 7 rows: several chunks, a ragged last one
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64).reshape(1, 7, 5).requires_grad_(True)
    a = torch.rand(1, 7, generator=g, dtype=torch.float64) * 5
    b = torch.rand(1, 7, generator=g, dtype=torch.float64) + 0.05

    def both(lg):
        log_z, S = losses.softmax_stats(lg, a, b, excluded_id=excluded_id)
        return log_z, S

    assert torch.autograd.gradcheck(both, (logits,))
    assert torch.autograd.gradcheck(lambda lg: losses.softmax_stats(lg, excluded_id=excluded_id)[0], (logits,))
    # only S used (log Z's incoming gradient is zero) and a non-contiguous input
    wide = torch.randn(1, 7, 10, generator=g, dtype=torch.float64)[..., ::2].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lg: losses.softmax_stats(lg, a, b, excluded_id=excluded_id)[1], (wide,))


@pytest.mark.parametrize('chunk_rows', [2, 1024])
def test_loss_gradients_gradcheck(monkeypatch, chunk_rows):
    """End-to-end gradients of every loss through the fused statistics, in float64."""
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    g = torch.Generator().manual_seed(5)
    B, L, K = 2, 3, 6
    logits = torch.randn(B, L, K, generator=g, dtype=torch.float64).requires_grad_(True)
    x0 = torch.randint(0, K - 1, (B, L), generator=g)
    xt = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
    alpha = torch.tensor([[0.3], [0.8]], dtype=torch.float64)
    dalpha = torch.tensor([[-1.0], [-0.5]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda lg: losses.duo_loss(lg, x0, xt, alpha, dalpha), (logits,))
    masked = torch.where(xt == x0, x0, K - 1)
    assert torch.autograd.gradcheck(lambda lg: losses.mdlm_loss(lg, x0, masked, alpha, dalpha, K - 1), (logits,))
    assert torch.autograd.gradcheck(lambda lg: losses.ar_nll(lg, x0, excluded_id=K - 1), (logits,))


# ---------------------------------------------------------------------------------------------
# Precision: fp32 results whatever the logits' dtype; inputs never modified
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_losses_are_float32_for_low_precision_logits(dtype):
    B, L, K, mask_id = 2, 5, 11, 10
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(B, L, K, generator=g) * 3).to(dtype).requires_grad_(True)
    exact = logits.detach().double()  # the same (rounded) values, in float64
    x0 = torch.randint(0, K - 1, (B, L), generator=g)
    xt_u = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
    xt_m = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, mask_id)
    alpha = torch.tensor([[0.2], [0.7]])
    dalpha = torch.tensor([[-1.0], [-2.0]])
    cases = [
        (lambda lg, a, d: losses.duo_loss(lg, x0, xt_u, a, d), 1e-4),
        (lambda lg, a, d: losses.mdlm_loss(lg, x0, xt_m, a, d, mask_id), 1e-5),
        (lambda lg, a, d: losses.ar_nll(lg, x0, excluded_id=mask_id), 1e-5),
    ]
    for fn, tol in cases:
        out = fn(logits, alpha, dalpha)
        assert out.dtype == torch.float32
        ref = fn(exact, alpha.double(), dalpha.double())
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        grad, = torch.autograd.grad(out.sum(), logits)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
    kl = losses.distillation_kl(logits, logits.detach().flip(0))
    assert kl.dtype == torch.float32


def test_losses_do_not_modify_logits():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 6, generator=g)
    before = logits.clone()
    x0 = torch.randint(0, 5, (2, 4), generator=g)
    alpha, dalpha = torch.full((2, 1), 0.5), torch.full((2, 1), -1.0)
    losses.ar_nll(logits, x0, excluded_id=5)
    losses.mdlm_loss(logits, x0, torch.full_like(x0, 5), alpha, dalpha, 5)
    losses.duo_loss(logits, x0, x0, alpha, dalpha)
    losses.softmax_stats(logits, excluded_id=0)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------
# Distillation KL
def test_distillation_kl_against_hand_computation():
    p_student = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    p_teacher = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    student = (p_student.log() + 3.0).reshape(1, 1, 3)
    teacher = (p_teacher.log() - 1.0).reshape(1, 1, 3)
    # logits are defined up to a constant per row: shifted ones check the normalisation.
    # KL(s || t) = 0.5 log 2 + 0.25 log 1 + 0.25 log(1/2) = 0.25 log 2
    torch.testing.assert_close(losses.distillation_kl(student, teacher, 'kl-bwd'),
                               torch.full((1, 1), 0.25 * math.log(2), dtype=torch.float64))
    p_teacher = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)
    teacher = p_teacher.log().reshape(1, 1, 3)
    bwd = 0.5 * math.log(0.5 / 0.9) + 2 * 0.25 * math.log(0.25 / 0.05)
    fwd = 0.9 * math.log(0.9 / 0.5) + 2 * 0.05 * math.log(0.05 / 0.25)
    assert abs(bwd - fwd) > 0.05
    torch.testing.assert_close(losses.distillation_kl(student, teacher, 'kl-bwd').item(), bwd)
    torch.testing.assert_close(losses.distillation_kl(student, teacher, 'kl-fwd').item(), fwd)


@pytest.mark.parametrize('chunk_rows', [1, 5, 1024])
def test_distillation_kl_zero_iff_equal_and_gradients(monkeypatch, chunk_rows):
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)  # 12 rows: several chunks, a ragged last one
    g = torch.Generator().manual_seed(8)
    student = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    small = torch.randn(1, 7, 5, generator=g, dtype=torch.float64)
    for loss_type in ('kl-bwd', 'kl-fwd'):
        same = losses.distillation_kl(student, student + 2.5, loss_type)  # same distribution
        torch.testing.assert_close(same, torch.zeros(3, 4, dtype=torch.float64), atol=1e-12, rtol=0)
        teacher = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
        other = losses.distillation_kl(student, teacher, loss_type)
        assert other.shape == (3, 4) and (other > 0).all()
        log_p, log_q = student.log_softmax(-1), teacher.log_softmax(-1)
        explicit = ((log_p.exp() * (log_p - log_q)) if loss_type == 'kl-bwd' else (log_q.exp() * (log_q - log_p))).sum(-1)
        torch.testing.assert_close(other, explicit)
        s = small.clone().requires_grad_(True)
        t = torch.randn(1, 7, 5, generator=g, dtype=torch.float64).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: losses.distillation_kl(a, b, loss_type), (s, t))
        # the usual case: teacher without gradient
        grad, = torch.autograd.grad(losses.distillation_kl(s, t.detach(), loss_type).sum(), s)
        assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match='loss_type'):
        losses.distillation_kl(student, student, 'kl')


def test_no_logit_sized_intermediate_is_saved_for_backward():
    """Backward keeps only the logits themselves (B, L, K), never a float32 copy or a softmax."""
    B, L, K = 2, 8, 1000
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(B, L, K, generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(B, L, K, generator=g).bfloat16()
    x0 = torch.randint(0, K - 1, (B, L), generator=g)
    xt = torch.randint(0, K - 1, (B, L), generator=g)
    alpha, dalpha = torch.full((B, 1), 0.3), torch.full((B, 1), -1.0)
    inputs = {logits.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    for fn in (lambda: losses.duo_loss(logits, x0, xt, alpha, dalpha),
               lambda: losses.mdlm_loss(logits, x0, torch.full_like(x0, K - 1), alpha, dalpha, K - 1),
               lambda: losses.ar_nll(logits, x0, excluded_id=K - 1),
               lambda: losses.distillation_kl(logits, teacher)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        large = [t for t in saved if t.numel() >= B * (L - 1) * K]
        assert large and all(t.untyped_storage().data_ptr() in inputs for t in large)


# ---------------------------------------------------------------------------------------------
# Performance paths: blocks of any size, statistics of selected rows only, gradient in place
def _reference_losses(logits, x0, xt_u, xt_m, alpha, dalpha, mask_id):
    """The three losses written the plain way (full log-softmax), for comparison with the kernels."""
    K = logits.shape[-1]
    masked_logits = logits.masked_fill(torch.arange(K) == mask_id, float('-inf'))
    log_p_m = masked_logits.log_softmax(-1)
    ar = -log_p_m[:, :-1].gather(-1, x0[:, 1:, None])[..., 0]
    mdlm = torch.where(xt_m == mask_id, dalpha / (1 - alpha) * log_p_m.gather(-1, x0[..., None])[..., 0], 0.0)
    a, b = K * alpha, 1 - alpha
    xbt = a[..., None] * logits.softmax(-1) + b[..., None]
    xbt_i, xbt_m = xbt.gather(-1, xt_u[..., None])[..., 0], xbt.gather(-1, x0[..., None])[..., 0]
    xbar_i = b + a * (xt_u == x0)
    sum_xbar_log_xbar = (K - 1) * torch.xlogy(b, b) + torch.xlogy(a + b, a + b)
    sum_term = (K * (xbt_i.log() - xbar_i.log()) + sum_xbar_log_xbar - b * xbt.log().sum(-1) - a * xbt_m.log()) / xbar_i
    duo = dalpha / (K * alpha) * (K / xbar_i - K / xbt_i - sum_term)
    return ar, mdlm, duo


def _loss_inputs(B=3, L=10, K=53, seed=10):
    g = torch.Generator().manual_seed(seed)
    mask_id = K - 1
    x0 = torch.randint(0, K - 1, (B, L), generator=g)
    xt_u = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
    xt_m = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, mask_id)
    alpha = torch.rand(B, 1, generator=g, dtype=torch.float64) * 0.8 + 0.1
    dalpha = -torch.rand(B, 1, generator=g, dtype=torch.float64) - 0.5
    hidden = torch.randn(B, L, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(8, K, generator=g, dtype=torch.float64)
    return x0, xt_u, xt_m, alpha, dalpha, mask_id, hidden, weight


def _kernel_losses(logits, x0, xt_u, xt_m, alpha, dalpha, mask_id, reuse=False):
    return (losses.ar_nll(logits, x0, excluded_id=mask_id, reuse_logits=reuse),
            losses.mdlm_loss(logits, x0, xt_m, alpha, dalpha, mask_id, reuse_logits=reuse),
            losses.duo_loss(logits, x0, xt_u, alpha, dalpha, reuse_logits=reuse))


@pytest.mark.parametrize('chunk_rows', [None, 1, 4, 7, 1000])
def test_kernels_match_plain_losses_for_any_block_size(monkeypatch, chunk_rows):
    """Values and gradients of the blocked kernels (MDLM: masked rows only) equal the plain formulas."""
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    x0, xt_u, xt_m, alpha, dalpha, mask_id, hidden, weight = _loss_inputs()
    for i in range(3):
        logits = (hidden @ weight).requires_grad_(True)
        got = _kernel_losses(logits, x0, xt_u, xt_m, alpha, dalpha, mask_id)[i]
        grad, = torch.autograd.grad(got.sum(), logits)
        plain = logits.detach().clone().requires_grad_(True)
        ref = _reference_losses(plain, x0, xt_u, xt_m, alpha, dalpha, mask_id)[i]
        ref_grad, = torch.autograd.grad(ref.sum(), plain)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


def test_block_rows_default_by_device(monkeypatch):
    monkeypatch.setattr(losses, 'CHUNK_ROWS', None)
    assert losses.block_rows(50258, torch.device('cpu')) == losses.CPU_BLOCK_ELEMENTS // 50258
    assert losses.block_rows(50258, torch.device('meta')) == losses.GPU_BLOCK_ELEMENTS // 50258
    assert losses.block_rows(10 ** 9, torch.device('cpu')) == 1
    monkeypatch.setattr(losses, 'CHUNK_ROWS', 5)
    assert losses.block_rows(50258, torch.device('cpu')) == 5


@pytest.mark.parametrize('chunk_rows', [None, 3])
def test_reuse_logits_gives_the_same_gradients_in_the_logits_memory(monkeypatch, chunk_rows):
    """reuse_logits=True: the backward leaves the gradient in the logits' memory; gradients unchanged."""
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    x0, xt_u, xt_m, alpha, dalpha, mask_id, hidden, weight = _loss_inputs()
    student_teacher = torch.randn(hidden.shape[:-1] + (weight.shape[1],), dtype=torch.float64)
    kernels = [lambda lg, r, i=i: _kernel_losses(lg, x0, xt_u, xt_m, alpha, dalpha, mask_id, reuse=r)[i]
               for i in range(3)]
    kernels += [lambda lg, r, t=t: losses.distillation_kl(lg, student_teacher, t, reuse_logits=r)
                for t in ('kl-bwd', 'kl-fwd')]
    for fn in kernels:
        grads = []
        for reuse in (False, True):
            w = weight.clone().requires_grad_(True)
            logits = hidden @ w  # computed in the graph, like the network's output
            if not reuse:
                logits.retain_grad()
            fn(logits, reuse).sum().backward()
            if reuse:
                torch.testing.assert_close(logits.detach(), expected_logit_grad, rtol=0, atol=0)
            else:
                expected_logit_grad = logits.grad.clone()
            grads.append(w.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_reuse_logits_leaves_leaf_tensors_and_plain_calls_alone():
    x0, xt_u, xt_m, alpha, dalpha, mask_id, hidden, weight = _loss_inputs()
    leaf = (hidden @ weight).requires_grad_(True)
    before = leaf.detach().clone()
    for loss in _kernel_losses(leaf, x0, xt_u, xt_m, alpha, dalpha, mask_id, reuse=True):
        loss.sum().backward()
    assert torch.equal(leaf.detach(), before)
    w = weight.clone().requires_grad_(True)
    logits = hidden @ w
    _kernel_losses(logits, x0, xt_u, xt_m, alpha, dalpha, mask_id)[2].sum().backward()  # default: no reuse
    assert torch.equal(logits.detach(), before)


def test_reuse_logits_misuse_is_an_error_not_a_wrong_gradient():
    """Another node that saved the logits sees them overwritten: autograd raises instead of using them."""
    x0, xt_u, xt_m, alpha, dalpha, mask_id, hidden, weight = _loss_inputs()
    logits = hidden @ weight.clone().requires_grad_(True)
    other = (logits ** 2).sum()  # saves the logits for its backward; runs after the loss's node
    loss = losses.duo_loss(logits, x0, xt_u, alpha, dalpha, reuse_logits=True).sum()
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        (loss + other).backward()


def test_mdlm_loss_on_the_masked_rows_only_equals_the_full_logits():
    x0, xt_u, xt_m, alpha, dalpha, mask_id, hidden, weight = _loss_inputs()
    masked = xt_m == mask_id
    results = []
    for compact in (False, True):
        w = weight.clone().requires_grad_(True)
        logits = (hidden[masked] if compact else hidden) @ w
        loss = losses.mdlm_loss(logits, x0, xt_m, alpha, dalpha, mask_id, reuse_logits=compact)
        loss.sum().backward()
        results.append((loss.detach(), w.grad))
    assert results[1][0].shape == x0.shape and torch.equal(results[1][0] == 0, ~masked)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='masked positions'):
        losses.mdlm_loss(hidden[masked][1:] @ weight, x0, xt_m, alpha, dalpha, mask_id)
