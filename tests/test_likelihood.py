"""likelihood.py and the algorithms' likelihood hooks (SPEC-2 §16) against independent computations.

No lm-eval here (tests/test_harness.py runs the real lm-eval): CI checks this maths with
requirements.txt alone.

- A known joint p(c | x) over continuations (K = 4, C = 3) with the EXACT conditional denoiser
  (written here from the table, by enumeration): LLaDA's form, enumerated over the masked count l
  and the masked sets, equals -log p(c | x); the t form (MDLM and DUO-base), integrated over t and
  enumerated over z_t, equals it up to O(eps); the Monte Carlo estimate through likelihood.Scorer
  agrees with its expectation and with its reported standard error.
- AR: the exact log-likelihood equals a naive per-token loop (summed), greedy = argmax at every step.
- Sums, never means; over-length requests are shortened by dropping the oldest context tokens;
  one request's estimate never depends on the batch it shares.
"""
import itertools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import algorithms
import likelihood
from errors import ConfigError, DataError

K, C, EPS = 4, 3, 1e-3
PREFIX = [2, 1]  # any clean prefix: the exact denoisers below condition on the known x implicitly


def make_config(algo='mdlm', time_conditioning=False, noise='log-linear', length=8, T=8):
    algo_config = {'name': algo, 'time_conditioning': time_conditioning}
    if algo == 'd3pm':
        algo_config.update(T=T, subs_masking=False)
    return OmegaConf.create({'algo': algo_config, 'noise': {'type': noise, 'eps': EPS},
                             'training': {'sampling_eps': EPS}, 'model': {'length': length}})


def joint(seed=0):
    """p(c | x) over all K^C continuations (float64, shape (K,) * C), no zero entry."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(K ** C, 0.7)).reshape((K,) * C) * 0.98 + 0.02 / K ** C


def conditional_marginal(table, known: dict, i: int) -> np.ndarray:
    """p(c_i = k | c_j = known[j] for j in known) (K,) from the joint table, by enumeration."""
    marginal = np.zeros(K)
    for cand in itertools.product(range(K), repeat=C):
        if all(cand[j] == v for j, v in known.items()):
            marginal[cand[i]] += table[cand]
    return marginal / marginal.sum()


class ExactMasked(torch.nn.Module):
    """The exact conditional denoiser of a masked model: at a masked continuation position, log p(c_i = k |
    the unmasked continuation tokens) from the table (prefix positions are the clean x; K is the mask id)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, sigma, attention_mask=None, output_rows=None):
        self.calls.append(x.clone())
        P = len(PREFIX)
        rows = []
        for b in range(x.shape[0]):
            c = x[b, P:P + C].tolist()
            known = {i: v for i, v in enumerate(c) if v != K}
            probs = np.zeros((C, K))
            for i in range(C):
                if i not in known:
                    probs[i] = conditional_marginal(self.table, known, i)
            logits = np.full((x.shape[1], K + 1), -30.0)
            logits[P:P + C, :K] = np.log(np.maximum(probs, 1e-300))
            rows.append(logits)
        out = torch.tensor(np.stack(rows))
        return out[output_rows] if output_rows is not None else out


class ExactUniform(torch.nn.Module):
    """The exact denoiser of uniform-state noise on the continuation (prefix clean): the x_theta whose
    reverse rates are the true ones. DUO's rates use x̄θ = K alpha x_theta + (1 - alpha) 1 as the ratios
    q_t(z with z^i = j) / q_t(z), so x̄θ_j = K p_t(z^(i <- j)) / sum_j' p_t(z^(i <- j')), with
    p_t(z) = sum_c p(c | x) prod_k (alpha 1[z_k = c_k] + (1 - alpha)/K), alpha = exp(-sigma). (Not the
    posterior mean p(c_i | z): plugged into DUO's rates it gives other rates, and a bound 1.6 nats loose
    on this example.)"""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, attention_mask=None, output_rows=None):
        P = len(PREFIX)
        cands = np.array(list(itertools.product(range(K), repeat=C)))  # (K^C, C)
        prior = self.table.reshape(-1)
        rows = []
        for b in range(x.shape[0]):
            alpha = math.exp(-float(sigma[b]))
            z = x[b, P:P + C].numpy()
            logits = np.full((x.shape[1], K), -30.0)
            for i in range(C):
                marginal = np.empty(K)
                for j in range(K):
                    zj = z.copy()
                    zj[i] = j
                    like = np.where(cands == zj, alpha + (1 - alpha) / K, (1 - alpha) / K).prod(1)
                    marginal[j] = prior @ like
                xbar = K * marginal / marginal.sum()
                logits[P + i] = np.log(np.maximum((xbar - (1 - alpha)) / (K * alpha), 1e-300))
            rows.append(logits)
        out = torch.tensor(np.stack(rows))
        return out[output_rows] if output_rows is not None else out


class Module(torch.nn.Module):
    """What likelihood.Scorer and the hooks use of diffusion.Diffusion."""

    def __init__(self, algo, backbone, config, vocab_size):
        super().__init__()
        self.algo, self.backbone, self.config, self.vocab_size = algo, backbone, config, vocab_size


def masked_model(table, noise='log-linear'):
    config = make_config('mdlm', noise=noise)
    return Module(algorithms.MDLM(config, K + 1, K), ExactMasked(table), config, K + 1)


def uniform_model(table, noise='log-linear'):
    config = make_config('duo_base', time_conditioning=True, noise=noise)
    return Module(algorithms.DUOBase(config, K, K), ExactUniform(table), config, K)


def rows_for(c, n):
    x0 = torch.tensor([[*PREFIX, *c]] * n)
    target = torch.zeros(n, len(PREFIX) + C, dtype=torch.bool)
    target[:, len(PREFIX):] = True
    return x0, torch.ones_like(x0), target


