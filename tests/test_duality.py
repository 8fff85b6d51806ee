"""The Gaussian-uniform duality and the DUO curriculum / distillation pieces (SPEC §5).

T(gamma) = (K I - 1) / (K - 1), I = int phi(z) Phi(z + e^{-gamma/2})^(K-1) dz is checked against
Monte Carlo (argmax of Gaussian latents) and against scipy's adaptive quadrature in log Phi, for
K from 2 to 200k; its derivative against finite differences of that quadrature.
"""
import io
import math
import time
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import integrate, special, stats

import algorithms
import latents
import losses
import noise_schedule as ns


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Every test starts with no in-memory table and an empty disk cache of its own."""
    monkeypatch.setenv('DUO_CACHE_DIR', str(tmp_path / 'duo-cache'))
    monkeypatch.setattr(ns, '_TABLES', {})
    return tmp_path / 'duo-cache'


def quad_alpha(gamma: float, K: int) -> float:
    """Independent T(gamma): scipy adaptive quadrature with the integrand in log space."""
    c = math.exp(-gamma / 2)

    def integrand(z):
        return math.exp(stats.norm.logpdf(z) + (K - 1) * special.log_ndtr(z + c))

    # split where the integrand lives: around z = 0 (phi) and where Phi(z + c)^(K-1) switches on
    switch = float(special.ndtri(1 - 1 / K)) - c
    edges = sorted({-40.0, 40.0, 0.0, min(max(switch, -39.0), 39.0), min(max(-c, -39.0), 39.0)})
    total = sum(integrate.quad(integrand, lo, hi, epsabs=1e-15, epsrel=1e-13, limit=200)[0]
                for lo, hi in zip(edges[:-1], edges[1:]))
    return (K * total - 1) / (K - 1)


def quad_dalpha(gamma: float, K: int, h: float = 1e-4) -> float:
    return (quad_alpha(gamma + h, K) - quad_alpha(gamma - h, K)) / (2 * h)


# ---------------------------------------------------------------------------------------------
# T(gamma)
@pytest.mark.parametrize('K', [2, 3, 5, 20, 1000, 50257, 200000])
def test_alpha_matches_quadrature(K):
    gammas = [-9.0, -5.0, -3.55, -2.5, -1.85, -1.0, 0.0, 3.0, 10.0, 19.5, 24.0]
    got = ns.gaussian_to_uniform_alpha(torch.tensor(gammas, dtype=torch.float64), K).numpy()
    ref = np.array([quad_alpha(g, K) for g in gammas])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize('K', [2, 50, 200000])
def test_dalpha_matches_finite_differences_of_quadrature(K):
    gammas = [-6.0, -3.0, -1.0, 2.0]
    got = ns.gaussian_to_uniform_dalpha(torch.tensor(gammas, dtype=torch.float64), K).numpy()
    ref = np.array([quad_dalpha(g, K) for g in gammas])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-8)


def test_spec_reference_values():
    gamma = torch.tensor([-3.5, -2.5, -1.75], dtype=torch.float64)
    got = ns.gaussian_to_uniform_alpha(gamma, 50257)
    torch.testing.assert_close(got, torch.tensor([0.9283, 0.2380, 0.0383], dtype=torch.float64), atol=5e-5, rtol=0)


@pytest.mark.parametrize('K', [2, 5, 20])
def test_alpha_matches_monte_carlo_argmax(K):
    """P(argmax(alpha~ e_x + sigma~ eps) = x) = T + (1 - T) / K."""
    g = torch.Generator().manual_seed(K)
    n = 200_000
    for gamma in (-2.0, 0.0, 1.5):
        ratio = math.exp(-gamma / 2)  # alpha~ / sigma~: the argmax ignores the common scale sigma~
        w = torch.randn(n, K, generator=g, dtype=torch.float64)
        w[:, 0] += ratio
        hit = (w.argmax(-1) == 0).double().mean().item()
        alpha_mc = (K * hit - 1) / (K - 1)
        se = K / (K - 1) * math.sqrt(hit * (1 - hit) / n)
        alpha = ns.gaussian_to_uniform_alpha(torch.tensor(gamma), K).item()
        assert abs(alpha_mc - alpha) < 5 * se, (gamma, alpha_mc, alpha, se)


def test_alpha_limits_monotonicity_and_continuity():
    K = 50258
    gamma = torch.linspace(-30, 60, 9001, dtype=torch.float64)
    alpha = ns.gaussian_to_uniform_alpha(gamma, K)
    dalpha = ns.gaussian_to_uniform_dalpha(gamma, K)
    assert (alpha.diff() <= 1e-15).all() and (dalpha <= 0).all()
    assert alpha[0] == 1 and 0 < alpha[-1] < 1e-6
    # the table's ends (gamma = -10 and 20) join the extrapolations without a jump in T; T' jumps by
    # the tail's relative error (T taken linear in c = e^{-gamma/2} beyond gamma = 20)
    for edge in (-10.0, 20.0):
        around = torch.tensor([edge - 1e-9, edge + 1e-9], dtype=torch.float64)
        a, d = ns.gaussian_to_uniform_alpha(around, K), ns.gaussian_to_uniform_dalpha(around, K)
        assert abs(a[0] - a[1]) < 1e-8 * a[0] and abs(d[0] - d[1]) <= 1e-3 * abs(d[0]) + 1e-15
    # the tail beyond the table is linear in c = e^{-gamma/2}: T(gamma) / c is constant
    far = torch.tensor([21.0, 30.0, 60.0], dtype=torch.float64)
    ratio = ns.gaussian_to_uniform_alpha(far, K) / torch.exp(-far / 2)
    torch.testing.assert_close(ratio, ratio[:1].expand(3), rtol=1e-12, atol=0)
    assert torch.isnan(ns.gaussian_to_uniform_alpha(torch.tensor([float('nan')]), K)).all()


def test_alpha_is_differentiable_with_gradient_dalpha():
    K = 1000
    gamma = torch.tensor([-4.0, -2.2, -0.5, 3.0, 25.0], dtype=torch.float64, requires_grad=True)
    alpha = ns.gaussian_to_uniform_alpha(gamma, K)
    grad, = torch.autograd.grad(alpha.sum(), gamma)
    torch.testing.assert_close(grad, ns.gaussian_to_uniform_dalpha(gamma.detach(), K))
    assert torch.autograd.gradcheck(lambda g: ns.gaussian_to_uniform_alpha(g, K), (gamma,), atol=1e-6)
    # float32 in, float32 out, same values
    g32 = gamma.detach().float()
    assert ns.gaussian_to_uniform_alpha(g32, K).dtype == torch.float32
    torch.testing.assert_close(ns.gaussian_to_uniform_alpha(g32, K).double(),
                               ns.gaussian_to_uniform_alpha(g32.double(), K))


def test_bad_vocab_size():
    for bad in (1, 0, 2.5, True, '50258'):
        with pytest.raises(ValueError, match='vocab_size'):
            ns.gaussian_to_uniform_alpha(torch.tensor([0.0]), bad)


# ---------------------------------------------------------------------------------------------
# disk cache
def test_first_use_time_gpt2_vocabulary(fresh_cache):
    start = time.perf_counter()
    ns.gaussian_to_uniform_alpha(torch.tensor([-3.0]), 50258)
    elapsed = time.perf_counter() - start
    print(f'\nfirst use of T for K=50258 (table build + cache write): {elapsed:.2f} s')
    assert elapsed < 20
    assert (fresh_cache / 'gaussian_to_uniform_K50258.npz').is_file()


def test_cache_file_is_reused_and_pickle_free(fresh_cache, monkeypatch):
    K = 11
    gamma = torch.linspace(-5, 5, 7, dtype=torch.float64)
    first = ns.gaussian_to_uniform_alpha(gamma, K)
    path = fresh_cache / f'gaussian_to_uniform_K{K}.npz'
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == ['meta.npy', 'table.npy']
    with np.load(path, allow_pickle=False) as cached:  # loads without pickle: plain float arrays
        assert cached['table'].dtype == np.float64 and cached['meta'].dtype == np.float64

    def must_not_build(vocab_size):
        raise AssertionError('the cached table should have been used')

    monkeypatch.setattr(ns, '_TABLES', {})
    monkeypatch.setattr(ns, '_build_table', must_not_build)
    start = time.perf_counter()
    second = ns.gaussian_to_uniform_alpha(gamma, K)
    assert time.perf_counter() - start < 0.5
    assert torch.equal(first, second)


def _bad_cache_files(good: bytes) -> dict:
    def npz(**arrays):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    npy = io.BytesIO()
    np.save(npy, np.zeros((2, ns._GAMMA_NODES)))
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    with np.load(io.BytesIO(good)) as archive:
        table = archive['table']
    return {
        'empty': b'',
        'random bytes': bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)),
        'truncated': good[:len(good) // 2],
        'flipped byte': bytes(flipped),
        'bare npy': npy.getvalue(),
        'pickled objects': npz(meta=np.array([{'a': 1}], dtype=object), table=table),
        'wrong keys': npz(other=table),
        'other settings': npz(meta=ns._table_meta(12), table=table),
        'non-finite table': npz(meta=ns._table_meta(11), table=np.full_like(table, np.nan)),
    }


def test_unreadable_cache_files_are_rebuilt(fresh_cache, monkeypatch):
    K = 11
    gamma = torch.linspace(-5, 5, 7, dtype=torch.float64)
    expected = ns.gaussian_to_uniform_alpha(gamma, K)
    path = fresh_cache / f'gaussian_to_uniform_K{K}.npz'
    good = path.read_bytes()
    with np.load(path) as archive:
        good_table = archive['table']
    for name, content in _bad_cache_files(good).items():
        path.write_bytes(content)
        monkeypatch.setattr(ns, '_TABLES', {})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            got = ns.gaussian_to_uniform_alpha(gamma, K)
        assert torch.equal(got, expected), name
        messages = [str(w.message) for w in caught]
        assert any('rebuilding' in m for m in messages), (name, messages)
        assert not any(issubclass(w.category, ResourceWarning) for w in caught), (name, messages)
        with np.load(path, allow_pickle=False) as rewritten:  # replaced by a good file
            assert np.array_equal(rewritten['table'], good_table), name


def test_unwritable_cache_dir_still_works(tmp_path, monkeypatch):
    not_a_dir = tmp_path / 'file'
    not_a_dir.write_text('x')
    monkeypatch.setenv('DUO_CACHE_DIR', str(not_a_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        alpha = ns.gaussian_to_uniform_alpha(torch.tensor([0.0], dtype=torch.float64), 7)
    assert len(caught) == 1 and 'DUO_CACHE_DIR' in str(caught[0].message)  # one clear warning
    assert abs(alpha.item() - quad_alpha(0.0, 7)) < 1e-9


# ---------------------------------------------------------------------------------------------
# curriculum schedule
def test_gaussian_curriculum_alpha_dalpha():
    K, g_min, g_max = 50258, -3.55, -1.85
    curriculum = ns.GaussianCurriculum(g_min, g_max, K)
    t = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64)
    ref = [quad_alpha(g_min + ti * (g_max - g_min), K) for ti in t.tolist()]
    torch.testing.assert_close(curriculum.alpha(t), torch.tensor(ref, dtype=torch.float64), atol=1e-8, rtol=1e-6)
    h = 1e-5
    inner = t[1:-1]
    fd = (curriculum.alpha(inner + h) - curriculum.alpha(inner - h)) / (2 * h)
    torch.testing.assert_close(curriculum.dalpha(inner), fd, rtol=1e-6, atol=1e-9)
    assert (curriculum.dalpha(t) < 0).all()
    with pytest.raises(ValueError, match='gamma_min'):
        ns.GaussianCurriculum(-1.0, -2.0, K)


# ---------------------------------------------------------------------------------------------
# relaxed Gaussian latent (DUO curriculum input)
@pytest.mark.parametrize('K, chunk_rows', [(7, None), (7, 3), (10, 5)])
def test_relaxed_latent_is_the_tempered_softmax_of_a_gaussian_latent(monkeypatch, K, chunk_rows):
    """tau log(weights) = w - c (one c per row) recovers the latent up to a shift; its coordinate
    differences have the law of alpha~ onehot(x) + sigma~ eps (SPEC §5), also across blocks and streams."""
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    B, L = 3, 4000
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(0))
    gamma = torch.tensor([-3.0, -1.0, 2.0])
    tau = 0.7
    torch.manual_seed(11)
    xt, weights = latents.relaxed_gaussian_latent(x0, gamma, K, tau)
    assert xt.shape == (B, L) and weights.shape == (B, L, K) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, L))
    w = tau * weights.double().log()
    assert torch.equal(xt, w.argmax(-1))
    a = torch.sigmoid(-gamma.double()).sqrt()[:, None]
    s = torch.sigmoid(gamma.double()).sqrt()[:, None]
    # take the x0 coordinate against the next one, and two other coordinates against each other
    other = lambda k: torch.gather(w, 2, ((x0 + k) % K)[..., None])[..., 0]
    at_x = (other(0) - other(1) - a) / s  # ~ N(0, 2)
    apart = (other(2) - other(3)) / s  # ~ N(0, 2)
    for diff in (at_x, apart):
        assert stats.kstest(diff.flatten().numpy() / math.sqrt(2), 'norm').pvalue > 1e-4
    # independent coordinates and positions: no correlation between disjoint differences
    for u, v in ((at_x, apart), (apart[:, 1:], apart[:, :-1])):
        assert abs(np.corrcoef(u.flatten().numpy(), v.flatten().numpy())[0, 1]) < 5 / math.sqrt(u.numel())


@pytest.mark.parametrize('chunk_rows', [None, 3])
def test_gaussian_latents_transform_one_standard_normal_draw(monkeypatch, chunk_rows):
    """Given the eps they draw (latents.standard_normal from the same seed), the relaxed input is
    softmax(w / tau) and z_t, z_s the argmaxes of w = alpha~ onehot(x) + sigma~ eps, written from SPEC §5."""
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    K, B, L = 10, 3, 30
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(6))
    gamma_t, gamma_s = torch.tensor([-1.0, 0.5, 2.0]), torch.tensor([-2.0, 0.0, -1.0])
    torch.manual_seed(7)
    xt, weights = latents.relaxed_gaussian_latent(x0, gamma_t, K, 0.3)
    zt, zs = latents.shared_noise_latents(x0, gamma_t, gamma_s, K)
    torch.manual_seed(7)
    eps_relaxed = latents.standard_normal(B * L, K, 'cpu').view(B, L, K)
    eps_shared = latents.standard_normal(B * L, K, 'cpu').view(B, L, K)
    one_hot = torch.nn.functional.one_hot(x0, K)
    w = lambda gamma, eps: (torch.sigmoid(-gamma).sqrt()[:, None, None] * one_hot
                            + torch.sigmoid(gamma).sqrt()[:, None, None] * eps)
    assert torch.equal(xt, w(gamma_t, eps_relaxed).argmax(-1))
    torch.testing.assert_close(weights, (w(gamma_t, eps_relaxed) / 0.3).softmax(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(zt, w(gamma_t, eps_shared).argmax(-1)) and torch.equal(zs, w(gamma_s, eps_shared).argmax(-1))


def test_gaussian_latents_reproduce_from_the_seed_whatever_the_thread_count(monkeypatch):
    monkeypatch.setattr(losses, 'CHUNK_ROWS', 4)  # 30 blocks over the 8 random streams
    K, B, L = 11, 4, 30
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([-3.0, -1.0, 0.0, 2.0])
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            draws.append((latents.relaxed_gaussian_latent(x0, gamma, K, 0.5),
                          latents.shared_noise_latents(x0, gamma, gamma - 1, K)))
    finally:
        torch.set_num_threads(threads)
    for (xt, weights), (zt, zs) in draws[1:]:
        assert torch.equal(xt, draws[0][0][0]) and torch.equal(weights, draws[0][0][1])
        assert torch.equal(zt, draws[0][1][0]) and torch.equal(zs, draws[0][1][1])
    # and the blocks of different streams are different draws
    weights = draws[0][0][1].view(-1, K)
    assert len({tuple(row.tolist()) for row in weights}) == B * L


@pytest.mark.parametrize('K', [3, 16, 50, 99, 50258])
def test_row_max_is_torch_max_with_first_index_on_ties(K):
    g = torch.Generator().manual_seed(K)
    x = torch.randint(0, 4, (64, K), generator=g).float()  # many ties
    x[5] = 0.0
    x[6, -1] = 9.0  # the maximum in the leftover columns
    x[7, :] = 1.0
    x[7, -1] = 2.0
    for rows in (x, torch.randn(64, K, generator=g)):
        values, indices = latents.row_max(rows)
        expected = rows.max(-1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
        assert torch.equal(indices, rows.argmax(-1))


def test_relaxed_latent_tends_to_one_hot_of_its_argmax():
    K, B, L = 50, 4, 256
    x0 = torch.randint(0, K, (B, L), generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([-3.55, -2.5, -1.85, 0.0])
    deviation = []
    for tau in (1.0, 1e-2, 1e-4, 1e-9):
        xt, weights = latents.relaxed_gaussian_latent(x0, gamma, K, tau)
        deviation.append((weights - torch.nn.functional.one_hot(xt, K)).abs().amax().item())
    assert deviation[0] > 0.1 and deviation[-1] < 1e-6
    assert all(a >= b for a, b in zip(deviation, deviation[1:]))


def test_relaxed_latent_argmax_is_uniform_state_noise():
    """argmax(w) ~ Cat(T(gamma) x + (1 - T(gamma)) / K 1), one gamma per sequence (chi-square)."""
    torch.manual_seed(2)
    K, L = 5, 60_000
    gamma = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    x0 = torch.randint(0, K, (len(gamma), L))
    xt, _ = latents.relaxed_gaussian_latent(x0, gamma, K, 1.0)
    for row, g in enumerate(gamma.tolist()):
        alpha = quad_alpha(g, K)
        shift = (xt[row] - x0[row]) % K  # 0 = kept; every other offset is one of the K-1 other classes
        observed = torch.bincount(shift, minlength=K).numpy()
        expected = L * np.array([alpha + (1 - alpha) / K] + [(1 - alpha) / K] * (K - 1))
        assert stats.chisquare(observed, expected).pvalue > 1e-4, (g, observed, expected)


class _TableBackbone:
    """A fixed 'network' that accepts ids or relaxed one-hot weights: logits = onehot(x) @ M (per position)."""

    def __init__(self, M):
        self.M = M  # (L, K, K)
        self.sigmas = []

    def __call__(self, x, sigma=None, attention_mask=None, weights=None):
        self.sigmas.append(sigma)
        if weights is not None:  # top-k input: ids (B, L, k) with their weights, summed into (B, L, K)
            x = torch.zeros(*x.shape[:2], self.M.shape[-1], dtype=self.M.dtype).scatter_add_(-1, x, weights.to(self.M.dtype))
        elif not x.is_floating_point():
            x = torch.nn.functional.one_hot(x, self.M.shape[-1]).to(self.M.dtype)
        return torch.einsum('blk,lkj->blj', x.to(self.M.dtype), self.M)


def _duo_config(tau_log10: float, start: int = 0, end: int = 100, gamma=(-3.55, -1.85), **curriculum):
    """A DUO config in the flat keys; `curriculum`: keys of the algo.curriculum block (e.g. mode, top_k)."""
    return OmegaConf.create({
        'noise': {'type': 'log-linear', 'eps': 1e-3},
        'algo': {'time_conditioning': True, 'gamma_min': gamma[0], 'gamma_max': gamma[1], 'gumbel_tau_log10_start': tau_log10,
                 'gumbel_tau_log10_end': tau_log10, 'curriculum_start': start, 'curriculum_end': end,
                 'curriculum': curriculum}})


def test_curriculum_loss_composes_into_the_exact_duo_loss():
    """With tau -> 0 the relaxed-input logits are the logits of z_t = argmax(w), and the curriculum loss
    is an unbiased estimate of the exact DUO-base loss at alpha = T(gamma_t), alpha' = T'(gamma_t) dgamma."""
    torch.manual_seed(3)
    K, L = 4, 2
    M = torch.randn(L, K, K, dtype=torch.float64) * 2
    backbone = _TableBackbone(M)
    # pointwise: relaxed input at tau = 1e-9 gives the same logits and loss as the discrete z_t
    x0 = torch.randint(0, K, (512, L))
    gamma = torch.full((512,), -2.7)
    xt, weights = latents.relaxed_gaussian_latent(x0, gamma, K, 1e-9)
    alpha = ns.gaussian_to_uniform_alpha(gamma, K)[:, None].double()
    dalpha = ns.gaussian_to_uniform_dalpha(gamma, K)[:, None].double() * 1.7
    torch.testing.assert_close(backbone(weights), backbone(xt))
    torch.testing.assert_close(losses.duo_loss(backbone(weights), x0, xt, alpha, dalpha),
                               losses.duo_loss(backbone(xt), x0, xt, alpha, dalpha))
    # in expectation, through DUO.loss: Monte Carlo over the Gaussian latent == exact sum over z_t
    algo = algorithms.DUO(_duo_config(-9.0), K, mask_id=K - 1)
    _check_against_enumeration(algo, backbone, (-3.55, -1.85), n=40_000, sigma_tol=dict(rtol=1e-5, atol=1e-6))


def _check_against_enumeration(algo, backbone, gamma, n, sigma_tol, rel=0.0):
    """DUO.loss of x = [1, 3] (K = 4, L = 2) at t = 0.2 and 0.8: n Monte Carlo draws of the latent
    against the exact DUO-base loss summed over every z_t with alpha = T(gamma_t), alpha' = T'(gamma_t)
    dgamma by quadrature (within 5 standard errors, + rel |exact|); the network's sigma is -log alpha
    (within sigma_tol)."""
    K, L = 4, 2
    module = types.SimpleNamespace(backbone=backbone)
    x = torch.tensor([[1, 3]])
    for t_value in (0.2, 0.8):
        backbone.sigmas.clear()
        t = torch.full((n,), t_value)
        per_token, weight = algo.loss(module, x.expand(n, L), torch.ones(n, L), t, step=0)
        assert per_token.shape == (n, L) and torch.equal(weight, torch.ones(n, L))
        mc = per_token.double().mean(0)
        se = per_token.double().std(0) / math.sqrt(n)
        g = gamma[0] + t_value * (gamma[1] - gamma[0])
        a_t = quad_alpha(g, K)
        da_t = quad_dalpha(g, K) * (gamma[1] - gamma[0])
        torch.testing.assert_close(backbone.sigmas[0].double(), torch.full((n,), -math.log(a_t), dtype=torch.float64),
                                   **sigma_tol)
        exact = torch.zeros(L, dtype=torch.float64)
        for z in torch.cartesian_prod(torch.arange(K), torch.arange(K)):
            prob = math.prod(a_t * (z[j] == x[0, j]).item() + (1 - a_t) / K for j in range(L))
            loss = losses.duo_loss(backbone(z[None]), x, z[None], torch.tensor([[a_t]], dtype=torch.float64),
                                   torch.tensor([[da_t]], dtype=torch.float64))
            exact += prob * loss[0]
        assert ((mc - exact).abs() < 5 * se + rel * exact.abs()).all(), (t_value, mc, exact, se)


@pytest.mark.parametrize('mode, k', [('efficient_cached', 1), ('series', 2), ('poly9', 2), ('poly9', 3)])
def test_topk_curriculum_loss_composes_into_the_exact_duo_loss(mode, k):
    """The top-k modes through DUO.loss: z_t is the argmax of the full latent and the top-k input tends
    to onehot(z_t) as tau -> 0, so the curriculum loss is an unbiased estimate of the exact DUO-base loss
    at alpha = T(gamma_t), alpha' = T'(gamma_t) dgamma: Monte Carlo against an enumeration over z_t
    with scipy-quadrature alphas. (Upstream's z_t = x0 whenever x0 is among the top k fails this.)"""
    torch.manual_seed(3)
    K, L, gamma = 4, 2, (-1.0, 1.5)  # alpha from 0.65 to 0.13: z_t != x0 often
    M = torch.randn(L, K, K, dtype=torch.float64) * 2
    backbone = _TableBackbone(M)
    algo = algorithms.DUO(_duo_config(-9.0, gamma=gamma, mode=mode, top_k=k), K, mask_id=K - 1)
    assert algo.top_k == k
    # n = 16000: B L < 32768, so torch runs elementwise ops single-threaded (no thread wake-ups); the
    # fitted operator is within 1e-5 of T here (poly9, K = 4), the exact one within 1e-6
    _check_against_enumeration(algo, backbone, gamma, n=16_000, sigma_tol=dict(rtol=0, atol=2e-5), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# distillation latents
@pytest.mark.parametrize('chunk_rows', [None, 1000])  # one block; 160 blocks over the random streams
def test_shared_noise_latents_marginals_and_coupling(monkeypatch, chunk_rows):
    monkeypatch.setattr(losses, 'CHUNK_ROWS', chunk_rows)
    torch.manual_seed(4)
    K, L = 5, 40_000
    gamma_t = torch.tensor([-1.0, -1.0, -1.0, 1.0])
    gamma_s = torch.tensor([-1.0, -1.2, -2.5, -2.0])  # s < t: less noise at s
    x0 = torch.randint(0, K, (len(gamma_t), L))
    zt, zs = latents.shared_noise_latents(x0, gamma_t, gamma_s, K)
    assert torch.equal(zt[0], zs[0])  # s = t: the same latent
    rng = np.random.default_rng(0)
    agree = []
    for row in range(len(gamma_t)):
        for z, g in ((zt[row], gamma_t[row].item()), (zs[row], gamma_s[row].item())):
            alpha = quad_alpha(g, K)
            observed = torch.bincount((z - x0[row]) % K, minlength=K).numpy()
            expected = L * np.array([alpha + (1 - alpha) / K] + [(1 - alpha) / K] * (K - 1))
            assert stats.chisquare(observed, expected).pvalue > 1e-4, (row, g)
        # joint law: one eps for both, against an independent numpy simulation of the coupling
        eps = rng.standard_normal((L, K))
        ref_t = np.argmax(eps + np.exp(-gamma_t[row].item() / 2) * np.eye(K)[0], -1)
        ref_s = np.argmax(eps + np.exp(-gamma_s[row].item() / 2) * np.eye(K)[0], -1)
        p_ref = np.mean(ref_t == ref_s)
        p = (zt[row] == zs[row]).double().mean().item()
        assert abs(p - p_ref) < 5 * math.sqrt(p_ref * (1 - p_ref) / L * 2) + 1e-12, (row, p, p_ref)
        agree.append(p)
    # coincidence grows as s -> t
    assert agree[0] == 1.0 and agree[1] > agree[2]


# ---------------------------------------------------------------------------------------------
# step-dependent schedules
def test_duo_tau_schedule():
    config = OmegaConf.create({
        'noise': {'type': 'log-linear', 'eps': 1e-3},
        'algo': {'time_conditioning': True, 'gamma_min': -3.55, 'gamma_max': -1.85, 'gumbel_tau_log10_start': -1.0,
                 'gumbel_tau_log10_end': -3.0, 'curriculum_start': 100, 'curriculum_end': 300}})
    algo = algorithms.DUO(config, 50258, 50257)
    assert algo.tau(0) == pytest.approx(0.1) and algo.tau(100) == pytest.approx(0.1)
    assert algo.tau(300) == pytest.approx(1e-3) and algo.tau(10_000) == pytest.approx(1e-3)
    for step in (125, 200, 290):  # log-linear: log10 tau moves linearly in the step
        assert math.log10(algo.tau(step)) == pytest.approx(-1.0 - 2.0 * (step - 100) / 200)
    assert algo.in_curriculum(299) and not algo.in_curriculum(300)


def _distillation_config(linear_growth: bool):
    return OmegaConf.create({
        'noise': {'type': 'log-linear', 'eps': 1e-3},
        'trainer': {'max_steps': 1000},
        'algo': {'time_conditioning': True, 'gamma_min': -3.55, 'gamma_max': -1.85, 'T': 512, 'update_teacher_every': 100, 'teacher_ema': False,
                 'linear_growth_dt': linear_growth, 'linear_growth_min': 0.001, 'linear_growth_max': 0.25,
                 'loss_type': 'kl-bwd'}})


def test_distillation_delta_doubles_each_round():
    algo = algorithms.Distillation(_distillation_config(False), 50258, 50257)
    assert algo.delta(0) == algo.delta(99) == 1 / 512
    assert algo.delta(100) == algo.delta(199) == 2 / 512
    assert algo.delta(500) == 32 / 512
    assert algo.delta(900) == 1.0 and algo.delta(5000) == 1.0  # 2^9 / 512 = 1; never a step beyond t = 1


def test_distillation_delta_linear_growth():
    algo = algorithms.Distillation(_distillation_config(True), 50258, 50257)
    assert algo.delta(0) == pytest.approx(0.001)
    assert algo.delta(500) == pytest.approx(0.001 + 0.5 * 0.249)
    assert algo.delta(1000) == pytest.approx(0.25) and algo.delta(2000) == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# Top-k Gaussian latents (Duo++ efficient curriculum, SPEC-2 §14)
def _gaussian_coefficients(gamma: float) -> tuple[float, float]:
    """(alpha~, sigma~) = (sqrt(sigmoid(-gamma)), sqrt(sigmoid(gamma))), written from SPEC §5."""
    return math.sqrt(1 / (1 + math.exp(gamma))), math.sqrt(1 / (1 + math.exp(-gamma)))


def _constant_rows(ms, L):
    """x0 (len(ms), L): sequence b holds the id ms[b] everywhere (so the clean id m is known per row)."""
    return torch.tensor(ms)[:, None].expand(len(ms), L).contiguous()


@pytest.mark.parametrize('k', [1, 2, 8])
def test_topk_argmax_is_the_argmax_of_the_full_latent(k):
    """P(z_t = m) = I(gamma) and z_t uniform on the other K - 1 ids (chi-square on absolute ids, per m):
    z_t is argmax(w), not 'm whenever W_m is retained' (upstream: 0.576 for K = 50, k = 4)."""
    K, gamma, L = 50, -1.0, 20_000
    ms = [0, 23, 49]
    I = quad_alpha(gamma, K) * (K - 1) / K + 1 / K  # I = T + (1 - T) / K, by quadrature
    assert abs(I - 0.2970) < 5e-5  # SPEC-2 §14
    torch.manual_seed(k)
    xt, ids, weights = latents.topk_relaxed_latent(_constant_rows(ms, L), torch.full((3,), gamma), K, 0.1, k)
    assert xt.shape == (3, L) and ids.shape == weights.shape == (3, L, k)
    assert xt.dtype == ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids[..., 0], xt)
    for row, m in enumerate(ms):
        observed = torch.bincount(xt[row], minlength=K).numpy()
        expected = np.full(K, L * (1 - I) / (K - 1))
        expected[m] = L * I
        assert abs(observed[m] - L * I) < 4.5 * math.sqrt(L * I * (1 - I)), (m, observed[m] / L, I)
        assert stats.chisquare(observed, expected).pvalue > 1e-4, (m, observed)


def _normalised_denominators(K, gamma, tau, k, n, seed):
    """Independent full-K draw: D e^{-max w / tau} with D = sum_j e^{w_j / tau}, and whether W_m is among
    the k largest coordinates (the event 'W_m in R'); clean id m = 0."""
    a, s = _gaussian_coefficients(gamma)
    g = torch.Generator().manual_seed(seed)
    w = s * torch.randn(n, K, generator=g, dtype=torch.float64)
    w[:, 0] += a
    D = torch.exp((w - w.max(1, keepdim=True).values) / tau).sum(1)
    return D, w[:, 0] > w[:, 1:].topk(k, dim=1).values[:, -1]


@pytest.mark.parametrize('k', [1, 2, 5])
def test_topk_denominator_is_unbiased(k):
    """E[D^ f] = E[D f] for f = e^{-max w / tau} 1_A, A in {all, W_m in R, W_m not in R}: D^ is unbiased given
    (V_1..V_k, W_m), which fixes f (Monte Carlo z-tests; K = 6, so k = 5 keeps every coordinate). f keeps the
    statistic in [1, K]. Upstream's tail (threshold V_{k-1}, count K - k, e^{V_k / tau} dropped when W_m in R)
    is biased upwards on A = {W_m in R}."""
    K, gamma, tau, n = 6, 0.0, 0.3, 100_000
    D, inside_full = _normalised_denominators(K, gamma, tau, k, n, seed=k)
    torch.manual_seed(100 + k)
    _, ids, values, log_denominator = latents.topk_gaussian_latent(
        torch.zeros(1, n, dtype=torch.long), torch.tensor([gamma]), K, tau, k)
    D_hat = torch.exp(log_denominator[0] - values[0, :, 0] / tau)
    inside = (ids[0] == 0).any(1)
    p, p_full = inside.double().mean(), inside_full.double().mean()
    assert abs(p - p_full) < 4.5 * math.sqrt(2 * p_full * (1 - p_full) / n) + 1e-12, (p, p_full)
    for event, event_full in ((torch.ones_like(inside), torch.ones_like(inside_full)), (inside, inside_full),
                              (~inside, ~inside_full)):
        a, b = D_hat * event, D * event_full
        z = (a.mean() - b.mean()) / torch.sqrt(a.var() / n + b.var() / n)
        assert abs(z) < 4.5, (k, a.mean().item(), b.mean().item(), z.item())


@pytest.mark.parametrize('sigma', [0.3, 0.9])
def test_topk_truncated_exp_mean_matches_its_definition(sigma):
    """log E[e^{X/tau} | X < c], X ~ N(0, sigma^2): by quadrature of the definition at tau >= 0.05, and by
    50-digit arithmetic of exp(s^2/2) Phi(c/sigma - s) / Phi(c/sigma) (s = sigma/tau) down to tau = 1e-9."""
    import mpmath
    cs = [-1.0, 0.0, 0.7, 2.0, 4.0]
    taus = [1.0, 0.3, 0.05, 1e-2, 1e-3, 1e-6, 1e-9]
    c = torch.tensor([[ci * sigma for ci in cs]] * len(taus), dtype=torch.float64)
    got = torch.stack([latents._log_truncated_exp_mean(c[i], torch.full_like(c[i], sigma), tau)
                       for i, tau in enumerate(taus)])
    mpmath.mp.dps = 50
    for i, tau in enumerate(taus):
        for j, cj in enumerate(c[i].tolist()):
            if tau >= 0.05:
                num = integrate.quad(lambda x: math.exp(x / tau + stats.norm.logpdf(x, scale=sigma) - cj / tau),
                                     -np.inf, cj, epsabs=0, epsrel=1e-12)[0]
                ref = cj / tau + math.log(num) - stats.norm.logcdf(cj / sigma)
            else:
                a, s = mpmath.mpf(cj) / sigma, mpmath.mpf(sigma) / tau
                ref = float(s ** 2 / 2 + mpmath.log(mpmath.ncdf(a - s)) - mpmath.log(mpmath.ncdf(a)))
            assert got[i, j].item() == pytest.approx(ref, rel=1e-12, abs=1e-9), (tau, cj)


def test_topk_ids_are_a_uniform_injection_and_weights_exchangeable():
    """Per slot, the ids != m are uniform on the K - 1 other ids (chi-square); the expected input weight
    E[sum_slots w 1{id = j}] is the same for every j != m (per-id z-tests against the row mean of the others).
    Floyd's unshuffled order gives the top slot (V_1) only the ids of {0..K-1-k} shifted past m."""
    K, k, gamma, tau, L = 20, 3, -1.0, 0.5, 30_000
    ms = [0, 9, 19]
    torch.manual_seed(3)
    xt, ids, weights = latents.topk_relaxed_latent(_constant_rows(ms, L), torch.full((3,), gamma), K, tau, k)
    assert ((ids >= 0) & (ids < K)).all()
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct ids per position
    assert (weights.diff(dim=-1) <= 0).all() and (weights > 0).all() and (weights.sum(-1) <= 1 + 1e-6).all()
    for row, m in enumerate(ms):
        for s in range(k):
            slot = ids[row, :, s]
            observed = np.delete(torch.bincount(slot[slot != m], minlength=K).numpy(), m)
            assert stats.chisquare(observed).pvalue > 1e-4, (m, s, observed)
        mass = torch.zeros(L, K, dtype=torch.float64).scatter_add_(1, ids[row], weights[row].double())
        others = torch.cat([mass[:, :m], mass[:, m + 1:]], 1)  # (L, K - 1)
        diff = others - others.mean(1, keepdim=True)
        z = diff.mean(0) / (diff.std(0) / math.sqrt(L))
        assert z.abs().max() < 4.5, (m, z)


@pytest.mark.parametrize('tau', [1e-3, 1e-2])
def test_topk_kept_mass_matches_the_full_softmax(tau):
    """The retained set R is the top-k of the full latent, so E[sum w] should be the full softmax(w / tau)'s
    top-k mass and E[w at m] its E[p_m] (z-tests against an independent full-K draw). Measured here
    (K = 1000, k = 2, gamma = -2.5): kept 0.9999 at tau = 1e-3, ~0.99 at 1e-2; E[w_m] = P(z_t = m) at 1e-3."""
    K, k, gamma, n_full, n = 1000, 2, -2.5, 8000, 100_000
    a, s = _gaussian_coefficients(gamma)
    g = torch.Generator().manual_seed(7)
    kept_full, p_m = [], []
    for _ in range(4):
        w = s * torch.randn(n_full // 4, K, generator=g, dtype=torch.float64)
        w[:, 0] += a
        p = (w / tau).softmax(1)
        kept_full.append(p.topk(k, 1).values.sum(1))
        p_m.append(p[:, 0])
    kept_full, p_m = torch.cat(kept_full), torch.cat(p_m)
    torch.manual_seed(8)
    xt, ids, weights = latents.topk_relaxed_latent(torch.zeros(1, n, dtype=torch.long), torch.tensor([gamma]), K, tau, k)
    kept = weights[0].double().sum(1)
    w_m = (weights[0].double() * (ids[0] == 0)).sum(1)
    print(f'\ntau={tau}: kept mass top-k {kept.mean():.5f}, full softmax top-{k} {kept_full.mean():.5f}; '
          f'E[w_m] {w_m.mean():.4f}, E[p_m] {p_m.mean():.4f}, P(z_t = m) {(xt == 0).double().mean():.4f}')
    for mine, full in ((kept, kept_full), (w_m, p_m)):
        z = (mine.mean() - full.mean()) / torch.sqrt(mine.var() / n + full.var() / n_full)
        assert abs(z) < 4.5, (tau, mine.mean().item(), full.mean().item())
    assert kept.mean() > (0.999 if tau == 1e-3 else 0.97)
    if tau == 1e-3:
        hit = (xt == 0).double()
        assert abs(w_m.mean() - hit.mean()) < 4.5 * math.sqrt(((w_m - hit).var() / n).item())


def test_topk_input_tends_to_one_hot_of_the_argmax():
    """tau -> 0: the top-k input -> e_{z_t} (all weight on slot 0, whose id is z_t), with K = 50258, no NaN."""
    K, k, L = 50258, 2, 512
    x0 = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(1))
    gamma = torch.tensor([-3.55, -2.7, -1.85])
    deviation = []
    for tau in (1.0, 1e-2, 1e-4, 1e-9):
        torch.manual_seed(0)
        xt, ids, weights = latents.topk_relaxed_latent(x0, gamma, K, tau, k)
        assert torch.isfinite(weights).all() and torch.equal(ids[..., 0], xt)
        assert (weights[..., 0] > 1 / K).all()  # D^ < K e^{max / tau}
        deviation.append(max((weights[..., 0] - 1).abs().max().item(), weights[..., 1:].max().item()))
    assert deviation[0] > 0.1 and deviation[-1] < 1e-6
    assert all(a >= b for a, b in zip(deviation, deviation[1:]))


def test_topk_reproduces_from_the_seed_and_checks_its_arguments():
    K, k = 30, 4
    x0 = torch.randint(0, K, (2, 64), generator=torch.Generator().manual_seed(2))
    gamma = torch.tensor([-2.0, -1.0])
    draws = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(9)
            draws.append(latents.topk_relaxed_latent(x0, gamma, K, 0.01, k))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*draws))
    assert latents.topk_relaxed_latent(x0, gamma, K, 0.01, np.int64(k))[1].shape == (2, 64, k)  # a config's int
    # k = K - 1 keeps every coordinate: the ids are all K ids but one, and W_m is in R or its id is not
    xt, ids, weights = latents.topk_relaxed_latent(x0, gamma, K, 0.01, K - 1)
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all() and torch.equal(ids[..., 0], xt)
    for bad in (0, -1, K, 2.0, True):
        with pytest.raises(ValueError, match=r'algo\.curriculum\.top_k'):
            latents.topk_relaxed_latent(x0, gamma, K, 0.01, bad)
    with pytest.raises(ValueError, match='tau'):
        latents.topk_relaxed_latent(x0, gamma, K, 0.0, 2)


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_topk_memory_grows_with_k_not_K():
    """Every tensor made while drawing the top-k latent has at most (k + 2) elements per position,
    the same at K = 50 and K = 50258; it grows with k."""
    B, L = 2, 64
    largest = {}
    for K in (50, 50258):
        for k in (1, 4):
            x0 = torch.randint(0, 50, (B, L))
            with _LargestOutput() as mode:
                latents.topk_relaxed_latent(x0, torch.tensor([-2.0, -1.0]), K, 1e-3, k)
            largest[K, k] = mode.largest
    assert largest[50, 1] == largest[50258, 1] and largest[50, 4] == largest[50258, 4]
    assert largest[50258, 1] < largest[50258, 4] <= B * L * (4 + 2)


