"""Samplers (SPEC §6) against exact denoisers of tiny known data distributions.

The data distribution is a non-product joint over K_DATA^L sequences; the denoiser is computed by
enumerating every x0 under the forward process of SPEC §3, so the reverse process of each sampler
is known exactly and its output distribution must match the data distribution.

Uniform state: the sampler's posterior is linear in x̂, and the exact per-token reverse step is
obtained with x̂ ∝ E[x0 | z_t] / x̄(z_t | x0), the true posterior mean divided by the forward
likelihood of the current token (x̄_m = K α_t 1[m = z_t] + 1 - α_t), which is p(x0^l | z_t^{-l}),
the token's posterior given the other noisy tokens. That is the minimiser of the DUO loss (checked
below), i.e. what a trained DUO model predicts; plugging in E[x0 | z_t] itself is biased (also
checked). Absorbing: the exact denoiser is E[x0 | z_t].
"""
import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import losses
import samplers
from models.dit import DiT

K_DATA = 3
K = K_DATA + 1  # one extra class: the [MASK] (absorbing) or a never-seen id (uniform), as in SPEC §1
MASK = K_DATA


def linear_alpha(t):
    """alpha_t = 1 - t: alpha_1 = 0 exactly, so the all-noise start is the exact prior."""
    return 1 - t


def data_distribution(length, seed=0):
    """(sequences (n, L) int64 over K_DATA ids, probabilities (n,) float64), strongly non-product."""
    seqs = torch.tensor(list(itertools.product(range(K_DATA), repeat=length)))
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(len(seqs), generator=g, dtype=torch.float64) ** 4
    p[(seqs == seqs[:, :1]).all(1)] += 0.3  # favour constant sequences: tokens are correlated
    return seqs, p / p.sum()


def likelihoods(z, t, seqs, kind):
    """q(z_t^l | x0^l) (b, n, L) float64 for every candidate x0 in seqs (n, L) (SPEC §3)."""
    alpha = linear_alpha(t.double())[:, None, None]
    match = (z[:, None, :] == seqs[None]).double()                         # (b, n, L)
    if kind == 'uniform':
        return alpha * match + (1 - alpha) / K
    return alpha * match + (1 - alpha) * (z[:, None, :] == MASK).double()


def posterior(z, t, seqs, p, kind):
    """E[onehot(x0) | z_t] (b, L, K) float64 by enumeration over all x0."""
    post = p[None] * likelihoods(z, t, seqs, kind).prod(-1)
    post = post / post.sum(-1, keepdim=True)                               # (b, n)
    return torch.einsum('bn,nlk->blk', post, F.one_hot(seqs, K).double())


def leave_one_out_posterior(z, t, seqs, p):
    """p(x0^l | z_t^{-l}) (b, L, K): each token's posterior given the OTHER noisy tokens.

    Equals E[x0^l | z_t] / x̄(z_t^l | x0^l), normalised, the exact uniform-state denoiser (above).
    """
    q = likelihoods(z, t, seqs, 'uniform')                                 # (b, n, L)
    out = []
    for l in range(z.shape[1]):
        post = p[None] * torch.cat([q[..., :l], q[..., l + 1:]], -1).prod(-1)
        post = post / post.sum(-1, keepdim=True)
        out.append(post @ F.one_hot(seqs[:, l], K).double())
    return torch.stack(out, 1)


def exact_denoiser(seqs, p, kind, calls=None):
    """logits_fn for the samplers; calls, if a list, records the batch size of every call."""
    def logits_fn(z, t):
        if calls is not None:
            calls.append(z.shape[0])
        if kind == 'uniform':
            return leave_one_out_posterior(z, t, seqs, p).log()
        return posterior(z, t, seqs, p, kind).log()
    return logits_fn


def histogram(samples, length):
    """Counts (K^L,) of sequences (N, L) over the ids 0..K-1."""
    index = (samples * K ** torch.arange(length - 1, -1, -1)).sum(1)
    return torch.bincount(index, minlength=K ** length).double()


def target(seqs, p, length):
    out = torch.zeros(K ** length, dtype=torch.float64)
    out[(seqs * K ** torch.arange(length - 1, -1, -1)).sum(1)] = p
    return out


def chi_square_pvalue(counts, probs):
    """Pearson chi-square goodness of fit; cells with zero probability must have zero counts."""
    assert counts[probs == 0].sum() == 0
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum().item()
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square tail (accurate to ~1e-3 for dof >= 3)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def run(kind, length, steps, n, seed=1, **kw):
    seqs, p = data_distribution(length)
    out = samplers.sample_diffusion(exact_denoiser(seqs, p, kind), n, length, K, linear_alpha, steps,
                                    kind=kind, mask_id=MASK, generator=torch.Generator().manual_seed(seed), **kw)
    return histogram(out, length), target(seqs, p, length)


# ------------------------------------------------------------------------- the exact denoiser

def test_uniform_exact_denoiser_minimises_the_duo_loss():
    """p(x0^l | z^{-l}) zeroes the gradient of E[loss | z_t], and equals E[x0^l | z_t] / x̄ normalised."""
    seqs, p = data_distribution(2)
    t = torch.tensor([0.4])
    alpha = linear_alpha(t.double())
    for z in itertools.product(range(K), repeat=2):
        z = torch.tensor([z])
        post = p * likelihoods(z, t, seqs, 'uniform')[0].prod(-1)
        post = post / post.sum()                                           # p(x0 | z_t) (n,)
        best = leave_one_out_posterior(z, t, seqs, p)[0]                   # (L, K)
        reweighted = posterior(z, t, seqs, p, 'uniform')[0] / (K * alpha * F.one_hot(z[0], K) + 1 - alpha)
        assert torch.allclose(best, reweighted / reweighted.sum(-1, keepdim=True), atol=1e-12)

        def expected_loss(logits):
            per_token = losses.duo_loss(logits.expand(len(seqs), 2, K), seqs, z.expand(len(seqs), 2),
                                        alpha[:, None], -torch.ones(1, 1, dtype=torch.float64))
            return (post[:, None] * per_token).sum()

        logits = best.log().requires_grad_()
        grad, = torch.autograd.grad(expected_loss(logits), logits)
        assert grad.abs().max() < 1e-9
        if (z < K_DATA).any():  # a never-seen id z^l carries no information: there the two coincide
            naive = posterior(z, t, seqs, p, 'uniform')[0].clamp_min(1e-300).log()
            assert expected_loss(naive).item() > expected_loss(logits.detach()).item() + 1e-4


def test_uniform_with_the_posterior_mean_is_biased():
    """A test that can fail: x̂ = E[x0 | z_t] is not what the uniform sampler needs (TV >> noise)."""
    seqs, p = data_distribution(1)
    logits_fn = lambda z, t: posterior(z, t, seqs, p, 'uniform').log()
    out = samplers.sample_diffusion(logits_fn, 20_000, 1, K, linear_alpha, 8, kind='uniform',
                                    generator=torch.Generator().manual_seed(0))
    assert 0.5 * (histogram(out, 1) / 20_000 - target(seqs, p, 1)).abs().sum() > 0.05


# ------------------------------------------------------------------------- distributions

@pytest.mark.parametrize('kind', ['uniform', 'absorbing'])
@pytest.mark.parametrize('steps', [1, 3])
def test_single_token_is_exact_for_any_number_of_steps(kind, steps):
    counts, probs = run(kind, 1, steps, 60_000)
    assert chi_square_pvalue(counts, probs) > 1e-3
    assert 0.5 * (counts / counts.sum() - probs).abs().sum() < 0.01


@pytest.mark.parametrize('kind', ['uniform', 'absorbing'])
def test_joint_distribution_is_recovered_with_many_steps(kind):
    # the per-token steps are exact; drawing tokens independently within a step costs TV ~ 0.37 / steps
    counts, probs = run(kind, 2, 100 if kind == 'uniform' else 200, 20_000)
    assert 0.5 * (counts / counts.sum() - probs).abs().sum() < 0.02
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_few_steps_lose_the_correlations():
    """A test that can fail: one step draws the two tokens independently, which is far from the joint."""
    counts, probs = run('absorbing', 2, 1, 20_000)
    assert 0.5 * (counts / counts.sum() - probs).abs().sum() > 0.1


def test_cached_absorbing_matches_uncached_and_runs_fewer_sequences():
    seqs, p = data_distribution(2)
    results = {}
    for cache in (False, True):
        calls = []
        out = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing', calls), 10_000, 2, K, linear_alpha,
                                        100, kind='absorbing', mask_id=MASK, cache=cache,
                                        generator=torch.Generator().manual_seed(3))
        results[cache] = (histogram(out, 2), calls)
    (counts_u, calls_u), (counts_c, calls_c) = results[False], results[True]
    assert calls_u == [10_000] * 101                       # every step + noise removal, whole batch
    assert sum(calls_c) <= 10_000 * 2                      # each sequence runs once per token it fills
    assert min(calls_c) < 10_000 // 10                     # the decision is per sequence, not per batch
    # two-sample chi-square (homogeneity) between the cached and uncached samplers
    pooled = (counts_u + counts_c) / (counts_u.sum() + counts_c.sum())
    keep = pooled > 0
    stat = sum((((c - pooled * c.sum()) ** 2) / (pooled * c.sum()))[keep].sum() for c in (counts_u, counts_c))
    dof = int(keep.sum()) - 1
    assert stat.item() < dof + 5 * math.sqrt(2 * dof)


def test_absorbing_noise_removal_none_can_leave_masks_and_ancestral_does_not():
    seqs, p = data_distribution(2)
    kw = dict(kind='absorbing', mask_id=MASK, t_min=0.3)
    ancestral = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing'), 2000, 2, K, linear_alpha, 2,
                                          generator=torch.Generator().manual_seed(0), **kw)
    none = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing'), 2000, 2, K, linear_alpha, 2,
                                     noise_removal='none', generator=torch.Generator().manual_seed(0), **kw)
    assert (ancestral != MASK).all()
    frac_masked = (none == MASK).double().mean().item()
    assert abs(frac_masked - 0.3) < 0.03                   # 1 - alpha(t_min) of the tokens stay masked