def subsets():
    return [m for l in range(1, C + 1) for m in itertools.combinations(range(C), l)]


def forced_draw(level, masks, x0, ids=None):
    """A Draw whose uniforms are 0 on the given continuation positions and 1 on the others."""
    uniform = torch.full(x0.shape, 2.0, dtype=torch.float64)
    uniform[:, len(PREFIX):] = 1.0
    for b, m in enumerate(masks):
        for i in m:
            uniform[b, len(PREFIX) + i] = 0.0
    return likelihood.Draw(level, uniform, x0.clone() if ids is None else ids)


C_TRUE = (1, 3, 0)


# ---- the exact-denoiser identities -----------------------------------------------------------
def test_llada_form_equals_minus_log_p_exactly_by_enumeration():
    """E_l E_{|M| = l} [(C / l) sum_{i in M} -log x_theta^i[c_i]] with l ~ U{1..C} and M a uniform
    l-subset, enumerated exactly, equals -log p(c | x) for the exact conditional denoiser."""
    table = joint()
    module = masked_model(table)
    masks = subsets()
    x0, attn, target = rows_for(C_TRUE, len(masks))
    draw = forced_draw(torch.tensor([len(m) for m in masks]), masks, x0)
    est = module.algo.conditional_bound(module, x0, attn, target, draw, 'llada').double().numpy()
    expectation = sum(e / C / math.comb(C, len(m)) for e, m in zip(est, masks))
    assert expectation == pytest.approx(-math.log(table[C_TRUE]), rel=1e-6)


@pytest.mark.parametrize('noise', ['log-linear', 'cosine'])
def test_masked_t_form_equals_minus_log_p_up_to_eps(noise):
    """E_t E_{z_t}: t ~ U[eps, 1], each continuation position masked w.p. 1 - alpha_t (enumerated),
    weight -alpha'_t / (1 - alpha_t): -log p(c | x) + O(eps). Gauss-Legendre in t (cosine too: a
    wrong alpha'_t shows there, log-linear's is -(1 - eps))."""
    table = joint(1)
    module = masked_model(table, noise)
    masks = subsets()
    x0, attn, target = rows_for(C_TRUE, len(masks))
    nodes, weights = np.polynomial.legendre.leggauss(64)
    t_nodes = EPS + (1 - EPS) * (nodes + 1) / 2
    total = 0.0
    for t, w in zip(t_nodes, weights):
        level = torch.full((len(masks),), t, dtype=torch.float64)
        est = module.algo.conditional_bound(module, x0, attn, target, forced_draw(level, masks, x0), 't').double()
        alpha = float(module.algo.schedule.alpha(torch.tensor(t, dtype=torch.float64)))
        probs = [(1 - alpha) ** len(m) * alpha ** (C - len(m)) for m in masks]
        total += w / 2 * float(sum(p * e for p, e in zip(probs, est.numpy())))  # mean over U[eps, 1]
    assert total == pytest.approx(-math.log(table[C_TRUE]), abs=20 * EPS)


def test_uniform_t_form_equals_minus_log_p_up_to_eps():
    """DUO-base's conditional NELBO with the exact denoiser of the clamped model, integrated over t
    and enumerated over z_t of the continuation (q(z | c) = alpha e_c + (1 - alpha)/K), is -log p(c | x)
    up to O(eps) (the continuous-time bound is tight for exact reverse rates)."""
    table = joint(2)
    module = uniform_model(table)
    zs = list(itertools.product(range(K), repeat=C))
    x0, attn, target = rows_for(C_TRUE, len(zs))
    ids = x0.clone()
    ids[:, len(PREFIX):] = torch.tensor(zs)
    # Gauss-Legendre in s = log t (the integrand grows like log(1/t) towards t = 0)
    nodes, weights = np.polynomial.legendre.leggauss(80)
    log_eps = math.log(EPS)
    total = 0.0
    for s, w in zip(log_eps * (1 - nodes) / 2, weights):
        t = math.exp(s)
        level = torch.full((len(zs),), t, dtype=torch.float64)
        # uniforms 1 >= alpha: every continuation position takes its id from `ids`, i.e. z_t = z
        draw = forced_draw(level, [()] * len(zs), x0, ids)
        est = module.algo.conditional_bound(module, x0, attn, target, draw, 't').double().numpy()
        alpha = float(module.algo.schedule.alpha(torch.tensor(t, dtype=torch.float64)))
        q = [np.prod([alpha * (z[i] == C_TRUE[i]) + (1 - alpha) / K for i in range(C)]) for z in zs]
        total += w * -log_eps / 2 * t * float(np.dot(q, est)) / (1 - EPS)  # dt = t ds; mean over U[eps, 1]
    # the part t < eps that the bound leaves out is O(eps log(1/eps)) per token
    assert total == pytest.approx(-math.log(table[C_TRUE]), abs=C * EPS * (1 - log_eps))


def test_the_prefix_is_never_noised_and_only_the_continuation_is_scored():
    """Whatever the draw, the network sees the prefix clean (no suffix-mode leak either: it never
    sees an unnoised continuation token it is scored on)."""
    module = masked_model(joint())
    x0, attn, target = rows_for(C_TRUE, 6)
    draw = likelihood.Draw(torch.tensor([0.999] * 6), torch.zeros(x0.shape), x0.clone())
    module.algo.conditional_bound(module, x0, attn, target, draw, 't')
    seen = module.backbone.calls[-1]
    assert torch.equal(seen[:, :len(PREFIX)], x0[:, :len(PREFIX)]) and bool((seen[:, len(PREFIX):] == K).all())


