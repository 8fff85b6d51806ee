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


def make_config(algo='mdlm', time_conditioning=False, noise='log-linear', length=8):
    return OmegaConf.create({'algo': {'name': algo, 'time_conditioning': time_conditioning},
                             'noise': {'type': noise, 'eps': EPS}, 'training': {'sampling_eps': EPS},
                             'model': {'length': length}})


def joint(seed=0):
    """p(c | x) over all K^C continuations (float64, shape (K,) * C), no zero entry."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(K ** C, 0.7)).reshape((K,) * C) * 0.98 + 0.02 / K ** C


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
            sub = self.table
            probs = np.zeros((C, K))
            for i in range(C):
                if i in known:
                    continue
                marginal = np.zeros(K)
                for cand in itertools.product(range(K), repeat=C):
                    if all(cand[j] == v for j, v in known.items()):
                        marginal[cand[i]] += sub[cand]
                probs[i] = marginal / marginal.sum()
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
def test_masked_greedy_is_confidence_ordered_decoding():
    """Independent decoding from the table: commit the most probable undecided position to its argmax."""
    table = joint(3)
    module = masked_model(table)

    def decode():
        known = {}
        while len(known) < C:
            best = None
            for i in range(C):
                if i in known:
                    continue
                marginal = np.zeros(K)
                for cand in itertools.product(range(K), repeat=C):
                    if all(cand[j] == v for j, v in known.items()):
                        marginal[cand[i]] += table[cand]
                marginal /= marginal.sum()
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
@pytest.mark.parametrize('algo', ['mdlm', 'duo_base'])
def test_padding_and_batching_do_not_change_a_dit_estimate(algo):
    """Rows of different lengths share a right-padded batch: the attention mask keeps each row's
    estimate what it is alone (a real DiT, so the padding path is exercised)."""
    config = make_config(algo, time_conditioning=algo != 'mdlm', length=12)
    cls = algorithms.MDLM if algo == 'mdlm' else algorithms.DUOBase
    module = Module(cls(config, 9, 8), tiny_dit(False), config, 9)
    long_ = likelihood.Request([2, 1, 1, 1, 1, 1], [3, 4, 5, 6], (1,))
    short = likelihood.Request([2], [3], (2,))
    alone = likelihood.Scorer(module, 7, 8, 't', show_progress=False).score([short])[0]
    mixed = likelihood.Scorer(module, 11, 8, 't', show_progress=False).score([long_, short])[1]
    assert mixed.ll == pytest.approx(alone.ll, abs=1e-4) and alone.ll < 0