# ------------------------------------------------------------------------- one uniform step

def dense_uniform_posterior(zt, xhat, alpha_t, alpha_s):
    """SPEC §6 written literally with one-hot vectors, float64, normalised: (K,)."""
    K_ = xhat.shape[0]
    e = F.one_hot(torch.tensor(zt), K_).double()
    a_ts = alpha_t / alpha_s
    q = (alpha_s - alpha_t) * xhat + (K_ * alpha_t * xhat[zt] + a_ts - alpha_t) * e \
        + (1 - a_ts) * (1 - alpha_s) / K_ * torch.ones(K_, dtype=torch.float64)
    return q / q.sum()


@pytest.mark.parametrize('alpha_t,alpha_s', [(0.1, 0.3), (0.6, 0.65), (0.9, 1.0)])
def test_uniform_step_matches_the_dense_posterior(alpha_t, alpha_s):
    g = torch.Generator().manual_seed(0)
    logits_row = torch.randn(6, generator=g, dtype=torch.float64) * 1.5
    n = 80_000
    for zt in (0, 4):
        z = torch.full((n, 1), zt)
        out = samplers.uniform_step(z, logits_row.expand(n, 1, 6).clone(), alpha_t, alpha_s, generator=g)
        counts = torch.bincount(out.flatten(), minlength=6).double()
        assert chi_square_pvalue(counts, dense_uniform_posterior(zt, logits_row.softmax(0), alpha_t, alpha_s)) > 1e-3


# ------------------------------------------------------------------------- greedy tail, nucleus

def recording_logits(K_, record):
    """A denoiser whose logits depend on z and t (argmax unique); record[0] = its last output."""
    def logits_fn(z, t):
        g = torch.Generator().manual_seed(int(z.sum()) * 7919 + int(t[0] * 1e6))
        out = torch.randn(z.shape[0], z.shape[1], K_, generator=g)
        record[:] = [z.clone(), out.clone()]
        return out
    return logits_fn


def test_greedy_tail_returns_the_argmax():
    record = [None, None]
    out = samplers.sample_diffusion(recording_logits(7, record), 16, 5, 7, linear_alpha, 4, kind='uniform',
                                    noise_removal='greedy', generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, record[1].argmax(-1))
    # absorbing: stop early (t_min = 0.5) so that some tokens are still masked before the tail
    out = samplers.sample_diffusion(recording_logits(7, record), 16, 5, 7, linear_alpha, 2, kind='absorbing',
                                    mask_id=6, noise_removal='greedy', cache=False, t_min=0.5,
                                    generator=torch.Generator().manual_seed(0))
    z_before, logits = record
    masked = z_before == 6
    assert masked.any() and (~masked).any()
    logits[..., 6] = float('-inf')
    assert torch.equal(out[masked], logits.argmax(-1)[masked])
    assert torch.equal(out[~masked], z_before[~masked])
    assert (out != 6).all()


def fixed_logits(K_):
    """Logits independent of z and t, with a clear nucleus: probabilities sorted by id."""
    probs = torch.tensor([0.45, 0.3, 0.1, 0.06, 0.05, 0.04][:K_], dtype=torch.float64)
    logits = (probs / probs.sum()).log().float()
    return logits, lambda z, t: logits.expand(z.shape[0], z.shape[1], K_).clone()


def test_nucleus_filter_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 9, generator=g) * 2
    for p_nucleus in (0.3, 0.7, 0.95):
        filtered = samplers.nucleus_filter_(logits.clone(), p_nucleus)
        for row, kept in zip(logits, filtered):
            probs = row.double().softmax(0)
            order = probs.argsort(descending=True).tolist()
            expected, mass = set(), 0.0
            for i in order:  # smallest prefix of the ranking with mass >= p
                expected.add(i)
                mass += probs[i].item()
                if mass >= p_nucleus:
                    break
            assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == expected
            assert torch.equal(kept[torch.isfinite(kept)], row[torch.isfinite(kept)])


def test_nucleus_never_emits_outside_the_nucleus():
    _, logits_fn = fixed_logits(6)
    nucleus = {0, 1, 2}  # 0.45 + 0.3 < 0.8 <= 0.45 + 0.3 + 0.1
    for kind in ('uniform', 'absorbing'):
        out = samplers.sample_diffusion(logits_fn, 512, 4, 6, linear_alpha, 8, kind=kind, mask_id=5,
                                        p_nucleus=0.8, generator=torch.Generator().manual_seed(0))
        assert set(out.unique().tolist()) == nucleus
    out = samplers.sample_ar(lambda tokens: logits_fn(tokens, None)[:, -1], 512, 6, bos_id=5, p_nucleus=0.8,
                             generator=torch.Generator().manual_seed(0))
    assert set(out[:, 1:].unique().tolist()) == nucleus
    counts = torch.bincount(out[:, 1:].flatten(), minlength=6).double()[:3]
    assert chi_square_pvalue(counts, torch.tensor([0.45, 0.3, 0.1], dtype=torch.float64) / 0.85) > 1e-3


def test_top_k():
    _, logits_fn = fixed_logits(6)
    out = samplers.sample_ar(lambda tokens: logits_fn(tokens, None)[:, -1], 256, 8, bos_id=5, top_k=2,
                             generator=torch.Generator().manual_seed(0))
    assert set(out[:, 1:].unique().tolist()) == {0, 1}


# ------------------------------------------------------------------------- categorical draws

def test_time_grid():
    grid = samplers.time_grid(4)
    assert grid.dtype == torch.float64 and grid.tolist() == pytest.approx([1, 0.7500025, 0.500005, 0.2500075, 1e-5])
    with pytest.raises(ValueError, match='sampling.steps=2.5 must be an integer'):
        samplers.time_grid(2.5)


@pytest.mark.parametrize('use_float64', [True, False])
def test_gumbel_argmax_draws_the_softmax(use_float64):
    logits = torch.tensor([0.5, -1.0, float('-inf'), 2.0, 0.0])
    n = 100_000
    ids = samplers.gumbel_argmax(logits.expand(n, 5), torch.Generator().manual_seed(0), use_float64)
    counts = torch.bincount(ids, minlength=5).double()
    assert chi_square_pvalue(counts, logits.double().softmax(0)) > 1e-3


@pytest.mark.parametrize('use_float64', [True, False])
def test_two_level_gumbel_argmax_draws_the_softmax_with_a_ragged_last_group(use_float64):
    # K = 38: groups of 6 and a last group of 2; whole groups of -inf, a peaked and a flat part
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(38, generator=g) * 2
    logits[6:12] = float('-inf')     # one whole group can never be drawn
    logits[37] = float('-inf')       # half of the last group
    logits[20] = 4.0
    assert samplers._group_width(38) == 6
    n = 200_000
    ids = samplers.gumbel_argmax(logits.expand(n, 38), torch.Generator().manual_seed(1), use_float64)
    counts = torch.bincount(ids, minlength=38).double()
    assert chi_square_pvalue(counts, logits.double().softmax(0)) > 1e-3


def test_gumbel_argmax_rows_are_drawn_independently_of_their_neighbours():
    # each row its own distribution (one certain class per row, in a different group each time)
    K = 50
    logits = torch.full((K, K), float('-inf'))
    logits[torch.arange(K), torch.arange(K).flip(0)] = 0.0
    assert torch.equal(samplers.gumbel_argmax(logits), torch.arange(K).flip(0))


def test_row_chunks(monkeypatch):
    monkeypatch.setattr(samplers, 'CHUNK_ELEMENTS', {'cpu': 10})
    logits = torch.full((7, 5), float('-inf'))
    logits[torch.arange(7), torch.arange(7) % 5] = 0.0
    assert torch.equal(samplers.gumbel_argmax(logits), torch.arange(7) % 5)
    ids = torch.tensor([0, 1, 2, 0, 4, 0, 1])
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        x = (torch.randn(7, 5) * 30).to(dtype)
        x[3, 1:] = float('-inf')
        log_p = x.double().log_softmax(-1)
        expected = log_p.gather(1, ids[:, None]).squeeze(1)
        original = x.clone()
        got = samplers.log_softmax_at_(x, ids)
        assert torch.allclose(got[expected > -1e30], expected[expected > -1e30], rtol=1e-5, atol=1e-5)
        assert torch.equal(got <= -1e30, expected <= -1e30)
        if dtype == torch.bfloat16:  # converted chunk by chunk, left as it was
            assert torch.equal(x, original)
        else:  # its log-softmax, in place
            assert torch.allclose(x.double(), log_p, rtol=1e-5, atol=1e-5)


def test_generator_makes_sampling_reproducible():
    seqs, p = data_distribution(2)
    for kind in ('uniform', 'absorbing'):
        a, b = (samplers.sample_diffusion(exact_denoiser(seqs, p, kind), 64, 2, K, linear_alpha, 10, kind=kind,
                                          mask_id=MASK, generator=torch.Generator().manual_seed(5))
                for _ in range(2))
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- AR