class Recording(torch.nn.Module):
    """A backbone with fixed random logits per (row, position) that records what it is given."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.vocab, self.seed, self.seen = vocab, seed, []

    def forward(self, x, sigma, attention_mask=None, output_rows=None):
        self.seen.append((x.clone(), sigma.clone()))
        g = torch.Generator().manual_seed(self.seed)
        logits = torch.randn(x.shape[0], x.shape[1], self.vocab, generator=g, dtype=torch.float64) * 2
        return logits[output_rows] if output_rows is not None else logits


def test_uniform_bound_uses_the_sampled_alpha_in_noise_sigma_and_loss():
    """DUO-base (cosine schedule): the continuation is replaced where u >= alpha_t, the prefix never;
    the network sees sigma_t = -log alpha_t of the SAMPLED t (not a ratio recomputed from z_t == x0,
    which leaks x0: upstream's suffix mode); the value is the DUO paper's Eq. 17 (test_losses'
    independent form) at (alpha_t, alpha'_t) summed over the continuation, alpha and alpha' written here."""
    from test_losses import paper_duo_loss
    config = make_config('duo_base', time_conditioning=True, noise='cosine')
    backbone = Recording(K)
    module = Module(algorithms.DUOBase(config, K, K), backbone, config, K)
    n = 6
    x0, attn, target = rows_for(C_TRUE, n)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    uniform = torch.rand(x0.shape, generator=g, dtype=torch.float64)
    ids = torch.randint(0, K, x0.shape, generator=g)
    est = module.algo.conditional_bound(module, x0, attn, target, likelihood.Draw(t, uniform, ids), 't')
    xt, sigma = backbone.seen[-1]
    u = (math.pi / 2) * (1 - (1 - EPS) * t)
    alpha, dalpha = 1 - torch.cos(u), -(math.pi / 2) * (1 - EPS) * torch.sin(u)
    assert torch.allclose(sigma, -torch.log(alpha))
    P = len(PREFIX)
    expected_xt = torch.where(uniform >= alpha[:, None], ids, x0)
    assert torch.equal(xt[:, :P], x0[:, :P]) and torch.equal(xt[:, P:], expected_xt[:, P:])
    logits = torch.randn(n, x0.shape[1], K, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    for b in range(n):
        per_token = paper_duo_loss(logits[b, P:].numpy(), x0[b, P:].numpy(), xt[b, P:].numpy(),
                                   np.full(C, float(alpha[b])), np.full(C, float(dalpha[b])))
        assert float(est[b]) == pytest.approx(per_token.sum(), rel=1e-5)


# ---- the Monte Carlo estimator through Scorer --------------------------------------------------
def request(c, key=(7,)):
    return likelihood.Request(list(PREFIX), list(c), key)


@pytest.mark.parametrize('estimator', ['llada', 't'])
def test_scorer_estimate_and_standard_error_are_right(estimator):
    """Scorer's estimate averages to -log p(c | x) within its standard errors, and the reported standard
    error matches the spread of independent estimates (seeds)."""
    table = joint()
    module = masked_model(table)
    exact = math.log(table[C_TRUE])
    runs = [likelihood.Scorer(module, 64, 24, estimator, seed=s, show_progress=False).score([request(C_TRUE)])[0]
            for s in range(40)]
    lls = np.array([r.ll for r in runs])
    ses = np.array([r.se for r in runs])
    assert abs(lls.mean() - exact) < 4 * lls.std(ddof=1) / math.sqrt(len(lls)) + 20 * EPS
    assert 0.5 < ses.mean() / lls.std(ddof=1) < 2.0
    assert all(r.tokens == C and not math.isnan(r.se) for r in runs)


def test_llada_levels_are_stratified_in_the_masked_count():
    algo = algorithms.MDLM(make_config(), K + 1, K)
    levels = algo.likelihood_levels(12, 3, torch.Generator().manual_seed(0), 'llada')
    assert levels.tolist() == [1] * 4 + [2] * 4 + [3] * 4


def test_lowest_k_draws_uniform_subsets():
    """lowest_k with iid uniforms: every 2-subset of 4 target positions equally likely (chi-square)."""
    from scipy import stats
    g = torch.Generator().manual_seed(0)
    n = 6000
    target = torch.tensor([[False, True, True, True, True]] * n)
    masks = likelihood.lowest_k(torch.rand(n, 5, generator=g), target, torch.full((n,), 2))
    assert bool((masks.sum(1) == 2).all()) and not bool(masks[:, 0].any())
    codes = (masks[:, 1:].long() * torch.tensor([1, 2, 4, 8])).sum(1)
    counts = np.bincount(codes.numpy(), minlength=16)[[3, 5, 6, 9, 10, 12]]
    assert stats.chisquare(counts).pvalue > 1e-3


def test_stratified_standard_error_pairs_neighbouring_strata():
    assert likelihood.stratified_se([1.0, 3.0, 2.0, 2.0]) == pytest.approx(math.sqrt(4 / 16))
    assert math.isnan(likelihood.stratified_se([1.0]))


def test_estimates_never_depend_on_the_batch():
    """The same request scored alone, with others, and at other batch sizes gets the same estimate
    (its noise comes from its own generator)."""
    module = uniform_model(joint())
    a, b, c = request(C_TRUE, (1,)), request((0, 0, 2), (2,)), request((3, 3, 3), (3,))
    alone = likelihood.Scorer(module, 8, 16, 't', show_progress=False).score([a])[0]
    mixed = likelihood.Scorer(module, 5, 16, 't', show_progress=False).score([b, a, c])[1]
    assert mixed.ll == pytest.approx(alone.ll, abs=1e-9) and mixed.se == pytest.approx(alone.se, abs=1e-9)


def test_requests_with_the_same_key_share_their_noise_levels():
    """Choices of one question (same key = same prefix) share their times: common random numbers."""
    module = uniform_model(joint())
    scorer = likelihood.Scorer(module, 8, 16, 't', show_progress=False)
    a, b = scorer.draws(request(C_TRUE, (5,))), scorer.draws(request((0, 1, 2), (5,)))
    assert torch.equal(a.level, b.level)
    assert not torch.equal(scorer.draws(request(C_TRUE, (6,))).level, a.level)


def test_unsupported_estimator_and_sample_count_give_one_line():
    module = uniform_model(joint())
    with pytest.raises(ConfigError, match=r"^estimator=llada does not apply to algo=duo_base: use t \(e.g. estimator=t\)$"):
        likelihood.Scorer(module, 8, 16, 'llada')
    with pytest.raises(ConfigError, match=r'^num_mc_samples=1 must be >= 2'):
        likelihood.Scorer(module, 8, 1, 't')
    config = make_config('mdlm', time_conditioning=True)
    timed = Module(algorithms.MDLM(config, K + 1, K), ExactMasked(joint()), config, K + 1)
    with pytest.raises(ConfigError, match=r'time conditioning'):
        likelihood.Scorer(timed, 8, 16, 'llada')


# ---- AR: exact ----------------------------------------------------------------------------
def tiny_dit(causal, vocab=9, length=12, seed=0):
    from models.dit import DiT
    torch.manual_seed(seed)
    dit = DiT(vocab, 16, 8, 1, 2, length, causal=causal).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # zero-initialised output layers would make every logit equal
    return dit


def ar_module(length=12):
    config = OmegaConf.create({'algo': {'name': 'ar'}, 'model': {'length': length}})
    return Module(algorithms.AR(config, 9, 8), tiny_dit(True, length=length), config, 9)


def naive_ar(backbone, prefix, continuation, mask_id=8):
    """sum_j log p(c_j | prefix, c_<j), one forward pass per token, [MASK] excluded; greedy flag."""
    total, greedy = 0.0, True
    seq = list(prefix)
    for c in continuation:
        with torch.no_grad():
            logits = backbone(torch.tensor([seq]))[0, -1].double()
        logits[mask_id] = float('-inf')
        logp = torch.log_softmax(logits, -1)
        total += float(logp[c])
        greedy &= int(logits.argmax()) == c
        seq.append(c)
    return total, greedy


def test_ar_loglikelihood_equals_a_naive_per_token_loop():
    module = ar_module()
    reqs = [likelihood.Request([2, 5, 1], [3, 4], (1,)), likelihood.Request([2], [0, 1, 2, 3, 4, 5, 6, 7], (2,)),
            likelihood.Request([2, 7, 7, 7, 7, 7, 7, 7, 7, 7], [6], (3,)), likelihood.Request([2, 3], [], (4,))]
    scores = likelihood.Scorer(module, 3, show_progress=False).score(reqs)
    for r, s in zip(reqs, scores):
        ll, greedy = naive_ar(module.backbone, r.prefix, r.continuation)
        assert s.ll == pytest.approx(ll, abs=1e-5) and s.greedy == greedy and s.se == 0 and s.tokens == len(r.continuation)
    assert scores[-1].ll == 0.0 and scores[-1].greedy  # log p(empty) = 0


def test_ar_greedy_flag_is_true_for_the_argmax_continuation():
    module = ar_module()
    seq = [2, 5]
    for _ in range(4):
        with torch.no_grad():
            logits = module.backbone(torch.tensor([seq]))[0, -1]
        logits[8] = float('-inf')
        seq.append(int(logits.argmax()))
    score = likelihood.Scorer(module, 4, show_progress=False).score([likelihood.Request(seq[:2], seq[2:], (0,))])[0]
    assert score.greedy and score.ll < 0


def test_loglikelihoods_are_sums_over_the_continuation():
    """A 2-token continuation's log-likelihood is the sum of its two conditional terms (not a mean)."""
    module = ar_module()
    scorer = likelihood.Scorer(module, 4, show_progress=False)
    both, first, second = scorer.score([likelihood.Request([2, 5], [3, 4], (0,)), likelihood.Request([2, 5], [3], (0,)),
                                        likelihood.Request([2, 5, 3], [4], (0,))])
    assert both.ll == pytest.approx(first.ll + second.ll, abs=1e-5)
    # the diffusion bound is a sum too: LLaDA's form with the exact denoiser gives log p(c | x) (above);
    # for C = 2 with one token fixed the masked-model bound is the single term -log p(c_2 | x, c_1)
    table = joint()
    module = masked_model(table)
    x0, attn, target = rows_for(C_TRUE, 1)
    draw = forced_draw(torch.tensor([3]), [(0, 1, 2)], x0)
    est = float(module.algo.conditional_bound(module, x0, attn, target, draw, 'llada')[0])
    m0 = table.sum((1, 2))[C_TRUE[0]]
    m1 = table.sum((0, 2))[C_TRUE[1]]
    m2 = table.sum((0, 1))[C_TRUE[2]]
    assert est == pytest.approx(-(math.log(m0) + math.log(m1) + math.log(m2)), rel=1e-6)


# ---- greedy for masked models -----------------------------------------------------------------
@pytest.mark.parametrize('algo', ['mdlm', 'sedd', 'd3pm'])
def test_masked_greedy_is_confidence_ordered_decoding(algo):
    """Independent decoding from the table: commit the most probable undecided position to its argmax
    (SEDD: whatever the score's mass; D3PM: x̂ without the [MASK] class)."""
    table = joint(3)
    module = masked_model(table) if algo == 'mdlm' else exact_model(algo, table, offset=(1.3, -0.8, 0.4))

    def decode():
        known = {}
        while len(known) < C:
            best = None
            for i in range(C):
                if i in known:
                    continue
                marginal = conditional_marginal(table, known, i)
                if best is None or marginal.max() > best[0]:
                    best = (marginal.max(), i, int(marginal.argmax()))
            known[best[1]] = best[2]
        return tuple(known[i] for i in range(C))

    greedy = decode()
    other = tuple((v + 1) % K for v in greedy)
    scorer = likelihood.Scorer(module, 8, 4, 't', show_progress=False)
    flags = [s.greedy for s in scorer.score([request(greedy), request(other)])]
    assert flags == [True, False]


# ---- over-length ---------------------------------------------------------------------------
def test_over_length_requests_drop_the_oldest_context_tokens():
    tokens, prefix, dropped = likelihood.fit(2, [10, 11, 12, 13, 14], [20, 21], capacity=6)
    assert tokens == [2, 12, 13, 14, 20, 21] and prefix == 4 and dropped == 2
    assert likelihood.fit(2, [10], [20], capacity=6) == ([2, 10, 20], 2, 0)
    assert likelihood.fit(2, [10, 11], [20, 21, 22, 23, 24], capacity=6) == ([2, 20, 21, 22, 23, 24], 1, 2)
    with pytest.raises(DataError, match='continuation of 6 tokens does not fit'):
        likelihood.fit(2, [10], [20] * 6, capacity=6)


def test_over_length_request_is_scored_after_truncation_never_zero():
    """An over-length item gets the log-likelihood of its truncated sequence (negative), not 0.0."""
    module = ar_module(length=8)
    scorer = likelihood.Scorer(module, 4, show_progress=False)
    tokens, prefix, dropped = likelihood.fit(2, [5, 6, 7, 5, 6, 7, 5, 6, 7], [3, 4], scorer.capacity)
    assert dropped == 9 - (scorer.capacity - 3) and len(tokens) == scorer.capacity
    score = scorer.score([likelihood.Request(tokens[:prefix], tokens[prefix:], (0,))])[0]
    assert score.ll == pytest.approx(naive_ar(module.backbone, tokens[:prefix], tokens[prefix:])[0], abs=1e-5)
    assert score.ll < 0
    with pytest.raises(ValueError, match='exceeds'):
        scorer.score([likelihood.Request([2] * 8, [3, 4], (0,))])


# ---- a real DiT, batched with padding ----------------------------------------------------------
@pytest.mark.parametrize('algo', ['mdlm', 'duo_base', 'sedd', 'd3pm'])
def test_padding_and_batching_do_not_change_a_dit_estimate(algo):
    """Rows of different lengths share a right-padded batch: the attention mask keeps each row's
    estimate what it is alone (a real DiT, so the padding path is exercised; D3PM's one clean pass
    per distinct row too)."""
    config = make_config(algo, time_conditioning=algo != 'mdlm', length=12, T=5)
    module = Module(algorithms.ALGORITHMS[algo](config, 9, 8), tiny_dit(False), config, 9)
    long_ = likelihood.Request([2, 1, 1, 1, 1, 1], [3, 4, 5, 6], (1,))
    short = likelihood.Request([2], [3], (2,))
    alone = likelihood.Scorer(module, 7, 8, 't', show_progress=False).score([short])[0]
    mixed = likelihood.Scorer(module, 11, 8, 't', show_progress=False).score([long_, short])[1]
    assert mixed.ll == pytest.approx(alone.ll, abs=1e-4) and alone.ll < 0


# ---- SEDD and D3PM (SPEC-2 §11, §12): the same clamped-prefix bounds with their own losses ----------------
PATTERNS = list(itertools.product(range(K + 1), repeat=C))  # continuations with K (the [MASK]) at masked positions


def conditional_logits(table):
    """{pattern: (C, K + 1) float64}: at a masked position i, log p(c_i = k | the unmasked tokens of the
    pattern) for k < K and -inf for the [MASK] (x̂_mask = 0); rows of unmasked positions unused (NaN)."""
    out = {}
    cands = np.array(list(itertools.product(range(K), repeat=C)))
    weights = table.reshape(-1)
    for pattern in PATTERNS:
        known = np.array(pattern) != K
        fits = (cands[:, known] == np.array(pattern)[known]).all(1)
        rows = np.full((C, K + 1), np.nan)
        for i in np.flatnonzero(~known):
            marginal = np.bincount(cands[fits, i], weights=weights[fits], minlength=K)
            rows[i, :K] = np.log(marginal / marginal.sum())
            rows[i, K] = -np.inf
        out[pattern] = torch.tensor(rows)
    return out


class Exact(torch.nn.Module):
    """The exact conditional denoiser of `table` for SEDD and D3PM (tabulated once): at a masked
    continuation position i, log p(c_i = k | the unmasked continuation tokens) + offset[i], [MASK] -inf;
    at an unmasked position (prefix, clean tokens) x̂ = e_z, so D3PM's L_rec is 0. SEDD reads the logits
    as the score u_j = exp(l_j) / K (K + 1 classes): offset log K makes its mass S exactly 1."""

    def __init__(self, table, offset=(0.0,) * C):
        super().__init__()
        self.rows = conditional_logits(table)
        self.offset = torch.tensor(offset, dtype=torch.float64)[:, None]
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, sigma, attention_mask=None, output_rows=None, out=None):
        self.seen.append((x.clone(), sigma.clone()))
        P = len(PREFIX)
        logits = torch.full((*x.shape, K + 1), float('-inf'), dtype=torch.float64)
        logits.scatter_(2, x[..., None], 0.0)
        for b in range(x.shape[0]):
            pattern = tuple(x[b, P:P + C].tolist())
            masked = torch.tensor(pattern) == K
            logits[b, P:P + C][masked] = (self.rows[pattern] + self.offset)[masked]
        return logits[output_rows] if output_rows is not None else logits


def exact_model(algo, table, offset=(0.0,) * C, T=8, noise='log-linear'):
    """SEDD (its score normalised, times exp(offset)) or D3PM with the exact denoiser of `table`."""
    config = make_config(algo, time_conditioning=True, noise=noise, T=T)
    if algo == 'sedd':
        offset = tuple(o + math.log(K) for o in offset)
    return Module(algorithms.ALGORITHMS[algo](config, K + 1, K), Exact(table, offset), config, K + 1)


def all_masks():
    return [m for l in range(C + 1) for m in itertools.combinations(range(C), l)]


def t_form_expectation(module, c, alpha, nodes=64):
    """E_{t ~ U[eps, 1]} E_{z_t} of the one-sample t-form estimate of continuation c: Gauss-Legendre in
    t, the masked sets enumerated with their probabilities under alpha (written here)."""
    masks = all_masks()
    x0, attn, target = rows_for(c, len(masks))
    total = 0.0
    for node, w in zip(*np.polynomial.legendre.leggauss(nodes)):
        t = EPS + (1 - EPS) * (node + 1) / 2
        level = torch.full((len(masks),), t, dtype=torch.float64)
        est = module.algo.conditional_bound(module, x0, attn, target, forced_draw(level, masks, x0), 't').double()
        a = alpha(t)
        probs = [(1 - a) ** len(m) * a ** (C - len(m)) for m in masks]
        total += w / 2 * float(np.dot(probs, est.numpy()))
    return total


def loglinear(t):
    return 1 - (1 - EPS) * t


def cosine(t):
    return 1 - math.cos(math.pi / 2 * (1 - (1 - EPS) * t))


@pytest.mark.parametrize('noise,alpha', [('log-linear', loglinear), ('cosine', cosine)])
def test_sedd_t_form_with_a_normalised_exact_score_equals_minus_log_p_up_to_eps(noise, alpha):
    """SEDD's score-entropy bound with the exact score (S = 1), integrated over t and enumerated over
    z_t: -log p(c | x) + O(eps), as MDLM's (its penalty S - 1 - log S vanishes)."""
    table = joint(1)
    module = exact_model('sedd', table, noise=noise)
    assert t_form_expectation(module, C_TRUE, alpha) == pytest.approx(-math.log(table[C_TRUE]), abs=20 * EPS)


def test_sedd_unnormalised_score_only_raises_the_bound_by_its_penalty():
    """Scaling the score at continuation position i by exp(d_i) adds exactly sum_i (e^d_i - 1 - d_i)
    E_t[-alpha'_t] (position i is masked w.p. 1 - alpha_t and weighted -alpha'_t / (1 - alpha_t)), which
    is >= 0: E_t[-alpha'_t] = 1 - eps for log-linear."""
    table = joint(1)
    base = t_form_expectation(exact_model('sedd', table), C_TRUE, loglinear)
    shifts = (0.7, -0.4, 0.0)
    shifted = t_form_expectation(exact_model('sedd', table, offset=shifts), C_TRUE, loglinear)
    penalty = sum(math.exp(d) - 1 - d for d in shifts) * (1 - EPS)
    assert shifted - base == pytest.approx(penalty, rel=1e-6) and shifted > base  # float32 estimates


def upstream_score_entropy(l, m, alpha, dalpha, mask_id):
    """SEDD's per-token loss in upstream's form (SPEC-2 §11), numpy float64: sigma = -log alpha,
    log s_j = l_j - log(e^sigma - 1) - log(V - 1) (j != mask), r = 1 / (e^sigma - 1),
    dsigma (sum_j s_j - r log s_m + r (log r - 1)) with dsigma = -alpha' / alpha."""
    V = len(l)
    sigma = -math.log(alpha)
    log_s = l - math.log(math.expm1(sigma)) - math.log(V - 1)
    r = 1 / math.expm1(sigma)
    total = np.exp(np.delete(log_s, mask_id)).sum() - r * log_s[m] + r * (math.log(r) - 1)
    return -dalpha / alpha * total


class Logits(torch.nn.Module):
    """Fixed random logits per (row, position) of a call, all of them recorded with the call's input."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.vocab, self.seed, self.calls = vocab, seed, []

    def forward(self, x, sigma, attention_mask=None, output_rows=None, out=None):
        g = torch.Generator().manual_seed(self.seed + len(self.calls))
        logits = torch.randn(x.shape[0], x.shape[1], self.vocab, generator=g, dtype=torch.float64) * 2
        self.calls.append({'x': x.clone(), 'sigma': sigma.clone(), 'rows': output_rows, 'logits': logits})
        return logits[output_rows] if output_rows is not None else logits


def mixed_rows(n=6):
    """n rows of two continuations (alternating), attention mask, continuation positions and uniforms:
    random, but row 1 is never masked (a row without a forward pass) and row 0's first target always."""
    x0 = torch.tensor([[*PREFIX, *(C_TRUE if b % 2 == 0 else (0, 2, 2))] for b in range(n)])
    target = torch.zeros(x0.shape, dtype=torch.bool)
    target[:, len(PREFIX):] = True
    g = torch.Generator().manual_seed(4)
    uniform = torch.where(target, torch.rand(x0.shape, generator=g, dtype=torch.float64), 2.0)
    uniform[1, len(PREFIX):] = 1 - 1e-9
    uniform[0, len(PREFIX)] = 0.0
    return x0, torch.ones_like(x0), target, uniform


def test_sedd_bound_is_the_score_entropy_of_the_sampled_time_prefix_clean():
    """Cosine schedule: target positions masked where u < 1 - alpha_t, the prefix never; the network sees
    sigma_t = -log alpha_t of the sampled t; the value is upstream's form of the loss at
    (alpha_t, alpha'_t) summed over the masked positions (alpha, alpha' written here)."""
    config = make_config('sedd', time_conditioning=True, noise='cosine')
    module = Module(algorithms.SEDD(config, K + 1, K), Logits(K + 1), config, K + 1)
    x0, attn, target, uniform = mixed_rows()
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.999], dtype=torch.float64)
    est = module.algo.conditional_bound(module, x0, attn, target, likelihood.Draw(t, uniform, x0.clone()), 't')
    u = (math.pi / 2) * (1 - (1 - EPS) * t)
    alpha, dalpha = 1 - torch.cos(u), -(math.pi / 2) * (1 - EPS) * torch.sin(u)
    masked = target & (uniform < 1 - alpha[:, None])
    live = masked.any(1)
    call, = module.backbone.calls
    assert torch.equal(call['x'], torch.where(masked, K, x0)[live]) and torch.equal(call['rows'], masked[live])
    assert torch.allclose(call['sigma'], -torch.log(alpha[live]))
    expected = torch.zeros(len(x0), dtype=torch.float64)
    for row, b in enumerate(live.nonzero()[:, 0].tolist()):
        for j in masked[b].nonzero()[:, 0].tolist():
            expected[b] += upstream_score_entropy(call['logits'][row, j].numpy(), int(x0[b, j]), float(alpha[b]),
                                                  float(dalpha[b]), K)
    assert bool(live.any()) and not bool(live.all())  # both kinds of rows exercised
    assert torch.allclose(est.double(), expected, rtol=1e-5, atol=1e-6)


