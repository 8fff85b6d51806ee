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