def test_ar_matches_a_bigram_chain():
    """step = a known bigram table: the output distribution is p(x1 | bos) p(x2 | x1) exactly."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(K, K, generator=g, dtype=torch.float64) * 1.5
    table[:, MASK] = float('-inf')
    out = samplers.sample_ar(lambda tokens: table[tokens[:, -1]], 60_000, 3, bos_id=MASK,
                             generator=torch.Generator().manual_seed(1))
    assert (out[:, 0] == MASK).all()
    probs = table.softmax(-1)
    joint = probs[MASK][:, None] * probs                                  # (x1, x2)
    counts = torch.bincount(out[:, 1] * K + out[:, 2], minlength=K * K).double()
    assert chi_square_pvalue(counts, joint.flatten()) > 1e-3


def test_ar_kv_cache_gives_the_same_tokens_as_recomputation():
    torch.manual_seed(0)
    model = DiT(11, 32, 16, 2, 4, 12, causal=True).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    cache = model.init_kv_cache(6, 12)
    prefix = []

    def cached(tokens):
        return model(tokens, kv_cache=cache)[:, -1]

    def recompute(tokens):
        prefix.append(tokens)
        return model(torch.cat(prefix, 1))[:, -1]

    with torch.no_grad():
        for kw in ({}, {'p_nucleus': 0.7, 'top_k': 5}):
            cache.length, prefix[:] = 0, []
            a = samplers.sample_ar(cached, 6, 12, bos_id=10, generator=torch.Generator().manual_seed(2), **kw)
            b = samplers.sample_ar(recompute, 6, 12, bos_id=10, generator=torch.Generator().manual_seed(2), **kw)
            assert torch.equal(a, b)
            assert len(a.unique()) > 3


# ------------------------------------------------------------------------- bad input

def test_bad_settings_raise_one_clear_line():
    fn = lambda z, t: torch.zeros(*z.shape, K)
    with pytest.raises(ValueError, match=r'sampling.steps=0 must be .*e.g. sampling.steps=128'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 0, kind='uniform')
    with pytest.raises(ValueError, match='sampling.noise_removal=exact is unknown'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='uniform', noise_removal='exact')
    with pytest.raises(ValueError, match=r'sampling.p_nucleus=1.5 must be in \(0, 1\]'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='uniform', p_nucleus=1.5)
    with pytest.raises(ValueError, match='mask_id'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='absorbing')
    with pytest.raises(ValueError, match="kind='gaussian' is unknown"):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='gaussian')
    with pytest.raises(ValueError, match='sampling.top_k=-1'):
        samplers.sample_ar(lambda tokens: torch.zeros(2, K), 2, 3, bos_id=0, top_k=-1)


# ------------------------------------------------------------------------- wiring in diffusion.py

@pytest.mark.parametrize('algo', ['ar', 'mdlm', 'duo_base'])
def test_diffusion_generate(algo):
    """The algorithm classes drive the samplers: shapes, ids in range, BOS first (AR), no [MASK] left."""
    from omegaconf import OmegaConf

    from diffusion import Diffusion
    from tests.conftest import ROOT
    configs = ROOT / 'configs'
    config = OmegaConf.load(configs / 'config.yaml')
    del config['defaults']  # the groups this test needs, without the data group
    config.algo = OmegaConf.load(configs / 'algo' / f'{algo}.yaml')
    config.model = OmegaConf.load(configs / 'model' / 'micro.yaml')
    config.noise = OmegaConf.load(configs / 'noise' / 'log-linear.yaml')
    config = OmegaConf.merge(config, OmegaConf.from_dotlist([
        'model.length=16', 'model.hidden_size=32', 'model.n_heads=2', 'model.n_blocks=1', 'model.cond_dim=16',
        'sampling.steps=4', 'sampling.p_nucleus=0.9', 'training.ema=0']))
    torch.manual_seed(0)
    module = Diffusion(config, vocab_size=20, mask_id=19, bos_id=18).eval()
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.normal_(0, 0.5)
        a = module.generate(3, generator=torch.Generator().manual_seed(0))
        b = module.generate(3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 16) and torch.equal(a, b)
    assert (a >= 0).all() and (a < 20).all()
    if algo == 'ar':
        assert (a[:, 0] == 18).all() and (a[:, 1:] != 19).all()
    if algo == 'mdlm':
        assert (a != 19).all()


# ------------------------------------------------------------------------- SEDD analytic step (SPEC-2 §11)

def absorbing_posterior(xhat, alpha_t, alpha_s, mask_id):
    """§6 absorbing posterior of a masked token for a distribution xhat over j != mask, (K,) float64."""
    out = (alpha_s - alpha_t) / (1 - alpha_t) * xhat
    out[mask_id] = (1 - alpha_s) / (1 - alpha_t)
    return out


def step_counts(step, logits_row, z_row, n, alpha_t, alpha_s, seed=0, **kw):
    """Run step on n copies of one sequence z_row (L,) with logits_row (L, K); per-position counts (L, K)."""
    L, K_ = logits_row.shape
    z = z_row.expand(n, L).clone()
    out = step(z, logits_row.expand(n, L, K_).clone(), alpha_t, alpha_s, MASK_S,
               generator=torch.Generator().manual_seed(seed), **kw)
    return torch.stack([torch.bincount(out[:, l], minlength=K_) for l in range(L)]).double()


K_S, MASK_S = 6, 2  # the [MASK] inside the vocabulary, not the last id


def sedd_logits(u):
    """Score-network logits with exp(l_j) / (K - 1) = u_j (j != mask) and a huge, unused mask logit."""
    logits = torch.log((K_S - 1) * u)
    logits[MASK_S] = 40.0
    return logits


@pytest.mark.parametrize('alpha_t,alpha_s', [(0.1, 0.3), (0.5, 0.9)])
def test_sedd_step_with_normalised_scores_is_the_absorbing_posterior(alpha_t, alpha_s):
    """SPEC-2 §11 check (4), S = 1: chi-square against the §6 absorbing posterior; position 1 is
    unmasked and never changes."""
    xhat = torch.tensor([0.1, 0.35, 0.0, 0.05, 0.3, 0.2], dtype=torch.float64)
    logits = torch.stack([sedd_logits(xhat), torch.randn(K_S, dtype=torch.float64)])
    counts = step_counts(samplers.sedd_step, logits, torch.tensor([MASK_S, 4]), 40_000, alpha_t, alpha_s)
    assert chi_square_pvalue(counts[0], absorbing_posterior(xhat, alpha_t, alpha_s, MASK_S)) > 1e-3
    assert counts[1, 4] == counts[1].sum()


@pytest.mark.parametrize('shift', [-7.0, 3.0])
def test_sedd_step_normalised_is_the_absorbing_posterior_for_any_shift(shift):
    """normalised=True (MDLM's score, SPEC-2 §11 pitfalls): the logits of x̂ up to a per-row shift,
    S taken as 1: chi-square against the §6 absorbing posterior."""
    xhat = torch.tensor([0.1, 0.35, 0.0, 0.05, 0.3, 0.2], dtype=torch.float64)
    logits = (sedd_logits(xhat) + shift)[None]
    counts = step_counts(samplers.sedd_step, logits, torch.tensor([MASK_S]), 40_000, 0.2, 0.5, normalised=True)
    assert chi_square_pvalue(counts[0], absorbing_posterior(xhat, 0.2, 0.5, MASK_S)) > 1e-3


@pytest.mark.parametrize('scale', [0.3, 4.0])
def test_sedd_step_unmasks_at_rate_min_1_cS(scale):
    """SPEC-2 §11 check (4), S != 1: unmask rate min(1, c S), the token drawn ∝ u."""
    alpha_t, alpha_s, n = 0.2, 0.5, 40_000
    c = (alpha_s - alpha_t) / (1 - alpha_t)
    xhat = torch.tensor([0.3, 0.1, 0.0, 0.25, 0.15, 0.2], dtype=torch.float64)
    counts = step_counts(samplers.sedd_step, sedd_logits(scale * xhat)[None], torch.tensor([MASK_S]), n,
                         alpha_t, alpha_s)[0]
    rate = min(1.0, c * scale)
    unmasked = n - counts[MASK_S].item()
    if rate < 1:
        assert abs(unmasked / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    else:
        assert unmasked == n
    assert chi_square_pvalue(torch.cat([counts[:MASK_S], counts[MASK_S + 1:]]),
                             torch.cat([xhat[:MASK_S], xhat[MASK_S + 1:]])) > 1e-3


def test_sedd_final_denoising_draws_every_mask_and_keeps_unmasked_tokens():
    """SPEC-2 §11 check (5): alpha_s = 1 (c = 1, p_mask := 0) never emits the mask even where S is
    tiny; unmasked tokens never change, at any step."""
    g = torch.Generator().manual_seed(0)
    B, L = 64, 10
    real = torch.randint(0, K_S - 1, (B, L), generator=g)
    z = torch.where(torch.rand(B, L, generator=g) < 0.5, MASK_S, real + (real >= MASK_S).long())
    logits = torch.randn(B, L, K_S, generator=g) - 12.0  # S ~ e^-12: the plain step would almost never unmask
    logits[..., MASK_S] = 30.0
    out = samplers.sedd_step(z, logits.clone(), 0.3, 1.0, MASK_S, generator=g)
    assert (out != MASK_S).all()
    kept = z != MASK_S
    assert torch.equal(out[kept], z[kept])
    mid = samplers.sedd_step(z, logits.clone(), 0.3, 0.6, MASK_S, generator=g)
    assert torch.equal(mid[kept], z[kept]) and (mid[~kept] == MASK_S).float().mean() > 0.99


def test_sedd_step_nucleus_truncates_the_draw_not_the_unmask_rate():
    alpha_t, alpha_s, n = 0.2, 0.5, 40_000
    xhat = torch.tensor([0.45, 0.3, 0.0, 0.1, 0.1, 0.05], dtype=torch.float64)
    counts = step_counts(samplers.sedd_step, sedd_logits(0.5 * xhat)[None], torch.tensor([MASK_S]), n,
                         alpha_t, alpha_s, p_nucleus=0.7)[0]
    rate = (alpha_s - alpha_t) / (1 - alpha_t) * 0.5
    assert abs((n - counts[MASK_S].item()) / n - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    assert counts[[3, 4, 5]].sum() == 0 and counts[[0, 1]].min() > 0  # nucleus {0, 1}: 0.45 + 0.3 >= 0.7


# ------------------------------------------------------------------------- D3PM step (SPEC-2 §12)

def absorbing_matrix(alpha, K_, mask_id):
    """Q[from, to] of the absorbing forward process at signal level alpha, (K, K) float64."""
    Q = alpha * torch.eye(K_, dtype=torch.float64)
    Q[:, mask_id] += 1 - alpha
    return Q


def d3pm_p_theta(xhat, alpha_t, alpha_s, mask_id):
    """p_theta(z_s | z_t = mask) ∝ q(z_t = mask | z_s) sum_y q(z_s | y) xhat_y, (K,) float64."""
    K_ = xhat.shape[0]
    joint = absorbing_matrix(alpha_t / alpha_s, K_, mask_id)[:, mask_id] * (xhat @ absorbing_matrix(alpha_s, K_, mask_id))
    return joint / joint.sum()


@pytest.mark.parametrize('alpha_t,alpha_s', [(0.1, 0.3), (0.05, 0.95), (0.6, 0.61)])
def test_d3pm_step_matches_p_theta(alpha_t, alpha_s):
    """SPEC-2 §12 check (5): one step's distribution = p_theta with x̂_mask > 0 (chi-square), for
    adjacent and distant s < t; position 1 is unmasked and never changes."""
    xhat = torch.tensor([0.1, 0.25, 0.3, 0.05, 0.2, 0.1], dtype=torch.float64)  # x̂_mask = 0.3
    logits = torch.stack([xhat.log() + 1.7, torch.randn(K_S, dtype=torch.float64)]).float()
    counts = step_counts(samplers.d3pm_step, logits, torch.tensor([MASK_S, 0]), 40_000, alpha_t, alpha_s)
    assert chi_square_pvalue(counts[0], d3pm_p_theta(xhat, alpha_t, alpha_s, MASK_S)) > 1e-3
    assert counts[1, 0] == counts[1].sum()


def test_d3pm_last_step_draws_xhat_without_the_mask_and_keeps_unmasked_tokens():
    """alpha_s = 1: every mask is drawn from x̂ restricted to j != mask, renormalised."""
    xhat = torch.tensor([0.1, 0.25, 0.3, 0.05, 0.2, 0.1], dtype=torch.float64)
    logits = torch.stack([xhat.log(), torch.randn(K_S, dtype=torch.float64) + 5]).float()
    counts = step_counts(samplers.d3pm_step, logits, torch.tensor([MASK_S, 3]), 40_000, 0.2, 1.0)
    restricted = xhat.clone()
    restricted[MASK_S] = 0
    assert chi_square_pvalue(counts[0], restricted / restricted.sum()) > 1e-3
    assert counts[1, 3] == counts[1].sum()
# ------------------------------------------------------------------------- the SEDD / D3PM samplers

def exact_score_logits(seqs, p, shift):
    """logits_fn whose masked rows are log E[x0 | z_t] + shift: the exact SEDD score network for
    shift = log(K - 1) (u = x̂, S = 1), an exact x̂ (any shift) for MDLM and D3PM (x̂_mask = 0)."""
    states = torch.tensor(list(itertools.product(range(K), repeat=seqs.shape[1])))  # every z_t

    def logits_fn(z, t):  # t is the same for the whole batch: look the rows up in a table of all z_t
        table = posterior(states, t[:1].expand(len(states)), seqs, p, 'absorbing').log() + shift
        return table[(z * K ** torch.arange(z.shape[1] - 1, -1, -1)).sum(1)]
    return logits_fn


@pytest.mark.parametrize('name,step,shift', [
    ('sedd', samplers.sedd_step, math.log(K - 1)),
    ('mdlm analytic', functools.partial(samplers.sedd_step, normalised=True), 2.5),
    ('d3pm', samplers.d3pm_step, -1.0)])
def test_sample_diffusion_with_a_step_recovers_the_joint(name, step, shift):
    """sample_diffusion(step=...) with the exact denoiser draws from p (chi-square, TV ~ 0.37 / steps)."""
    seqs, p = data_distribution(2)
    out = samplers.sample_diffusion(exact_score_logits(seqs, p, shift), 10_000, 2, K, linear_alpha, 100,
                                    kind='absorbing', mask_id=MASK, step=step,
                                    generator=torch.Generator().manual_seed(4))
    counts, probs = histogram(out, 2), target(seqs, p, 2)
    assert 0.5 * (counts / counts.sum() - probs).abs().sum() < 0.02
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_sample_diffusion_with_a_step_never_changes_unmasked_tokens():
    """Every call sees the previous call's tokens, unmasked ones unchanged; 'none' can leave masks and
    'ancestral' never does; a step without masks left makes no network call."""
    g = torch.Generator().manual_seed(0)
    for removal in ('none', 'ancestral'):
        seen = []

        def logits_fn(z, t):
            seen.append(z.clone())
            return torch.randn(*z.shape, K, generator=g)
        out = samplers.sample_diffusion(logits_fn, 64, 6, K, linear_alpha, 5, kind='absorbing', mask_id=MASK,
                                        noise_removal=removal, step=samplers.sedd_step, t_min=0.5, generator=g)
        for before, after in zip(seen, seen[1:] + [out]):
            kept = before != MASK
            assert torch.equal(after[kept], before[kept])
        assert (out == MASK).any() if removal == 'none' else (out != MASK).all()
    calls = []
    out = samplers.sample_diffusion(lambda z, t: calls.append(1) or torch.full((*z.shape, K), 20.0), 4, 3, K,
                                    linear_alpha, 50, kind='absorbing', mask_id=MASK, step=samplers.sedd_step)
    assert len(calls) == 1 and (out != MASK).all()  # c S >= 1: everything unmasks at the first step


def test_a_step_is_refused_with_kappas_or_uniform_state():
    with pytest.raises(ValueError, match='step= replaces the ancestral step'):
        samplers.sample_diffusion(lambda z, t: torch.zeros(*z.shape, K), 2, 2, K, linear_alpha, 2, kind='uniform',
                                  step=samplers.sedd_step)
    with pytest.raises(ValueError, match='step= replaces the ancestral step'):
        samplers.sample_diffusion(lambda z, t: torch.zeros(*z.shape, K), 2, 2, K, linear_alpha, 2, kind='absorbing',
                                  mask_id=MASK, kappas=torch.ones(3, dtype=torch.float64), step=samplers.sedd_step)


# ------------------------------------------------------------------------- Ψ-samplers (SPEC-2 §13)

def psi_sigma(name, eta, a_t, a_s, compat=False):
    """ReMDM's σ for one pair of signal levels, from the ReMDM paper's definitions (Python floats)."""
    if name == 'constant-remdm':
        return eta
    if name == 'max-capped':                                   # ReMDM-cap
        return eta if a_t == 0 else min(eta, (1 - a_s) / a_t)
    cap = eta if compat else 1.0                               # ReMDM-rescale: η σ_max; upstream: η min(η, .)
    return eta * (1.0 if a_t == 0 else min(cap, (1 - a_s) / a_t))


@pytest.mark.parametrize('mode,expected', [
    ('pure-posterior', ('pure-posterior', None)), ('pure-pc', ('pure-pc', None)),
    ('constant-0.3', ('constant', 0.3)), ('constant-remdm-0.01', ('constant-remdm', 0.01)),
    ('max-capped-1e-3', ('max-capped', 0.001)), ('max-rescale-0.05', ('max-rescale', 0.05)),
    ('max-capped-2', ('max-capped', 2.0))])
def test_kappa_mode_parsing(mode, expected):
    assert samplers.parse_kappa_mode(mode) == expected


@pytest.mark.parametrize('mode', ['posterior', 'pure-posterior-1', 'max-capped-', 'max-capped-x', 'constant-1.5',
                                  'constant-remdm-nan', 'max-rescale--0.1', 'max-capped-inf', 'max-remdm-0.1'])
def test_malformed_kappa_modes_raise_one_line_naming_the_key(mode):
    with pytest.raises(ValueError, match=r'^sampling\.psi\.middle_mode=') as info:
        samplers.psi_kappas(samplers.time_grid(4), linear_alpha, middle_mode=mode)
    assert '\n' not in str(info.value) and 'e.g. sampling.psi.middle_mode=' in str(info.value)


@pytest.mark.parametrize('kw,match', [
    (dict(time_profile='cosine'), r'sampling\.psi\.time_profile=cosine is unknown'),
    (dict(time_profile='linear-constant-linear-abc'), r"'abc' after"),
    (dict(time_profile='linear-constant-linear-0.2-inv', alpha_fn=lambda t: 0.5 + 0.5 * (1 - t)),
     r'alpha level 0.2 is outside'),
    (dict(time_profile='linear-constant-linear-1.5'), r'plateau time 1.5 must be in'),
    (dict(time_profile='linear-constant-linear-0.5', high_frac=0.0), r'high and the low segments'),
    (dict(time_profile='linear-constant-linear-0.5', high_frac=0.6, middle_frac=0.4), r'high and the low segments'),
    (dict(high_frac=0.7, middle_frac=0.6), r'must not exceed 1'),
    (dict(middle_frac=-0.1), r'sampling\.psi\.middle_frac=-0.1 must be in \[0, 1\]')])
def test_malformed_time_profiles_raise_one_line(kw, match):
    kw = dict(dict(alpha_fn=linear_alpha), **kw)
    with pytest.raises(ValueError, match=match) as info:
        samplers.psi_schedule(8, kw.pop('alpha_fn'), **kw)
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('compat', [False, True])
def test_segment_kappas_match_remdm_sigmas(compat):
    """Every mode on a cosine segment that starts at α = 0 (σ = η there), against ReMDM's σ per pair."""
    from noise_schedule import Cosine
    times = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.45, 0.45, 0.2, 0.05, 0.01], dtype=torch.float64)
    alphas = Cosine(0.0).alpha(times)
    assert alphas[0] < 1e-15
    alphas[0] = 0.0
    for name in ('max-capped', 'max-rescale', 'constant-remdm'):
        for eta in (0.002, 0.05, 0.5, 1.0):
            got = samplers.segment_kappas(f'{name}-{eta}', alphas, rescale_compat=compat)
            a = alphas.tolist()
            expected = [min(1.0, max(0.0, 1 - psi_sigma(name, eta, a_t, a_s, compat) / (1 - a_s)))
                        for a_t, a_s in zip(a[:-1], a[1:])] + [1.0]
            assert got.dtype == torch.float64 and got.tolist() == pytest.approx(expected, abs=1e-14)
    assert samplers.segment_kappas('constant-0.3', alphas).tolist() == [0.3] * 9
    assert samplers.segment_kappas('pure-pc', alphas).tolist() == [0.0] * 9
    # a one-point segment under a ReMDM-like mode is [1] (upstream: no values, pitfall (d)); an empty one is []
    assert samplers.segment_kappas('max-capped-0.1', alphas[:1]).tolist() == [1.0]
    assert samplers.segment_kappas('max-capped-0.1', alphas[:0]).tolist() == []