def dense_d3pm_kl(l, m, alpha_t, alpha_s, mask_id):
    """KL(q(z_s | z_t = mask, x = m) || p_theta(z_s | z_t = mask)) from the dense distributions of
    SPEC-2 §12, numpy float64: q = a e_m + b e_mask; p_theta(j) = (alpha_s - alpha_t) x̂_j / N (j != mask),
    p_theta(mask) = ((1 - alpha_s)(1 - x̂_mask) + x̂_mask) / N with x̂ = softmax(l) over all classes."""
    xhat = np.exp(l - l.max())
    xhat /= xhat.sum()
    n = (1 - alpha_t) * (1 - xhat[mask_id]) + xhat[mask_id]
    a, b = (alpha_s - alpha_t) / (1 - alpha_t), (1 - alpha_s) / (1 - alpha_t)
    kl = a * math.log(a / ((alpha_s - alpha_t) * xhat[m] / n))
    if b > 0:
        kl += b * math.log(b / (((1 - alpha_s) * (1 - xhat[mask_id]) + xhat[mask_id]) / n))
    return kl


def test_d3pm_bound_is_reconstruction_plus_T_kl_with_the_right_alphas_prefix_clean():
    """Cosine schedule, T = 7, x̂_mask > 0: target positions masked where u < 1 - alpha(i/T), the prefix
    never; the noisy pass sees sigma = -log alpha(i/T), the clean pass x0 at sigma = 0 (one row per
    distinct request); the value is the target's L_rec + T KL_i from the dense distributions with
    alpha_s = alpha((i - 1)/T) and 1 at i = 1 (written here)."""
    T = 7
    config = make_config('d3pm', time_conditioning=True, noise='cosine', T=T)
    module = Module(algorithms.D3PM(config, K + 1, K), Logits(K + 1), config, K + 1)
    x0, attn, target, uniform = mixed_rows()
    i = torch.tensor([1, 3, 7, 1, 2, 7])
    est = module.algo.conditional_bound(module, x0, attn, target, likelihood.Draw(i, uniform, x0.clone()), 't')

    def alpha(t):
        return 1 - math.cos(math.pi / 2 * (1 - (1 - EPS) * t))
    alpha_t = torch.tensor([alpha(k / T) for k in i.tolist()], dtype=torch.float64)
    alpha_s = [1.0 if k == 1 else alpha((k - 1) / T) for k in i.tolist()]
    masked = target & (uniform < 1 - alpha_t[:, None])
    live = masked.any(1)
    clean, noisy = module.backbone.calls
    assert len(clean['x']) == 2 and (clean['sigma'] == 0).all()  # the two distinct requests
    assert torch.equal(clean['rows'], clean['x'] != torch.tensor(PREFIX + [-1] * C))  # the target only
    assert torch.equal(noisy['x'], torch.where(masked, K, x0)[live]) and torch.equal(noisy['rows'], masked[live])
    assert torch.allclose(noisy['sigma'].double(), -torch.log(alpha_t[live]), rtol=1e-6)
    expected = torch.zeros(len(x0), dtype=torch.float64)
    for b in range(len(x0)):
        row = [r for r in range(2) if torch.equal(clean['x'][r], x0[b])][0]
        for j in target[b].nonzero()[:, 0].tolist():
            expected[b] -= torch.log_softmax(clean['logits'][row, j], -1)[x0[b, j]]
    for row, b in enumerate(live.nonzero()[:, 0].tolist()):
        for j in masked[b].nonzero()[:, 0].tolist():
            expected[b] += T * dense_d3pm_kl(noisy['logits'][row, j].numpy(), int(x0[b, j]), float(alpha_t[b]),
                                             alpha_s[b], K)
    assert bool(live.any()) and not bool(live.all()) and bool((masked & (i == 1)[:, None]).any())
    assert torch.allclose(est.double(), expected, rtol=1e-5, atol=1e-6)