# ---------------------------------------------------------------------------------------------
# fitted curriculum operator (Duo++ poly modes, SPEC-2 §14)
@pytest.mark.parametrize('gamma_min, gamma_max, degree, alpha_bound, dalpha_bound', [
    (-3.55, -1.85, 9, 2.5e-5, 0.013),  # OWT range, SPEC-2 §14: 2.4e-5 and 1.3%
    (-3.5, -1.75, 9, 3.6e-5, 0.023),  # LM1B range: 3.5e-5 and 2.2%
    (-3.55, -1.85, 7, 3.5e-4, 0.052),  # degree 7: 3e-4 and 5%
])
def test_poly_curriculum_error_bounds(gamma_min, gamma_max, degree, alpha_bound, dalpha_bound):
    """Against the exact operator on a fine grid of [0, 1] (not the fit's points); alpha' is the derivative of
    alpha (central differences); the fit is the least-squares polynomial (a monomial-basis lstsq agrees)."""
    K = 50258
    poly = ns.PolyCurriculum(gamma_min, gamma_max, K, degree=degree)
    exact = ns.GaussianCurriculum(gamma_min, gamma_max, K)
    t = torch.linspace(0, 1, 30_001, dtype=torch.float64)
    assert (poly.alpha(t) - exact.alpha(t)).abs().max() <= alpha_bound
    assert ((poly.dalpha(t) - exact.dalpha(t)).abs() / exact.dalpha(t).abs()).max() <= dalpha_bound
    h = 1e-5
    inner = t[1:-1:100]
    torch.testing.assert_close(poly.dalpha(inner), (poly.alpha(inner + h) - poly.alpha(inner - h)) / (2 * h),
                               rtol=1e-6, atol=1e-8)
    fit_t = np.linspace(0, 1, 100_000)
    target = exact.alpha(torch.from_numpy(fit_t)).numpy()
    monomial = np.linalg.lstsq(np.vander(fit_t, degree + 1), target, rcond=None)[0]
    np.testing.assert_allclose(poly.alpha(t).numpy(), np.polyval(monomial, t.numpy()), rtol=0, atol=1e-8)
    # float32 in, float32 out, same values
    t32 = t[::1000].float()
    assert poly.alpha(t32).dtype == poly.dalpha(t32).dtype == torch.float32
    torch.testing.assert_close(poly.alpha(t32).double(), poly.alpha(t32.double()))


