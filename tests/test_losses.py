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
import noise_schedule


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
        (lambda lg, a, d: losses.sedd_loss(lg, x0, xt_m, a, d, mask_id), 1e-5),
        (lambda lg, a, d: losses.d3pm_loss(lg, x0, xt_m, a, a + 0.1, 10, mask_id), 1e-5),
        (lambda lg, a, d: losses.d3pm_reconstruction_loss(lg, x0), 1e-5),
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
    losses.sedd_loss(logits, x0, torch.full_like(x0, 5), alpha, dalpha, 5)
    losses.d3pm_loss(logits, x0, torch.full_like(x0, 5), alpha, alpha + 0.1, 10, 5)
    losses.d3pm_reconstruction_loss(logits, x0)
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
               lambda: losses.sedd_loss(logits, x0, torch.full_like(x0, K - 1), alpha, dalpha, K - 1),
               lambda: losses.d3pm_loss(logits, x0, torch.full_like(x0, K - 1), alpha, alpha + 0.1, 10, K - 1),
               lambda: losses.d3pm_reconstruction_loss(logits, x0),
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


# ---------------------------------------------------------------------------------------------
# SEDD (SPEC-2 §11)
def upstream_score_entropy(logits, x0, xt, alpha, dalpha, mask_id):
    """SEDD's score entropy with the scores written out, float64 torch (autograd-able), (B, L).

    log s_j = l_j - log(e^sigma - 1) - log(K - 1) for j != z_t (the input's own entry is unused),
    r = 1 / (e^sigma - 1), sigma' = -alpha'/alpha; at a masked position
    l = sigma' [sum_{j != mask} s_j - r log s_m + r (log r - 1)], 0 elsewhere.
    """
    K = logits.shape[-1]
    sigma = -torch.log(alpha)
    dsigma = -dalpha / alpha
    log_score = logits - torch.log(torch.expm1(sigma))[..., None] - math.log(K - 1)
    others = torch.arange(K) != mask_id
    pos = log_score[..., others].exp().sum(-1)
    r = 1 / torch.expm1(sigma)
    neg = r * log_score.gather(-1, x0[..., None])[..., 0]
    const = r * (torch.log(r) - 1)
    return torch.where(xt == mask_id, dsigma * (pos - neg + const), torch.zeros_like(pos))