def test_max_rescale_applies_eta_once():
    """Pitfall (a): ReMDM-rescale with η = 0.05 remasks up to σ = 0.05; upstream caps it at η² = 0.0025."""
    alphas = torch.tensor([0.5, 0.6, 1.0], dtype=torch.float64)  # pairs: (1 - α_s)/α_t = 0.8, then α_s = 1
    kappa = samplers.segment_kappas('max-rescale-0.05', alphas)
    compat = samplers.segment_kappas('max-rescale-0.05', alphas, rescale_compat=True)
    assert (1 - kappa[0]) * 0.4 == pytest.approx(0.05 * 0.8)    # σ = η min(1, 0.8)
    assert (1 - compat[0]) * 0.4 == pytest.approx(0.0025)       # σ = η min(η, 0.8)
    assert kappa[1] == 1 and kappa[2] == 1                      # α_s = 1: nothing to re-noise


def test_max_capped_is_remdm_cap_only_without_the_clip():
    """Upstream's clip at 0 caps σ at 1 - α_s, which turns max-capped-η into constant-remdm-η; with
    negative_kappa (MDLM) the remask probability (1 - κ)(1 - α_s) is ReMDM's σ (pitfall (b))."""
    alphas = linear_alpha(samplers.time_grid(12))
    a = alphas.tolist()
    for eta in (0.05, 0.3, 1.0):
        capped = samplers.segment_kappas(f'max-capped-{eta}', alphas)
        assert torch.equal(capped, samplers.segment_kappas(f'constant-remdm-{eta}', alphas))
        for name in ('max-capped', 'max-rescale'):
            kappa = samplers.segment_kappas(f'{name}-{eta}', alphas, negative_kappa=True).tolist()
            remask = [(1 - k) * (1 - a_s) for k, a_s in zip(kappa[:-1], a[1:])]
            assert remask == pytest.approx([psi_sigma(name, eta, a_t, a_s) for a_t, a_s in zip(a[:-1], a[1:])],
                                           abs=1e-14)
        assert min(samplers.segment_kappas(f'max-capped-{eta}', alphas, negative_kappa=True)) < 0
    # constant-remdm-η beyond ReMDM's bound σ <= min(1, (1 - α_s)/α_t): κ stops at 1 - σ_max/(1 - α_s)
    kappa = samplers.segment_kappas('constant-remdm-0.9', torch.tensor([0.8, 0.9, 0.2, 0.5], dtype=torch.float64),
                                    negative_kappa=True)
    assert kappa.tolist() == pytest.approx([1 - 0.125 / 0.1, 1 - 1 / 0.9, 1 - 0.9 / 0.5, 1.0], abs=1e-14)
    kappa = samplers.segment_kappas('max-capped-1.5', torch.tensor([0.2, 0.5], dtype=torch.float64),
                                    negative_kappa=True)
    assert kappa.tolist() == pytest.approx([1 - 1 / 0.5, 1.0], abs=1e-14)              # σ_max = min(1, 2.5)