def test_poly_curriculum_cache_is_keyed_by_every_setting(fresh_cache, monkeypatch):
    """A file per (K, gamma_min, gamma_max, degree); reloaded without refitting; pickle-free .npz;
    corrupt or mismatched files are rebuilt with a warning."""
    settings = [(-3.55, -1.85, 50, 9), (-3.55, -1.85, 51, 9), (-3.5, -1.85, 50, 9), (-3.55, -1.75, 50, 9),
                (-3.55, -1.85, 50, 7)]
    fitted = {s: ns.PolyCurriculum(*s[:3], degree=s[3]) for s in settings}
    files = sorted(p for p in fresh_cache.iterdir() if 'poly' in p.name)
    assert len(files) == len(settings)
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    assert len({tuple(c.alpha(t).tolist()) for c in fitted.values()}) == len(settings)
    for path in files:
        with zipfile.ZipFile(path) as archive:
            assert sorted(archive.namelist()) == ['coefficients.npy', 'meta.npy']
        with np.load(path, allow_pickle=False) as cached:
            assert cached['coefficients'].dtype == np.float64

    def must_not_fit(*args):
        raise AssertionError('the cached fit should have been used')

    with monkeypatch.context() as patch:
        patch.setattr(ns, 'fit_curriculum_polynomial', must_not_fit)
        for s, first in fitted.items():
            assert torch.equal(ns.PolyCurriculum(*s[:3], degree=s[3]).alpha(t), first.alpha(t))
    base = settings[0]
    path = next(p for p in files if p.name == f'curriculum_poly9_K50_gamma-3.55_-1.85_v{ns._POLY_VERSION}.npz')
    good = path.read_bytes()
    other = next(p for p in files if '_K51_' in p.name).read_bytes()  # another K's fit under this name
    for name, content in {'truncated': good[:len(good) // 2], 'random bytes': bytes(range(256)) * 4,
                          'other settings': other}.items():
        path.write_bytes(content)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            rebuilt = ns.PolyCurriculum(*base[:3], degree=base[3])
        assert any('rebuilding' in str(w.message) for w in caught), name
        assert torch.equal(rebuilt.alpha(t), fitted[base].alpha(t)), name
        assert path.read_bytes() == good, name


def test_curriculum_operator_modes():
    args = (-3.55, -1.85, 50)
    for mode in ('simple', 'efficient_cached', 'series'):
        assert isinstance(ns.curriculum_operator(mode, *args), ns.GaussianCurriculum)
    for degree in (3, 5, 7, 9):
        op = ns.curriculum_operator(f'poly{degree}', *args)
        assert isinstance(op, ns.PolyCurriculum) and op.degree == degree
    for mode in ('sigmoid', 'sigmoid-edge-corrected'):
        with pytest.raises(ValueError, match=f'algo.curriculum.mode={mode} is not supported'):
            ns.curriculum_operator(mode, *args)
    with pytest.raises(ValueError, match='unknown'):
        ns.curriculum_operator('poly4', *args)
    with pytest.raises(ValueError, match='gamma_min'):
        ns.curriculum_operator('poly9', -1.0, -2.0, 50)