def d3pm_exact_value(table, c, T):
    """E_i E_{z_t}[L_rec + T KL_i] for the exact denoiser, by its closed form (written here): L_rec = 0,
    and with x̂_mask = 0, KL_i = a_i (-log x̂_m), a_i = (alpha_{i-1} - alpha_i)/(1 - alpha_i), so the value is
    sum_i a_i sum_M (1 - alpha_i)^|M| alpha_i^(C - |M|) sum_{j in M} -log p(c_j | c outside M)."""
    logits = conditional_logits(table)
    total = 0.0
    for i in range(1, T + 1):
        a_t, a_s = loglinear(i / T), 1.0 if i == 1 else loglinear((i - 1) / T)
        for m in all_masks():
            pattern = tuple(K if j in m else c[j] for j in range(C))
            cost = -sum(float(logits[pattern][j, c[j]]) for j in m)
            total += (a_s - a_t) / (1 - a_t) * (1 - a_t) ** len(m) * a_t ** (C - len(m)) * cost
    return total


def d3pm_expectation(module, c, T):
    """E_{i ~ U{1..T}} E_{z_t} of the one-sample estimate through conditional_bound, every step index and
    masked set enumerated with its probability (alpha written here)."""
    masks = all_masks()
    levels = torch.arange(1, T + 1).repeat_interleave(len(masks))
    x0, attn, target = rows_for(c, len(levels))
    est = module.algo.conditional_bound(module, x0, attn, target, forced_draw(levels, masks * T, x0), 't').double()
    a = torch.tensor([loglinear(i / T) for i in levels.tolist()], dtype=torch.float64)
    size = torch.tensor([len(m) for m in masks * T], dtype=torch.float64)
    return float(((1 - a) ** size * a ** (C - size) * est).sum()) / T