def test_alpha_inverse_includes_the_schedule_eps():
    from noise_schedule import Cosine, LogLinear
    eps = 1e-3
    for c in (0.5, 0.9, 0.99):
        loglinear = (1 - c) / (1 - eps)
        cosine = (1 - 2 / math.pi * math.acos(1 - c)) / (1 - eps)
        assert samplers.alpha_inverse(LogLinear(eps).alpha, c) == pytest.approx(loglinear, abs=1e-14)
        assert samplers.alpha_inverse(Cosine(eps).alpha, c) == pytest.approx(cosine, abs=1e-14)
        assert abs(loglinear - (1 - c)) > 1e-5                   # upstream's get_t_for_alpha ignores eps


def test_worked_example_of_the_loop_profile():
    """SPEC-2 §13.3: OWT loop, S = 256, linear-constant-linear-0.9-inv, fracs 0.45 / 0.5, constant-remdm-0.01."""
    from noise_schedule import LogLinear
    schedule = LogLinear(1e-3)
    kw = dict(middle_mode='constant-remdm-0.01', high_frac=0.45, middle_frac=0.5)
    assert samplers.psi_segment_sizes(257, 0.45, 0.5) == (116, 128, 13)
    grid, kappas = samplers.psi_schedule(256, schedule.alpha, time_profile='linear-constant-linear-0.9-inv', **kw)
    t_c = 0.1 / 0.999                                            # α(t_c) = 0.9 with ε = 1e-3
    assert grid.shape == kappas.shape == (257,) and grid.dtype == torch.float64
    assert grid[0] == 1 and grid[-1] == 1e-5 and grid[115].item() == pytest.approx(t_c, abs=1e-15)
    dt = (grid[:-1] - grid[1:]).tolist()
    assert [i for i, d in enumerate(dt) if d == 0] == list(range(115, 244))   # n_mid + 1 zero-length steps
    assert dt[:115] == pytest.approx([(1 - t_c) / 115] * 115, rel=1e-9)        # steps 0-114: 1 -> t_c
    assert dt[244:] == pytest.approx([(t_c - 1e-5) / 12] * 12, rel=1e-9)       # steps 244-255: t_c -> 1e-5
    expected = [1.0] * 116 + [0.9] * 127 + [1.0] * 14                          # 1 - 0.01/(1 - 0.9)
    assert kappas.tolist() == pytest.approx(expected, abs=1e-12)
    # upstream's t_c = 1 - c ignores ε: α(0.1) = 0.9001 and κ = 1 - 0.01/0.0999, the spec's ≈ 0.8999
    _, kappas = samplers.psi_schedule(256, schedule.alpha, time_profile='linear-constant-linear-0.1', **kw)
    assert kappas[116:243].tolist() == pytest.approx([1 - 0.01 / (0.999 * 0.1)] * 127, abs=1e-12)
    assert round(kappas[116].item(), 4) == 0.8999


def test_psi_defaults_are_the_ancestral_grid():
    grid, kappas = samplers.psi_schedule(10, linear_alpha)
    assert torch.equal(grid, samplers.time_grid(10)) and kappas.tolist() == [1.0] * 11


def remdm_posterior(z, xhat, a_t, a_s, sigma):
    """ReMDM's q_σ(z_s | z_t, x̂) for one token (K,) from the ReMDM paper (x̂ has no mass on MASK)."""
    mask = F.one_hot(torch.tensor(MASK), K).double()
    if z != MASK:
        return (1 - sigma) * F.one_hot(torch.tensor(z), K).double() + sigma * mask
    return (a_s - (1 - sigma) * a_t) / (1 - a_t) * xhat + (1 - a_s - sigma * a_t) / (1 - a_t) * mask


def psi_absorbing_dense(z, xhat, a_t, a_s, kappa):
    """The absorbing Ψ-step's distribution (K,) for one token, from psi_absorbing_probs."""
    p_unmask, p_remask = samplers.psi_absorbing_probs(a_t, a_s, kappa)
    mask = F.one_hot(torch.tensor(MASK), K).double()
    if z != MASK:
        return (1 - p_remask) * F.one_hot(torch.tensor(z), K).double() + p_remask * mask
    return p_unmask * xhat + (1 - p_unmask) * mask


def test_absorbing_psi_is_remdm_pointwise():
    """Check (1): κ = 1 - σ/(1 - α_s) is ReMDM's posterior for σ in [0, 1 - α_s], and beyond, up to
    ReMDM's σ_max = min(1, (1 - α_s)/α_t) (κ < 0)."""
    xhat = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    for a_t, a_s in ((0.0, 0.3), (0.2, 0.5), (0.6, 0.9), (0.7, 0.7)):
        sigma_max = 1.0 if a_t == 0 else min(1.0, (1 - a_s) / a_t)
        for sigma in torch.linspace(0, sigma_max, 9).tolist():
            for z in range(K):
                got = psi_absorbing_dense(z, xhat, a_t, a_s, 1 - sigma / (1 - a_s))
                assert torch.allclose(got, remdm_posterior(z, xhat, a_t, a_s, sigma), atol=1e-14)


def absorbing_marginal(p, alpha):
    return torch.cat([alpha * p, torch.tensor([1 - alpha], dtype=torch.float64)])


def uniform_marginal(p, alpha):
    return alpha * torch.cat([p, torch.zeros(1, dtype=torch.float64)]) + (1 - alpha) / K


PAIRS = [(0.0, 0.25), (0.3, 0.6), (0.5, 0.5), (0.8, 0.95)]


@pytest.mark.parametrize('kappa', [0.0, 0.3, 1.0])
def test_psi_steps_preserve_the_marginals_exactly(kappa):
    """Check (2), exact sums: L = 1, exact denoiser, Σ_{z_t} q_t(z_t) q_Ψ(z_s | z_t) = q_s(z_s)."""
    _, p = data_distribution(1)
    for a_t, a_s in PAIRS:
        # absorbing: x̂ = p(x | z_t = MASK) = p; an unmasked row is e_{z_t}
        xhat = torch.cat([p, torch.zeros(1, dtype=torch.float64)])
        T = torch.stack([psi_absorbing_dense(z, xhat, a_t, a_s, kappa) for z in range(K)])
        assert torch.allclose(absorbing_marginal(p, a_t) @ T, absorbing_marginal(p, a_s), atol=1e-14)
        # uniform: x_θ ∝ p(x | z_t) / q(z_t | x), written literally (for L = 1 it is p for every z_t)
        rows = []
        for z in range(K):
            lik = a_t * F.one_hot(torch.tensor(z), K).double() + (1 - a_t) / K
            post = xhat * lik / (xhat * lik).sum()
            x_theta = torch.where(xhat > 0, post / lik, 0.0)
            x_theta = x_theta / x_theta.sum()
            w_x, w_keep, w_unif = samplers.psi_uniform_weights(x_theta[z:z + 1], K, a_t, a_s, kappa)
            row = w_x * x_theta + w_keep * F.one_hot(torch.tensor(z), K).double() + w_unif / K
            rows.append(row / row.sum())
        T = torch.stack(rows)
        assert torch.allclose(uniform_marginal(p, a_t) @ T, uniform_marginal(p, a_s), atol=1e-14)