def _absorbing_inputs(B, L, K, mask_id, seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.tensor([j for j in range(K) if j != mask_id])
    x0 = real[torch.randint(0, K - 1, (B, L), generator=g)]
    xt = torch.where(torch.rand(B, L, generator=g) < 0.6, torch.full_like(x0, mask_id), x0)
    alpha = torch.rand(B, 1, generator=g, dtype=torch.float64) * 0.98 + 0.01
    dalpha = -torch.rand(B, 1, generator=g, dtype=torch.float64) * 2 - 0.1
    return g, x0, xt, alpha, dalpha


@pytest.mark.parametrize('K,mask_id', [(2, 1), (7, 3), (50, 49)])
def test_sedd_loss_equals_upstream_score_entropy(K, mask_id):
    """SPEC-2 §11 check (1): the closed form = upstream's pos - neg + const, float64, rtol 1e-12."""
    B, L = 40, 6
    g, x0, xt, alpha, dalpha = _absorbing_inputs(B, L, K, mask_id, seed=K)
    # logit scales from flat to peaked, and offsets that put S far from 1 both ways
    logits = (torch.randn(B, L, K, generator=g, dtype=torch.float64) * torch.rand(B, 1, 1, generator=g) * 6
              + torch.randn(B, L, 1, generator=g, dtype=torch.float64) * 2)
    logits[..., mask_id] += 30.0  # the mask's logit is never used
    got = losses.sedd_loss(logits, x0, xt, alpha, dalpha, mask_id)
    ref = upstream_score_entropy(logits, x0, xt, alpha, dalpha, mask_id)
    assert got.dtype == torch.float64 and (xt == mask_id).sum() > B * L // 3
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert (got[xt != mask_id] == 0).all() and (got[xt == mask_id] > 0).all()


def test_sedd_loss_with_normalised_scores_is_mdlm_plus_the_normalisation_penalty():
    """SPEC-2 §11 check (2): l_j = log((K-1) p_j) (S = 1) gives mdlm_loss exactly; scaling u by lambda
    adds (-alpha'/(1-alpha)) (lambda - 1 - log lambda)."""
    B, L, K, mask_id = 6, 8, 9, 2
    g, x0, xt, alpha, dalpha = _absorbing_inputs(B, L, K, mask_id, seed=0)
    p = torch.rand(B, L, K, generator=g, dtype=torch.float64) ** 3
    p[..., mask_id] = 0
    p /= p.sum(-1, keepdim=True)
    logits = torch.log((K - 1) * p)  # the mask logit is -inf: unused
    sedd = losses.sedd_loss(logits, x0, xt, alpha, dalpha, mask_id)
    torch.testing.assert_close(sedd, losses.mdlm_loss(logits, x0, xt, alpha, dalpha, mask_id), rtol=1e-12, atol=1e-13)
    masked = xt == mask_id
    for lam in (0.05, 0.7, 1.3, 20.0):
        penalty = -dalpha / (1 - alpha) * (lam - 1 - math.log(lam))
        scaled = losses.sedd_loss(logits + math.log(lam), x0, xt, alpha, dalpha, mask_id)
        torch.testing.assert_close(scaled - sedd, torch.where(masked, penalty, 0.0), rtol=1e-11, atol=1e-12)


def test_sedd_loss_monte_carlo_expectation_over_time():
    """SPEC-2 §11 check (3): L = 1, S = 1, a time-independent u, log-linear alpha:
    E_t E_z l = (1 - eps)(-log u_m) (t stratified as in training, sampling_eps = 1e-3)."""
    K, mask_id, m, eps, n = 6, 4, 1, 1e-3, 400_000
    u = torch.tensor([0.1, 0.25, 0.05, 0.4, 0.0, 0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    schedule = noise_schedule.LogLinear(eps)
    t = noise_schedule.stratified_times(n, 1e-3, generator=g).double()
    alpha, dalpha = schedule.alpha(t)[:, None], schedule.dalpha(t)[:, None]
    xt = torch.where(torch.rand(n, 1, generator=g, dtype=torch.float64) < alpha, m, mask_id)
    logits = torch.log((K - 1) * u).expand(n, 1, K)
    loss = losses.sedd_loss(logits, torch.full((n, 1), m), xt, alpha, dalpha, mask_id)[:, 0]
    expected = (1 - eps) * -math.log(u[m])
    z = (loss.mean().item() - expected) / (loss.std().item() / math.sqrt(n))
    assert abs(z) < 4, (loss.mean().item(), expected)


def test_sedd_loss_on_the_masked_rows_only_equals_the_full_logits():
    x0, _, xt_m, alpha, dalpha, mask_id, hidden, weight = _loss_inputs()
    masked = xt_m == mask_id
    results = []
    for compact in (False, True):
        w = weight.clone().requires_grad_(True)
        logits = (hidden[masked] if compact else hidden) @ w
        loss = losses.sedd_loss(logits, x0, xt_m, alpha, dalpha, mask_id, reuse_logits=compact)
        loss.sum().backward()
        results.append((loss.detach(), w.grad))
    assert torch.equal(results[1][0] == 0, ~masked)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='masked positions'):
        losses.sedd_loss(hidden[masked][1:] @ weight, x0, xt_m, alpha, dalpha, mask_id)


# ---------------------------------------------------------------------------------------------
# D3PM absorbing, discrete time (SPEC-2 §12). Dense references: K x K transition matrices.
def absorbing_matrix(alpha, K, mask_id):
    """Q[from, to] of the absorbing forward process at signal level alpha (float), (K, K) float64."""
    Q = alpha * torch.eye(K, dtype=torch.float64)
    Q[:, mask_id] += 1 - alpha
    return Q


def dense_reverse(v, zt, alpha_t, alpha_s, K, mask_id):
    """q(z_s | z_t, v) ∝ q(z_t | z_s) sum_y q(z_s | y) v_y, (K,) for a distribution v (K,) over x.

    v one-hot: the true posterior; v = x̂: D3PM's p_theta(z_s | z_t)."""
    q_ts = absorbing_matrix(alpha_t / alpha_s, K, mask_id)[:, zt]  # q(z_t | z_s = j) over j
    joint = q_ts * (v @ absorbing_matrix(alpha_s, K, mask_id))
    return joint / joint.sum()


def dense_kl(q, p):
    keep = q > 0
    return (q[keep] * (q[keep].log() - p[keep].log())).sum()


def dense_d3pm_nelbo(table, clean_logits, m, schedule, T, mask_id):
    """sum_i E_{z_t ~ q(.|x)} KL(q(z_s | z_t, x) || p_theta(z_s | z_t)) + L_rec, L = 1, by enumeration.

    table (T, K, K): the denoiser's logits at step i (index i - 1) and input z_t; clean_logits (K,)."""
    K = table.shape[-1]
    x = F.one_hot(torch.tensor(m), K).double()
    total = -clean_logits.log_softmax(-1)[m]
    for i in range(1, T + 1):
        a_t = schedule.alpha(torch.tensor(i / T, dtype=torch.float64)).item()
        a_s = 1.0 if i == 1 else schedule.alpha(torch.tensor((i - 1) / T, dtype=torch.float64)).item()
        marginal = x @ absorbing_matrix(a_t, K, mask_id)
        for zt in range(K):
            if marginal[zt] > 0:
                q = dense_reverse(x, zt, a_t, a_s, K, mask_id)
                p = dense_reverse(table[i - 1, zt].softmax(-1), zt, a_t, a_s, K, mask_id)
                total = total + marginal[zt] * dense_kl(q, p)
    return total


@pytest.mark.parametrize('schedule', [noise_schedule.LogLinear(1e-3), noise_schedule.Cosine(1e-3)])
def test_d3pm_estimator_expectation_equals_the_dense_discrete_nelbo(schedule):
    """SPEC-2 §12 check (2): E over i ~ U{1..T} and z_t ~ q of L_rec + T KL_i (d3pm_loss, with
    noise_schedule.discrete_alphas) = the dense discrete-time NELBO, enumerated exactly, K = 5, L = 1."""
    K, mask_id, T = 5, 1, 6
    g = torch.Generator().manual_seed(3)
    table = torch.randn(T, K, K, generator=g, dtype=torch.float64) * 1.5  # x̂_mask > 0 throughout
    clean_logits = torch.randn(K, generator=g, dtype=torch.float64)
    i = torch.arange(1, T + 1).repeat_interleave(2)  # rows: (i, z_t = m) and (i, z_t = mask)
    alpha_t, alpha_s = noise_schedule.discrete_alphas(schedule, i, T)
    for m in (0, 3):
        xt = torch.tensor([m, mask_id]).repeat(T)[:, None]
        logits = table[i - 1, xt[:, 0]][:, None]
        kl = losses.d3pm_loss(logits, torch.full_like(xt, m), xt, alpha_t[:, None], alpha_s[:, None], T, mask_id)
        q_zt = torch.where(xt[:, 0] == mask_id, 1 - alpha_t, alpha_t)
        l_rec = losses.d3pm_reconstruction_loss(clean_logits[None, None], torch.tensor([[m]]))[0, 0]
        estimate = l_rec + (q_zt * kl[:, 0]).sum() / T  # E_i = (1/T) sum_i
        dense = dense_d3pm_nelbo(table, clean_logits, m, schedule, T, mask_id)
        torch.testing.assert_close(estimate, dense, rtol=1e-12, atol=1e-12)
        assert (kl[xt[:, 0] != mask_id] == 0).all()


def test_d3pm_loss_is_zero_for_a_perfect_denoiser():
    """SPEC-2 §12 check (1): x̂ = e_m gives KL_i = 0 at every i (i = 1 included) and L_rec = 0."""
    K, mask_id, T = 6, 2, 50
    g, x0, xt, _, _ = _absorbing_inputs(4, 7, K, mask_id, seed=1)
    logits = torch.full((4, 7, K), float('-inf'), dtype=torch.float64).scatter(-1, x0[..., None], 3.0)
    assert (losses.d3pm_reconstruction_loss(logits, x0) == 0).all()
    for i in (1, 2, 25, T):
        alpha_t, alpha_s = noise_schedule.discrete_alphas(noise_schedule.LogLinear(), torch.full((4, 1), i), T)
        assert (losses.d3pm_loss(logits, x0, xt, alpha_t, alpha_s, T, mask_id) == 0).all()
    # and positive for an imperfect one (x̂_mask > 0, both terms present)
    alpha_t, alpha_s = noise_schedule.discrete_alphas(noise_schedule.LogLinear(), torch.full((4, 1), 9), T)
    loss = losses.d3pm_loss(torch.randn(4, 7, K, generator=g), x0, xt, alpha_t, alpha_s, T, mask_id)
    assert loss.dtype == torch.float32 and (loss[xt == mask_id] > 0).all()


def test_d3pm_estimator_tends_to_the_mdlm_loss_as_T_grows():
    """SPEC-2 §12 check (3): a fixed, time-independent SUBS denoiser (x̂_mask = 0, L_rec = 0) on L = 2
    tokens whose prediction depends on whether the other token is masked: E_i E_z of T KL_i tends to
    the §4 continuous MDLM value (mdlm_loss integrated over t, z enumerated) with error O(1/T)."""
    K, mask_id, eps = 4, 3, 1e-3
    x = torch.tensor([0, 2])
    patterns = torch.tensor(list(itertools.product([False, True], repeat=2)))  # which tokens are masked
    g = torch.Generator().manual_seed(4)
    table = torch.randn(len(patterns), 2, K, generator=g, dtype=torch.float64)  # logits by pattern
    table[..., mask_id] = float('-inf')
    schedule = noise_schedule.LogLinear(eps)

    def expectation(loss_fn, alpha_t, weight):
        """sum over rows of weight * E_z sum_l loss_fn(...) / L, z enumerated per mask pattern."""
        n = len(alpha_t)
        total = torch.zeros((), dtype=torch.float64)
        for pattern, logits in zip(patterns, table):
            xt = torch.where(pattern, mask_id, x).expand(n, 2)
            prob = torch.where(pattern, 1 - alpha_t[:, None], alpha_t[:, None]).prod(-1)
            loss = loss_fn(logits.expand(n, 2, K), x.expand(n, 2), xt)
            total = total + (weight * prob * loss.sum(-1)).sum() / 2
        return total

    # continuous: the integrand is a polynomial of degree 1 in t here; Gauss-Legendre is exact for it
    nodes, w = np.polynomial.legendre.leggauss(8)
    t = torch.tensor((nodes + 1) / 2)
    mdlm = expectation(lambda lg, x0, xt: losses.mdlm_loss(lg, x0, xt, schedule.alpha(t)[:, None],
                                                           schedule.dalpha(t)[:, None], mask_id),
                       schedule.alpha(t), torch.tensor(w / 2))
    errors = []
    for T in (10, 100, 1000, 10_000):
        i = torch.arange(1, T + 1)
        alpha_t, alpha_s = noise_schedule.discrete_alphas(schedule, i, T)
        d3pm = expectation(lambda lg, x0, xt: losses.d3pm_loss(lg, x0, xt, alpha_t[:, None], alpha_s[:, None],
                                                               T, mask_id), alpha_t, torch.full((T,), 1 / T, dtype=torch.float64))
        errors.append((d3pm - mdlm).item())
    errors = np.array(errors)
    assert mdlm > 1 and abs(errors[0]) > 1e-3
    np.testing.assert_allclose(errors[:-1] / errors[1:], 10, rtol=1e-3)  # first order in 1/T
    assert abs(errors[-1]) < 1e-4 * mdlm


def test_d3pm_loss_on_the_masked_rows_only_equals_the_full_logits():
    x0, _, xt_m, alpha, _, mask_id, hidden, weight = _loss_inputs()
    masked = xt_m == mask_id
    alpha_s = torch.where(torch.arange(len(alpha))[:, None] == 0, 1.0, alpha + 0.05)  # one final step
    results = []
    for compact in (False, True):
        w = weight.clone().requires_grad_(True)
        logits = (hidden[masked] if compact else hidden) @ w
        loss = losses.d3pm_loss(logits, x0, xt_m, alpha, alpha_s, 100, mask_id, reuse_logits=compact)
        loss.sum().backward()
        results.append((loss.detach(), w.grad))
    assert torch.equal(results[1][0] == 0, ~masked)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match='masked positions'):
        losses.d3pm_loss(hidden[masked][1:] @ weight, x0, xt_m, alpha, alpha_s, 100, mask_id)


def test_d3pm_loss_is_finite_with_huge_logits_on_unmasked_rows():
    """Rows without statistics must not overflow into NaN gradients (exp(l_mask - 0) = inf there)."""
    K, mask_id = 5, 4
    x0 = torch.tensor([[0, 1, 2]])
    xt = torch.tensor([[0, mask_id, 2]])
    logits = torch.zeros(1, 3, K).index_fill(1, torch.tensor([0, 2]), 200.0).requires_grad_(True)
    loss = losses.d3pm_loss(logits, x0, xt, torch.tensor([[0.4]]), torch.tensor([[0.5]]), 10, mask_id)
    grad, = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and (grad[:, [0, 2]] == 0).all()


def test_d3pm_loss_keeps_float32_precision_at_T_1000():
    """The b term's two logs differ by O(1/T): float32 logits must still give the float64 value to a
    few float32 ulps of the loss (a naive difference of the logs, times T, loses about 3 digits)."""
    g = torch.Generator().manual_seed(0)
    T, K, mask_id = 1000, 50, 49
    logits = torch.randn(64, 16, K, generator=g) * 3
    logits[..., mask_id] += 5  # x̂_mask large: the b term dominates
    x0 = torch.randint(0, K - 1, (64, 16), generator=g)
    xt = torch.full_like(x0, mask_id)
    i = torch.randint(2, T + 1, (64,), generator=g).double()
    alpha_t, alpha_s = (1 - (1 - 1e-3) * i / T)[:, None], (1 - (1 - 1e-3) * (i - 1) / T)[:, None]
    low = losses.d3pm_loss(logits, x0, xt, alpha_t, alpha_s, T, mask_id).double()
    high = losses.d3pm_loss(logits.double(), x0, xt, alpha_t, alpha_s, T, mask_id)
    assert ((low - high).abs() / high.abs()).max() < 3e-6


# ---------------------------------------------------------------------------------------------
# Gradients of the fused SEDD / D3PM losses against autograd through dense float64 references
def dense_d3pm_kl(logits, x0, xt, alpha_t, alpha_s, T, mask_id):
    """T KL(q || p_theta) at masked positions via dense_reverse on softmax(logits), (B, L) float64."""
    B, L, K = logits.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for b, l in itertools.product(range(B), range(L)):
        if xt[b, l] == mask_id:
            a_t, a_s = alpha_t[b, 0].item(), alpha_s[b, 0].item()
            q = dense_reverse(F.one_hot(x0[b, l], K).double(), mask_id, a_t, a_s, K, mask_id)
            p = dense_reverse(logits[b, l].softmax(-1), mask_id, a_t, a_s, K, mask_id)
            out = out.index_put((torch.tensor(b), torch.tensor(l)), T * dense_kl(q, p))
    return out


@pytest.mark.parametrize('chunk_rows', [2, 1024])
def test_sedd_and_d3pm_gradients_match_dense_autograd(monkeypatch, chunk_rows):
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    B, L, K, mask_id, T = 3, 4, 5, 2, 7
    g, x0, xt, alpha, dalpha = _absorbing_inputs(B, L, K, mask_id, seed=6)
    alpha_s = torch.tensor([[1.0], [0.9], [0.995]], dtype=torch.float64)  # i = 1 (b term absent) and two others
    alpha_t = alpha_s - torch.tensor([[0.15], [0.4], [0.2]], dtype=torch.float64)
    logits = (torch.randn(B, L, K, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    cases = [
        (lambda lg: losses.sedd_loss(lg, x0, xt, alpha, dalpha, mask_id),
         lambda lg: upstream_score_entropy(lg, x0, xt, alpha, dalpha, mask_id)),
        (lambda lg: losses.d3pm_loss(lg, x0, xt, alpha_t, alpha_s, T, mask_id),
         lambda lg: dense_d3pm_kl(lg, x0, xt, alpha_t, alpha_s, T, mask_id)),
        (lambda lg: losses.d3pm_reconstruction_loss(lg, x0),
         lambda lg: -lg.log_softmax(-1).gather(-1, x0[..., None])[..., 0]),
    ]
    weights = torch.rand(B, L, generator=g, dtype=torch.float64)
    for fused, dense in cases:
        got = fused(logits)
        grad, = torch.autograd.grad((weights * got).sum(), logits)
        ref = dense(logits)
        ref_grad, = torch.autograd.grad((weights * ref).sum(), logits)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(fused, (logits,))