@pytest.mark.parametrize('T', [1, 4, 32])
def test_d3pm_with_the_exact_denoiser_matches_its_closed_form(T):
    table = joint(1)
    module = exact_model('d3pm', table, T=T)
    assert d3pm_expectation(module, C_TRUE, T) == pytest.approx(d3pm_exact_value(table, C_TRUE, T), rel=1e-6)


def test_d3pm_converges_to_minus_log_p_and_bounds_it_in_expectation():
    """With the exact denoiser the discrete bound of c tends to -log p(c | x) as T grows (a Riemann sum of
    the continuous bound: error O(1/T), down to the O(eps) of alpha(1) = eps > 0); one c may sit below
    -log p(c | x) (this one does: 0.6 nats at T = 4), but averaged over c ~ p(c | x) it is at least the
    entropy H(c | x) (a NELBO of the T-step model: >= its cross-entropy >= H)."""
    table = joint(0)
    exact = -math.log(table[C_TRUE])
    gaps = [abs(d3pm_expectation(exact_model('d3pm', table, T=T), C_TRUE, T) - exact) for T in (4, 32, 256)]
    assert gaps[0] > 5 * gaps[1] > 25 * gaps[2] and gaps[2] < 20 * EPS
    module = exact_model('d3pm', table, T=4)
    entropy = -(table * np.log(table)).sum()
    expected = sum(table[c] * d3pm_expectation(module, c, 4) for c in itertools.product(range(K), repeat=C))
    assert expected >= entropy + 0.05