def test_absorbing_psi_preserves_the_marginals_down_to_the_lowest_kappa():
    """MDLM: κ down to 1 - σ_max/(1 - α_s) (ReMDM's largest σ = min(1, (1 - α_s)/α_t)) is still exact."""
    _, p = data_distribution(1)
    xhat = torch.cat([p, torch.zeros(1, dtype=torch.float64)])
    for a_t, a_s in PAIRS:
        for kappa in (1 - min(1, (1 - a_s) / a_t if a_t else 1) / (1 - a_s), -0.2):
            T = torch.stack([psi_absorbing_dense(z, xhat, a_t, a_s, kappa) for z in range(K)])
            assert (T >= 0).all()
            assert torch.allclose(absorbing_marginal(p, a_t) @ T, absorbing_marginal(p, a_s), atol=1e-14)


@pytest.mark.parametrize('kind,use_float64', [('uniform', True), ('absorbing', True), ('absorbing', False)])
def test_psi_step_samples_preserve_the_marginals(kind, use_float64):
    """Check (2), Monte Carlo on the step functions: z_t ~ q_t, one Ψ-step (κ = 0.3) -> z_s ~ q_s.
    use_float64=False: the absorbing step works in float32 (upstream pitfall (f))."""
    _, p = data_distribution(1)
    g = torch.Generator().manual_seed(7)
    n, (a_t, a_s), kappa = 60_000, (0.3, 0.6), 0.3
    marginal = uniform_marginal if kind == 'uniform' else absorbing_marginal
    z = torch.multinomial(marginal(p, a_t), n, replacement=True, generator=g)[:, None]
    logits = exact_denoiser(*data_distribution(1), kind)(z, torch.full((n,), 1 - a_t)).float()
    if kind == 'uniform':
        out = samplers.uniform_step(z, logits, a_t, a_s, generator=g, kappa=kappa)
    else:
        out = samplers.absorbing_psi_step(z, logits, a_t, a_s, kappa, MASK, generator=g, use_float64=use_float64)
    counts = torch.bincount(out.flatten(), minlength=K).double()
    assert chi_square_pvalue(counts, marginal(p, a_s)) > 1e-3


def dense_psi_uniform(zt, xhat, a_t, a_s, kappa):
    """κ·posterior + (1-κ)·[α_s x̂' + (1-α_s)/K], x̂' = the posterior at α_s = 1 (SPEC-2 §13.1), dense."""
    K_ = xhat.shape[0]
    x0 = dense_uniform_posterior(zt, xhat, a_t, 1.0)
    return kappa * dense_uniform_posterior(zt, xhat, a_t, a_s) + (1 - kappa) * (a_s * x0 + (1 - a_s) / K_)


def test_psi_uniform_weights_are_the_dense_mixture():
    """Check (3): K = 5, float64: the three weights give κ·posterior + (1-κ)·renoise, and sum to Z."""
    g = torch.Generator().manual_seed(3)
    xhat = (torch.randn(5, generator=g, dtype=torch.float64) * 1.5).softmax(0)
    for a_t, a_s in ((0.0, 0.2), (0.1, 0.3), (0.6, 0.6), (0.9, 1.0)):
        for kappa in (0.0, 0.3, 0.8, 1.0):
            for zt in (0, 3):
                w_x, w_keep, w_unif = samplers.psi_uniform_weights(xhat[zt:zt + 1], 5, a_t, a_s, kappa)
                e = F.one_hot(torch.tensor(zt), 5).double()
                total = w_x + w_keep + w_unif
                assert total.item() == pytest.approx(1 - a_t + 5 * a_t * xhat[zt].item(), abs=1e-14)
                mixture = (w_x * xhat + w_keep * e + w_unif / 5) / total
                assert torch.allclose(mixture, dense_psi_uniform(zt, xhat, a_t, a_s, kappa), atol=1e-14)


def test_uniform_psi_step_with_nucleus_matches_the_dense_mixture():
    """§13.4: x_θ is truncated before the tilt; a filtered z_t (id 4) keeps no x̂ mass, only the uniform part."""
    logits, logits_fn = fixed_logits(6)
    xhat = torch.tensor([0.45, 0.3, 0.1, 0, 0, 0], dtype=torch.float64) / 0.85    # the 0.8-nucleus
    g = torch.Generator().manual_seed(4)
    n = 40_000
    for zt in (1, 4):
        z = torch.full((n, 1), zt)
        out = samplers.uniform_step(z, logits_fn(z, None), 0.4, 0.7, p_nucleus=0.8, generator=g, kappa=0.3)
        counts = torch.bincount(out.flatten(), minlength=6).double()
        assert chi_square_pvalue(counts, dense_psi_uniform(zt, xhat, 0.4, 0.7, 0.3)) > 1e-3


def test_zero_length_step_with_kappa_one_is_the_identity():
    """Check (5): s = t, κ = 1 leaves z unchanged; κ < 1 re-noises (a test that can fail)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 8, 7, generator=g)
    z = torch.randint(7, (64, 8), generator=g)
    assert torch.equal(samplers.uniform_step(z, logits.clone(), 0.4, 0.4, generator=g), z)
    assert not torch.equal(samplers.uniform_step(z, logits.clone(), 0.4, 0.4, generator=g, kappa=0.5), z)
    z[:, ::2] = 6
    assert torch.equal(samplers.absorbing_psi_step(z, logits, 0.4, 0.4, 1.0, 6, generator=g), z)
    assert not torch.equal(samplers.absorbing_psi_step(z, logits, 0.4, 0.4, 0.5, 6, generator=g), z)


def test_absorbing_psi_step_never_changes_fixed_positions():
    g = torch.Generator().manual_seed(0)
    z = torch.randint(6, (200, 6), generator=g)
    z[:, 3:] = 6
    fixed = torch.zeros(200, 6, dtype=torch.bool)
    fixed[:, :2] = True
    out = samplers.absorbing_psi_step(z, torch.randn(200, 6, 7, generator=g), 0.2, 0.3, 0.0, 6, fixed=fixed,
                                      generator=g)
    assert torch.equal(out[:, :2], z[:, :2])
    assert (out[:, 2] == 6).any() and (out[:, 3:] != 6).any()   # the others are remasked / unmasked


PROFILES = [  # (time profile, high / middle / low modes): every mode, zero-length steps, κ = 0 and κ = 1
    ('linear-constant-linear-0.5', 'max-capped-0.3', 'constant-remdm-0.2', 'max-rescale-0.5'),
    ('linear-constant-linear-0.6-inv', 'pure-pc', 'constant-0.4', 'pure-posterior')]


@pytest.mark.parametrize('kind', ['uniform', 'absorbing'])
@pytest.mark.parametrize('profile', PROFILES)
def test_psi_sampler_draws_the_data_distribution(kind, profile):
    """L = 1, exact denoiser: every Ψ-step preserves the marginals, so the samples follow the data."""
    seqs, p = data_distribution(1)
    grid, kappas = samplers.psi_schedule(7, linear_alpha, time_profile=profile[0], high_mode=profile[1],
                                         middle_mode=profile[2], low_mode=profile[3], high_frac=0.3, middle_frac=0.4)
    assert (grid[1:] == grid[:-1]).any() and (kappas[:-1] < 1).any()
    out = samplers.sample_diffusion(exact_denoiser(seqs, p, kind), 20_000, 1, K, linear_alpha, 7, kind=kind,
                                    mask_id=MASK, grid=grid, kappas=kappas, generator=torch.Generator().manual_seed(2))
    counts, probs = histogram(out, 1), target(seqs, p, 1)
    assert chi_square_pvalue(counts, probs) > 1e-3


def test_absorbing_psi_sampler_with_negative_kappas_draws_the_data_distribution():
    seqs, p = data_distribution(1)
    grid, kappas = samplers.psi_schedule(6, linear_alpha, low_mode='max-capped-0.6', high_frac=0, middle_frac=0,
                                         negative_kappa=True)
    assert (kappas < 0).any()
    out = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing'), 20_000, 1, K, linear_alpha, 6,
                                    kind='absorbing', mask_id=MASK, grid=grid, kappas=kappas,
                                    generator=torch.Generator().manual_seed(2))
    assert chi_square_pvalue(histogram(out, 1), target(seqs, p, 1)) > 1e-3


@pytest.mark.parametrize('kind,cache', [('uniform', True), ('absorbing', False), ('absorbing', True)])
def test_kappas_of_one_reproduce_the_ancestral_draws(kind, cache):
    seqs, p = data_distribution(2)
    kw = dict(kind=kind, mask_id=MASK, cache=cache, p_nucleus=0.9)
    base = samplers.sample_diffusion(exact_denoiser(seqs, p, kind), 256, 2, K, linear_alpha, 6,
                                     generator=torch.Generator().manual_seed(5), **kw)
    psi = samplers.sample_diffusion(exact_denoiser(seqs, p, kind), 256, 2, K, linear_alpha, 6,
                                    generator=torch.Generator().manual_seed(5), grid=samplers.time_grid(6),
                                    kappas=torch.ones(7, dtype=torch.float64), **kw)
    assert torch.equal(base, psi)


def test_absorbing_psi_caches_only_the_steps_with_kappa_one():
    """κ < 1: the whole batch; κ = 1: the cached step; a zero-length κ = 1 step: no call at all."""
    seqs, p = data_distribution(2)
    grid = torch.tensor([1.0, 0.6, 0.6, 0.6, 0.3, 1e-5], dtype=torch.float64)
    kappas = torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    calls = []
    out = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing', calls), 500, 2, K, linear_alpha, 5,
                                    kind='absorbing', mask_id=MASK, grid=grid, kappas=kappas,
                                    generator=torch.Generator().manual_seed(0))
    assert (out != MASK).all()
    # steps 0, 1, 3, 4 (step 2 is skipped; the noise removal finds no mask left at α = 1 - 1e-5)
    assert len(calls) == 4 and calls[1] == 500
    assert max(calls[0], calls[2], calls[3]) < 500               # cached steps run only sequences with work


def test_remdm_conf_kappa_against_a_softmax_by_hand():
    nan = math.nan
    confidence = torch.tensor([[0.9, nan, 0.2, 0.5], [nan, nan, nan, nan], [nan, 0.7, nan, nan]], dtype=torch.float64)
    for a_t, a_s in ((0.5, 0.7), (0.0, 0.4), (0.2, 0.3), (0.9, 0.95)):   # (0.2, 0.3): σ_max = 1 < 3.5
        sigma_max = 1.0 if a_t == 0 else min(1.0, (1 - a_s) / a_t)
        expected = []
        for row in confidence.tolist():
            weights = [0.0 if math.isnan(c) else math.exp(-c) for c in row]
            total = sum(weights)
            expected.append([1 - (w / total if total else 0.0) * sigma_max / (1 - a_s) for w in weights])
        got = samplers.remdm_conf_kappa(confidence, a_t, a_s)
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-14)
    assert samplers.remdm_conf_kappa(confidence, 0.5, 1.0).tolist() == [[1.0] * 4] * 3


def test_remdm_conf_remasks_in_proportion_and_tracks_confidence():
    """Remask frequency per position = η^ℓ σ_max (z-test); a fresh token stores x̂ of its id, a remasked
    one loses it."""
    n, a_t, a_s = 40_000, 0.5, 0.6
    nan = math.nan
    conf_row = torch.tensor([0.9, 0.1, 0.5, nan, nan], dtype=torch.float64)
    confidence = conf_row.expand(n, 5).clone()
    z = torch.tensor([0, 1, 2, MASK, MASK]).expand(n, 5).clone()
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1])).expand(n, 5, K).clone()
    g = torch.Generator().manual_seed(1)
    kappa = samplers.remdm_conf_kappa(confidence, a_t, a_s)
    out = samplers.absorbing_psi_step(z, logits, a_t, a_s, kappa, MASK, confidence=confidence, p_nucleus=0.8,
                                      generator=g)
    eta = torch.tensor([math.exp(-0.9), math.exp(-0.1), math.exp(-0.5)], dtype=torch.float64)
    sigma = eta / eta.sum() * min(1.0, (1 - a_s) / a_t)
    freq = (out[:, :3] == MASK).double().mean(0)
    assert ((freq - sigma).abs() / (sigma * (1 - sigma) / n).sqrt() < 4).all()
    assert confidence[:, :3][out[:, :3] == MASK].isnan().all()
    kept = (out[:, :3] != MASK)
    assert torch.equal(confidence[:, :3][kept], conf_row[:3].expand(n, 3)[kept])
    # SUBS then the 0.8-nucleus: [0.5, 0.25, 0.15] / 0.9 keeps the first two, x̂ = [2/3, 1/3, 0]
    fresh = out[:, 3:] != MASK
    assert abs(fresh.double().mean().item() - (a_s - a_t) / (1 - a_t)) < 0.01
    xhat = torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64)
    assert set(out[:, 3:][fresh].tolist()) == {0, 1}
    assert torch.allclose(confidence[:, 3:][fresh], xhat[out[:, 3:][fresh]], atol=1e-6)
    assert confidence[:, 3:][~fresh].isnan().all()


def test_remdm_conf_sampler_runs_the_whole_batch_and_leaves_no_mask():
    seqs, p = data_distribution(2)
    calls = []
    kw = dict(kind='absorbing', mask_id=MASK, remdm_conf=True)
    a = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing', calls), 300, 2, K, linear_alpha, 6,
                                  generator=torch.Generator().manual_seed(0), **kw)
    b = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing'), 300, 2, K, linear_alpha, 6,
                                  generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b) and (a != MASK).all() and calls[:6] == [300] * 6


def test_bad_psi_arguments_raise_one_clear_line():
    fn = lambda z, t: torch.zeros(*z.shape, K)
    with pytest.raises(ValueError, match=r'kappas must have shape \(5,\)'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='uniform', kappas=torch.ones(4))
    with pytest.raises(ValueError, match=r'grid must be \(5,\) non-increasing'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='uniform', grid=samplers.time_grid(4).flip(0))
    with pytest.raises(ValueError, match=r'kappa=-5.0 at step 1 .* is not a distribution'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='absorbing', mask_id=MASK,
                                  kappas=torch.tensor([1.0, -5.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match='ReMDM-conf is an absorbing'):
        samplers.sample_diffusion(fn, 2, 2, K, linear_alpha, 4, kind='uniform', remdm_conf=True)
    with pytest.raises(ValueError, match=r'kappa=1.5 must be in \[0, 1\]'):
        samplers.uniform_step(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, K), 0.1, 0.2, kappa=1.5)


# ------------------------------------------------------------------------- conditioning (SPEC-2 §15)

def random_logits(K_, seed=0):
    """A denoiser of random logits (every token can change at every step), recording every input."""
    g = torch.Generator().manual_seed(seed)
    inputs = []

    def logits_fn(z, t):
        inputs.append(z.clone())
        return torch.randn(*z.shape, K_, generator=g) * 2
    return logits_fn, inputs


def prompt_fixed(B, L, K_, mask_id=None, seed=0):
    """(mask, tokens) (B, L): row b holds positions 0..b % 3 and position L - 2 (an infilling template)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, :b % 3 + 1] = True
    mask[:, L - 2] = True
    tokens = torch.randint(K_, (B, L), generator=g)
    if mask_id is not None:
        tokens[tokens == mask_id] = (mask_id + 1) % K_
    return mask, tokens


SAMPLER_CASES = [  # (kind, keyword arguments): every sampler and noise removal, nucleus, Ψ, ReMDM-conf
    ('uniform', {}), ('uniform', {'noise_removal': 'greedy'}), ('uniform', {'noise_removal': 'none'}),
    ('uniform', {'p_nucleus': 0.6}), ('uniform', {'kappas': 'psi'}),
    ('absorbing', {'cache': True}), ('absorbing', {'cache': False}), ('absorbing', {'noise_removal': 'greedy'}),
    ('absorbing', {'p_nucleus': 0.6}), ('absorbing', {'kappas': 'psi'}), ('absorbing', {'remdm_conf': True}),
    ('absorbing', {'step': samplers.sedd_step}), ('absorbing', {'step': samplers.d3pm_step}),  # SEDD, D3PM
]


@pytest.mark.parametrize('kind, kw', SAMPLER_CASES)
def test_fixed_positions_never_change_at_any_step(kind, kw):
    """Check (1): the network sees y_F at F at every call, and the output holds it."""
    B, L, K_, steps = 12, 7, 6, 6
    mask_id = K_ - 1 if kind == 'absorbing' else None
    fixed = prompt_fixed(B, L, K_, mask_id)
    logits_fn, inputs = random_logits(K_)
    kw = dict(kw)
    if kw.get('kappas') == 'psi':  # κ < 1 at every step: re-noising / remasking everywhere but F
        kw['grid'], kw['kappas'] = samplers.psi_schedule(steps, linear_alpha, high_mode='constant-0.3',
                                                         middle_mode='constant-0.3', low_mode='constant-0.3')
    out = samplers.sample_diffusion(logits_fn, B, L, K_, linear_alpha, steps, kind=kind, mask_id=mask_id,
                                    generator=torch.Generator().manual_seed(1), fixed=fixed, **kw)
    assert len(inputs) >= 2
    mask, tokens = fixed
    for z in inputs:
        if len(z) == B:
            assert torch.equal(z[mask], tokens[mask])
        else:  # the cached sampler passes a subset of the rows: each must hold some row's y_F
            assert all(any(torch.equal(row[mask[b]], tokens[b][mask[b]]) for b in range(B)) for row in z)
    assert torch.equal(out[mask], tokens[mask])
    free_changed = (out != tokens) & ~mask
    assert free_changed.any()  # the free positions are drawn (a test that can fail)


def test_cached_absorbing_sampler_sees_the_prompt_in_every_row_it_runs():
    """The cached sampler calls the network on subsets of rows: each row it passes holds its own y_F."""
    B, L, K_ = 9, 6, 5
    fixed = prompt_fixed(B, L, K_, mask_id=4)
    seen = []

    def logits_fn(z, t):
        seen.append(z.clone())
        return torch.zeros(*z.shape, K_)
    real = samplers._absorbing_fill

    def spy(logits_fn_, z, fill, *args, **kwargs):
        rows = fill.any(1).nonzero().squeeze(1)
        assert torch.equal(z[rows][fixed[0][rows]], fixed[1][rows][fixed[0][rows]])
        return real(logits_fn_, z, fill, *args, **kwargs)
    samplers._absorbing_fill = spy
    try:
        out = samplers.sample_diffusion(logits_fn, B, L, K_, linear_alpha, 20, kind='absorbing', mask_id=4,
                                        generator=torch.Generator().manual_seed(0), fixed=fixed)
    finally:
        samplers._absorbing_fill = real
    assert any(len(z) < B for z in seen) and torch.equal(out[fixed[0]], fixed[1][fixed[0]])


def conditional_target(seqs, p, position, token, length):
    """p(x_free | x_position = token) over the K^L histogram cells (the fixed position included)."""
    keep = seqs[:, position] == token
    out = target(seqs[keep], p[keep] / p[keep].sum(), length)
    return out


@pytest.mark.parametrize('steps', [200, pytest.param(2000, marks=pytest.mark.slow)])
def test_mdlm_with_an_exact_denoiser_samples_the_conditional(steps):
    """Check (2): L = 3, position 1 fixed to y, exact absorbing denoiser, many steps, cached sampler:
    the two free tokens follow p(x_0, x_2 | x_1 = y) (the model's own conditional, SPEC-2 §15). Two
    tokens unmasked in one step are drawn independently (TV ~ 0.37 / steps, as unconditionally):
    200 steps in the fast suite, SPEC-2's 2000 in the slow one."""
    seqs, p = data_distribution(3)
    n, y = 20_000, 2
    mask = torch.zeros(n, 3, dtype=torch.bool)
    mask[:, 1] = True
    fixed = (mask, torch.full((n, 3), y))
    out = samplers.sample_diffusion(exact_denoiser(seqs, p, 'absorbing'), n, 3, K, linear_alpha, steps,
                                    kind='absorbing', mask_id=MASK, generator=torch.Generator().manual_seed(0),
                                    fixed=fixed)
    assert (out[:, 1] == y).all()
    counts, probs = histogram(out, 3), conditional_target(seqs, p, 1, y, 3)
    assert chi_square_pvalue(counts, probs) > 1e-3
    unconditional = target(seqs, p, 3)
    marginal_free = lambda h: h.reshape(K, K, K).sum(1).flatten()
    # a test that can fail: the unconditional law of the free tokens is far from the conditional one
    assert 0.5 * (marginal_free(unconditional) - marginal_free(probs)).abs().sum() > 0.1