def test_d3pm_scorer_averages_to_its_expectation_with_right_standard_errors():
    """Through Scorer: step indices stratified in 1..T, the estimate's mean over seeds matches the closed
    form within its standard error, and the reported standard error matches the spread."""
    table = joint(1)
    T = 6
    module = exact_model('d3pm', table, T=T)
    runs = [likelihood.Scorer(module, 64, 24, 't', seed=s, show_progress=False).score([request(C_TRUE)])[0]
            for s in range(40)]
    lls = np.array([r.ll for r in runs])
    expected = -d3pm_exact_value(table, C_TRUE, T)
    assert abs(lls.mean() - expected) < 4 * lls.std(ddof=1) / math.sqrt(len(lls))
    assert 0.5 < np.mean([r.se for r in runs]) / lls.std(ddof=1) < 2.0


def test_d3pm_levels_are_stratified_step_indices():
    algo = algorithms.D3PM(make_config('d3pm', T=4), K + 1, K)
    levels = algo.likelihood_levels(12, 3, torch.Generator().manual_seed(0), 't')
    assert levels.tolist() == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3


def test_d3pm_greedy_pass_sees_the_nearest_training_step():
    """Two of three continuation tokens undecided: alpha = 1/3 by the undecided share, the nearest grid
    alpha(i/4) (log-linear: 0.75, 0.5, 0.25, eps) is alpha(3/4): sigma = -log alpha(3/4)."""
    config = make_config('d3pm', time_conditioning=True, T=4)
    module = Module(algorithms.D3PM(config, K + 1, K), Logits(K + 1), config, K + 1)
    x0, attn, target = rows_for(C_TRUE, 1)
    undecided = target.clone()
    undecided[0, len(PREFIX)] = False
    logits = module.algo.greedy_logits(module, x0, attn, target, undecided, x0)
    call, = module.backbone.calls
    assert float(call['sigma']) == pytest.approx(-math.log(loglinear(3 / 4)), rel=1e-6)
    assert bool((logits[:, K] == float('-inf')).all()) and logits.shape == (2, K + 1)


@pytest.mark.parametrize('algo,note', [
    ('sedd', 'SEDD is scored by the t form of its score-entropy bound'),
    ('d3pm', "D3PM's bound is discrete in time: estimator=t draws its step indices i in 1..T")])
def test_llada_form_is_refused_for_sedd_and_d3pm_with_one_line(algo, note):
    module = exact_model(algo, joint())
    with pytest.raises(ConfigError) as error:
        likelihood.Scorer(module, 8, 16, 'llada')
    assert str(error.value) == f'estimator=llada does not apply to algo={algo} ({note}): use t (e.g. estimator=t)'


def test_distinct_rows_finds_each_row_once():
    x = torch.tensor([[3, 1], [2, 2], [3, 1], [3, 1], [2, 2]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [1, 1]])
    index, inverse = likelihood.distinct_rows(x, mask)
    assert sorted(index.tolist()) == [0, 1, 3]
    assert torch.equal(torch.cat([x, mask], 1)[index][inverse], torch.cat([x, mask], 1))