def clamped_uniform_law(seqs, p, position, token, steps):
    """The exact law (K^2,) of the two free tokens of L = 3 under the DUO clamp (position fixed to
    token) with the exact uniform-state denoiser, by enumeration: start uniform, each step draws the
    free tokens independently from the Bayes posterior q(z_s | z_t, x) = q(z_t | z_s) q(z_s | x) /
    q(z_t | x) with the vector x̂ plugged in for x, then noise removal to alpha = 1."""
    states = list(itertools.product(range(K), repeat=2))
    free = [l for l in range(3) if l != position]
    dist = torch.full((len(states),), 1 / len(states), dtype=torch.float64)
    grid = samplers.time_grid(steps)
    pairs = [(grid[i], grid[i + 1]) for i in range(steps)] + [(grid[-1], None)]
    for t, s in pairs:
        a_t = linear_alpha(t).item()
        a_s = 1.0 if s is None else linear_alpha(s).item()
        z = torch.zeros(len(states), 3, dtype=torch.long)
        z[:, free] = torch.tensor(states)
        z[:, position] = token
        xhat = leave_one_out_posterior(z, t.float().expand(len(states)), seqs, p)     # (n, 3, K)
        ratio = a_t / a_s
        moves = []
        for l in free:
            keep = F.one_hot(z[:, l], K).double()                                     # q(z_t | z_s = j): (n, K)
            likelihood = ratio * keep + (1 - ratio) / K
            prior = a_s * xhat[:, l] + (1 - a_s) / K                                   # q(z_s = j | x̂)
            post = likelihood * prior
            moves.append(post / post.sum(-1, keepdim=True))
        transition = torch.einsum('na,nb->nab', *moves).reshape(len(states), -1)
        dist = dist @ transition
    return dist


def test_duo_clamp_follows_its_exact_law_and_is_not_the_conditional():
    """The DUO clamp (SPEC-2 §15): with the exact uniform-state denoiser, L = 3 and position 1 fixed,
    the sampler's free tokens follow the clamped chain's law computed by enumeration (chi-square);
    that law is NOT p(x_free | y) (the denoiser reads y as a noisy token), but much closer to it than
    the unconditional law: TV 0.04 against 0.22 at 64 steps for this distribution."""
    seqs, p = data_distribution(3)
    n, y, steps = 40_000, 1, 4
    mask = torch.zeros(n, 3, dtype=torch.bool)
    mask[:, 1] = True
    out = samplers.sample_diffusion(exact_denoiser(seqs, p, 'uniform'), n, 3, K, linear_alpha, steps, kind='uniform',
                                    generator=torch.Generator().manual_seed(0), fixed=(mask, torch.full((n, 3), y)))
    assert (out[:, 1] == y).all()
    counts = torch.bincount(out[:, 0] * K + out[:, 2], minlength=K * K).double()
    law = clamped_uniform_law(seqs, p, 1, y, steps)
    assert chi_square_pvalue(counts, law) > 1e-3
    joint = conditional_target(seqs, p, 1, y, 3).reshape(K, K, K).sum(1).flatten()   # p(x_0, x_2 | x_1 = y)
    unconditional = target(seqs, p, 3).reshape(K, K, K).sum(1).flatten()
    many = clamped_uniform_law(seqs, p, 1, y, 64)
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()
    assert 0.02 < tv(many, joint) < 0.5 * tv(unconditional, joint)


# ---- AR with a prompt

def test_ar_prompt_through_the_kv_cache_gives_the_logits_of_a_full_recompute():
    """Check (4): prompts of different lengths per row; every logits row the sampler draws from (or
    teacher-forces through) equals the full forward of the final tokens at that position."""
    torch.manual_seed(0)
    L, B = 12, 4
    model = DiT(11, 32, 16, 2, 4, L, causal=True).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    cache = model.init_kv_cache(B, L)
    recorded = []

    def cached(tokens):
        logits = model(tokens, kv_cache=cache)[:, -1]
        recorded.append((cache.length, logits.clone()))
        return logits

    lengths = [1, 3, 5, 2]
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    prompt = torch.randint(10, (B, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = samplers.sample_ar(cached, B, L, bos_id=10, generator=torch.Generator().manual_seed(2),
                                 fixed=(mask, prompt))
        full = model(out)
    assert torch.equal(out[mask], prompt[mask])
    assert recorded[0][0] == min(lengths)                   # the common prefix in one call
    assert [n for n, _ in recorded] == list(range(min(lengths), L))
    for n, logits in recorded:                               # logits of the token at position n
        torch.testing.assert_close(logits, full[:, n - 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match='only continue a prefix'):
        samplers.sample_ar(cached, B, L, bos_id=10, fixed=(~mask, prompt))


# ---- semi-autoregressive windows

def test_semi_ar_length_and_window_overlaps():
    """Check (3): output length L + n stride, window r + 1 holds the last L - stride tokens of window
    r, the output is w_0[:s] + ... + w_{n-1}[:s] + w_n, and a canvas-wide prompt reaches the windows
    it overlaps."""
    B, L, s, n = 3, 8, 3, 4
    g = torch.Generator().manual_seed(0)
    calls = []

    def window_fn(held):
        drawn = torch.randint(50, 99, (B, L), generator=g)
        out = drawn if held is None else torch.where(held[0], held[1], drawn)
        calls.append((None if held is None else (held[0].clone(), held[1].clone()), out))
        return out

    total = samplers.semi_ar_length(L, s, n)
    prompt_mask = torch.zeros(B, total, dtype=torch.bool)
    prompt_mask[:, :L + 1] = True                          # longer than one window
    prompt = torch.arange(total).expand(B, total)
    ids, lengths = samplers.sample_semi_ar(window_fn, B, L, s, n, fixed=(prompt_mask, prompt))
    assert ids.shape == (B, L + n * s) == (B, 20) and (lengths == 20).all()
    assert len(calls) == n + 1
    for r in range(1, n + 1):
        held, _ = calls[r]
        assert held[0][:, :L - s].all()
        assert torch.equal(held[1][:, :L - s], calls[r - 1][1][:, s:])   # the overlap, equal
    expected = torch.cat([calls[r][1][:, :s] for r in range(n)] + [calls[n][1]], 1)
    assert torch.equal(ids, expected)
    assert torch.equal(ids[:, :L + 1], prompt[:, :L + 1])
    assert calls[1][0][0][:, L - s].all() and not calls[1][0][0][:, L - s + 1:].any()  # the prompt's last token
    ids, _ = samplers.sample_semi_ar(window_fn, B, L, s, 0)
    assert ids.shape == (B, L)
    for bad in ((0, 1), (L, 1), (2, -1)):
        with pytest.raises(ValueError, match='sampling.(stride_length|num_strides)'):
            samplers.sample_semi_ar(window_fn, B, L, *bad)


def test_semi_ar_stops_drawing_windows_once_every_row_has_ended():
    B, L, s = 2, 6, 2
    calls = []
    ends = iter([[-1, 5], [7, -1], [-1, -1]])

    def window_fn(held):
        calls.append(held)
        return torch.zeros(B, L, dtype=torch.long)

    def stop(ids):
        return torch.tensor(next(ends))
    ids, lengths = samplers.sample_semi_ar(window_fn, B, L, s, 5, stop=stop)
    assert len(calls) == 2 and ids.shape == (B, L + s) and lengths.tolist() == [7, 5]


# ---- variable length

def test_eos_lengths_on_crafted_sequences():
    """Check (5): a row ends right after its first EOS at a position >= max(start, 1)."""
    E = 9
    ids = torch.tensor([[E, 1, 2, 3, 4, 5, 6, 7],     # EOS only at 0 (the BOS, GPT-2): goes on
                        [E, 1, E, 3, E, 5, 6, 7],     # first EOS after the BOS at 2 -> length 3
                        [1, E, 2, 3, 4, E, 6, 7],     # EOS inside the prompt (start 3) does not count -> 6
                        [1, 2, 3, 4, 5, 6, 7, E],     # at the last position -> 8
                        [1, 2, 3, 4, 5, 6, 7, 8]])    # none
    start = torch.tensor([0, 0, 3, 0, 0])
    assert samplers.eos_lengths(ids, E, start).tolist() == [-1, 3, 6, 8, -1]


def test_low_entropy_tail_and_the_window_rule():
    W = samplers.ENTROPY_WINDOW
    g = torch.Generator().manual_seed(0)
    varied = torch.randint(200, (1, W + 40), generator=g)         # entropy ~ log 200 = 5.3 nats
    repeated = varied.clone()
    repeated[0, -W:] = torch.arange(W) % 30                         # the last 256 tokens: 30 ids, log 30 = 3.4
    ids = torch.cat([varied, repeated])
    assert samplers.low_entropy_tail(ids, 200).tolist() == [False, True]
    assert not samplers.low_entropy_tail(ids[:, :W], 200).any()     # not longer than the window
    assert not samplers.low_entropy_tail(ids, 35).any()             # log 35 < 4 nats: the rule is off
    E = 250
    ids[0, 5] = E
    ids[1, 3] = E
    lengths = samplers.window_stop(ids, E, torch.zeros(2, dtype=torch.long), 251)
    assert lengths.tolist() == [6, 4]                               # the EOS rule comes first
    ids[1, 3] = 0
    assert samplers.window_stop(ids, E, torch.tensor([0, 0]), 251).tolist() == [6, W + 40 - W]
