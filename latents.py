"""Gaussian latents of the duality (SPEC §5): w = alpha~ onehot(x0) + sigma~ eps, eps ~ N(0, I_K).

argmax(w) is uniform-state noise with alpha = T(gamma); the DUO curriculum also feeds the network
the relaxed one-hot softmax(w / tau), and distillation needs the argmax at two noise levels of one
eps. Shapes: x0 (B, L) int64 ids, gamma (B,) per sequence; K the vocabulary size. The Duo++ top-k
relaxation (SPEC-2 §14, at the end) draws only the k largest coordinates: O(B L k), whatever K.

eps is drawn in row blocks that stay in cache through the passes over them, so nothing of size
(B, L, K) exists but the relaxed input itself. On the CPU the draw is most of the cost (torch's
normal_ there is one serial Mersenne Twister), so the blocks are shared out between RANDOM_STREAMS
generators, seeded from the global one (a run reproduces and resumes exactly), and drawn on a
thread pool. The streams, not the threads, fix the numbers: results do not depend on the core count.
"""
import functools
import math
import numbers
from concurrent.futures import ThreadPoolExecutor

import torch

import losses
import noise_schedule

RANDOM_STREAMS = 8


def relaxed_gaussian_latent(x0, gamma, vocab_size, tau):
    """Draw w = alpha~ onehot(x0) + sigma~ eps; return (argmax w (B, L), softmax(w / tau) (B, L, K) float32).

    Each block becomes its softmax in place: argmax(alpha~ x + sigma~ eps) = argmax(eps + (alpha~ / sigma~) x),
    and softmax(w / tau) = softmax((eps + (alpha~ / sigma~) x - max) sigma~ / tau), the max subtracted first.
    """
    alpha_g, sigma_g = noise_schedule.gaussian_alpha_sigma(gamma.float())
    (B, L), K = x0.shape, vocab_size
    w = torch.empty(B * L, K, device=x0.device)
    xt = torch.empty(B * L, dtype=torch.long, device=x0.device)
    ratio = (alpha_g / sigma_g).repeat_interleave(L)[:, None]  # (B L, 1)
    scale = (sigma_g / tau).repeat_interleave(L)[:, None]
    ids = x0.reshape(-1, 1)

    def visit(sel, block):
        block.scatter_add_(1, ids[sel], ratio[sel])
        top, xt[sel] = row_max(block)
        block.sub_(top[:, None]).mul_(scale[sel]).exp_()
        block.mul_(block.sum(-1, keepdim=True).reciprocal_())

    _each_gaussian_block(B * L, K, x0.device, visit, out=w)
    return xt.view(B, L), w.view(B, L, K)


def shared_noise_latents(x0, gamma_t, gamma_s, vocab_size):
    """(z_t, z_s) = argmax of alpha~ x + sigma~ eps at gamma_t and gamma_s with one shared eps, each (B, L)."""
    (B, L), K = x0.shape, vocab_size
    ratio_t = torch.exp(-gamma_t.float() / 2).repeat_interleave(L)[:, None]  # alpha~ / sigma~ = e^{-gamma / 2}
    ratio_s = torch.exp(-gamma_s.float() / 2).repeat_interleave(L)[:, None]
    ids = x0.reshape(-1, 1)
    zt = torch.empty(B * L, dtype=torch.long, device=x0.device)
    zs = torch.empty_like(zt)

    def visit(sel, eps):
        eps.scatter_add_(1, ids[sel], ratio_t[sel])
        zt[sel] = row_max(eps)[1]
        eps.scatter_add_(1, ids[sel], ratio_s[sel] - ratio_t[sel])
        zs[sel] = row_max(eps)[1]

    _each_gaussian_block(B * L, K, x0.device, visit)
    return zt.view(B, L), zs.view(B, L)


def standard_normal(n_rows: int, K: int, device) -> torch.Tensor:
    """The eps (n_rows, K) the two functions above draw for n_rows = B L from the generators' current state."""
    eps = torch.empty(n_rows, K, device=device)
    _each_gaussian_block(n_rows, K, torch.device(device), lambda sel, block: None, out=eps)
    return eps


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the maximum of each row of x (R, K), the first index on ties: x.max(-1).

    On the CPU, torch's argmax is a scalar loop (5x slower than amax); here a vectorised amax over
    column groups of about sqrt(K) finds each row's group, and argmax runs inside that group only.
    """
    R, K = x.shape
    group = max(math.isqrt(K), 1)
    if x.device.type != 'cpu' or K < 4 * group:
        return x.max(-1)
    n_groups = K // group
    grouped = x[:, :n_groups * group].view(R, n_groups, group)
    values, g = grouped.amax(-1).max(-1)  # (R,): the first group holding the row's maximum
    indices = g * group + grouped[torch.arange(R, device=x.device), g].argmax(-1)
    if n_groups * group < K:  # leftover columns come after every group: they win only if strictly larger
        tail_values, tail_indices = x[:, n_groups * group:].max(-1)
        later = tail_values > values
        values = torch.where(later, tail_values, values)
        indices = torch.where(later, tail_indices + n_groups * group, indices)
    return values, indices


def _each_gaussian_block(n_rows, K, device, visit, out=None):
    """Call visit(rows, eps) for row blocks covering n_rows, eps (rows, K) freshly drawn from N(0, 1).

    eps is a view of `out` (n_rows, K) when given, else a reused scratch block per random stream.
    """
    step = losses.block_rows(K, device)
    blocks = [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]

    def draw(stream_blocks, generator):
        scratch = None if out is not None else torch.empty(step, K, device=device)
        for sel in stream_blocks:
            eps = out[sel] if out is not None else scratch[:sel.stop - sel.start]
            visit(sel, eps.normal_(generator=generator))

    if device.type != 'cpu':  # the device's own generator is parallel already
        return draw(blocks, None)
    seeds = torch.randint(0, 2 ** 63 - 1, (RANDOM_STREAMS,)).tolist()
    jobs = [(blocks[i::RANDOM_STREAMS], torch.Generator().manual_seed(seeds[i]))
            for i in range(min(RANDOM_STREAMS, len(blocks)))]
    threads = min(torch.get_num_threads(), len(jobs))
    if threads == 1:
        for job in jobs:
            draw(*job)
        return
    # list() re-raises a worker's exception here
    list(_pool(threads).map(lambda job: draw(*job), jobs))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix='gaussian-latent')


# ---------------------------------------------------------------------------------------------
# Top-k Gaussian latents (Duo++ efficient curriculum, SPEC-2 §14). Per position only the k largest
# of the N = K - 1 "other" coordinates w_j ~ N(0, sigma~^2) are drawn, as order statistics, plus the
# true coordinate W_m = alpha~ + sigma~ eps; the other N - k coordinates are iid N(0, sigma~^2)
# truncated to (-inf, V_k) and enter only through their expected share of the softmax denominator.
# Everything is (B L, k): no (B, L, K) tensor exists, so the cost does not depend on K.
def topk_gaussian_latent(x0, gamma, vocab_size, tau, k):
    """The k retained coordinates of w = alpha~ onehot(x0) + sigma~ eps and the softmax denominator estimate.

    x0 (B, L) int64, gamma (B,), tau > 0, 1 <= k <= K - 1. Returns
    - xt (B, L) int64: argmax of the full latent w, exactly (x0 iff W_m > V_1, else the id of V_1);
    - ids (B, L, k) int64: the ids of R, the k largest of {V_1..V_k, W_m}, sorted by value
      (ids[..., 0] == xt); the ids of V_1..V_k are a uniformly random injection into the K - 1 ids != x0;
    - values (B, L, k) float64 (float32 on mps): w at those ids, descending;
    - log_denominator (B, L), same dtype: log D^ with D^ = sum_j e^{V_j / tau} + e^{W_m / tau} + (N - k) mu(V_k),
      mu(c) = E[e^{X / tau} | X < c], X ~ N(0, sigma~^2): E[D^ | V, W_m] = E[sum_all e^{w / tau} | V, W_m].
    Random numbers come from torch's global generator (of x0's device): a seed reproduces the draw.
    """
    (B, L), K = x0.shape, vocab_size
    _check_topk(k, K, tau)
    k, N, n, device = int(k), K - 1, B * L, x0.device
    dtype = torch.float32 if device.type == 'mps' else torch.float64  # mps has no float64
    alpha_g, sigma_g = noise_schedule.gaussian_alpha_sigma(gamma.to(dtype))
    sigma = sigma_g.repeat_interleave(L)[:, None]  # (n, 1)
    # Order statistics of N uniforms from the top: U_(j) = U_(j-1) u_j^{1/(N-j+1)}, in log space;
    # log1p(-rand) is log of a U(0, 1] draw (never log 0). 1 - U_(j) ~ j / N is recovered exactly
    # with expm1, so V_j = sigma~ Phi^{-1}(U_(j)) = -sigma~ Phi^{-1}(1 - U_(j)) keeps its precision.
    log_u = torch.log1p(-torch.rand(n, k, device=device, dtype=dtype))
    divisors = torch.arange(N, N - k, -1, device=device, dtype=dtype)
    log_order = torch.cumsum(log_u / divisors, dim=1)
    top = -sigma * torch.special.ndtri(-torch.expm1(log_order))  # (n, k): V_1 > ... > V_k
    true = alpha_g.repeat_interleave(L) + sigma[:, 0] * torch.randn(n, device=device, dtype=dtype)  # W_m
    m = x0.reshape(n)
    others = _random_injection(n, k, N, device)
    others += (others >= m[:, None]).long()  # {0..N-1} -> the ids != m

    # R: W_m replaces V_k when larger, inserted at its rank p (the number of V_1..V_{k-1} above it).
    inside = true > top[:, -1]
    rank = (top[:, :-1] > true[:, None]).sum(1)
    slot = torch.arange(k, device=device)
    source = slot - (inside[:, None] & (slot > rank[:, None])).long()  # slots after W_m hold V_{slot-1}
    at_true = inside[:, None] & (slot == rank[:, None])
    values = torch.where(at_true, true[:, None], top.gather(1, source))
    ids = torch.where(at_true, m[:, None], others.gather(1, source))

    log_tail = math.log(N - k) + _log_truncated_exp_mean(top[:, -1], sigma[:, 0], tau) if k < N else None
    terms = [top / tau, true[:, None] / tau] + ([log_tail[:, None]] if log_tail is not None else [])
    log_denominator = torch.logsumexp(torch.cat(terms, dim=1), dim=1)
    return ids[:, 0].view(B, L), ids.view(B, L, k), values.view(B, L, k), log_denominator.view(B, L)


def topk_relaxed_latent(x0, gamma, vocab_size, tau, k):
    """The Duo++ top-k relaxed input: (xt (B, L) int64, ids (B, L, k) int64, weights (B, L, k) float32).

    xt = argmax of the Gaussian latent w (uniform-state noise with alpha = T(gamma), as for
    relaxed_gaussian_latent); weights = e^{v / tau} / D^ at the k retained coordinates (ids,
    topk_gaussian_latent), the stand-in for softmax(w / tau) restricted to them: sum < 1, the mass of
    the rest is dropped. weights[..., 0] (the slot of xt) is > 1 / K: D^ < K e^{max w / tau}, so the
    weights never all underflow. The model input is sum_slots weights * E[ids] (DiT(ids, sigma, weights=)).
    """
    xt, ids, values, log_denominator = topk_gaussian_latent(x0, gamma, vocab_size, tau, k)
    return xt, ids, torch.exp(values / tau - log_denominator[..., None]).float()


def _check_topk(k, vocab_size, tau):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= vocab_size - 1:
        raise ValueError(f'algo.curriculum.top_k={k!r} must be an integer in [1, K-1 = {vocab_size - 1}] '
                         f'(e.g. algo.curriculum.top_k=2)')
    if not tau > 0:
        raise ValueError(f'the curriculum temperature tau={tau!r} must be > 0 '
                         f'(e.g. algo.gumbel_tau_log10_end=-3)')


def _random_injection(n, k, N, device):
    """(n, k) int64: per row, k distinct values of {0..N-1} in a uniformly random order.

    Floyd's algorithm gives a uniform k-subset but not in a uniform order (its first slot is
    uniform on {0..N-k} only), so the slots are then shuffled: every ordered k-tuple is equally likely.
    """
    out = torch.empty(n, k, dtype=torch.long, device=device)
    for t, i in enumerate(range(N - k, N)):
        j = torch.randint(0, i + 1, (n,), device=device)
        taken = (out[:, :t] == j[:, None]).any(1)  # j chosen already: take i, which cannot be yet
        out[:, t] = torch.where(taken, i, j)
    if k == 1:
        return out
    return out.gather(1, torch.rand(n, k, device=device).argsort(1))


def _log_truncated_exp_mean(c, sigma, tau):
    """log E[e^{X / tau} | X < c], X ~ N(0, sigma^2), elementwise (c, sigma same shape).

    = s^2 / 2 + log Phi(a - s) - log Phi(a) with a = c / sigma, s = sigma / tau (SPEC-2 §14). At small
    tau s^2 / 2 is huge (tau = 1e-9: 1e17) and cancels against log Phi(a - s); with y = a - s the same
    value is c / tau - a^2 / 2 + [y^2 / 2 + log Phi(y)] - log Phi(a), and for y < 0 the bracket is
    log(erfcx(-y / sqrt 2) / 2) (Phi(y) = erfcx(-y / sqrt 2) e^{-y^2/2} / 2): no cancellation at any tau.
    """
    a = c / sigma
    y = a - sigma / tau
    low = torch.log(torch.special.erfcx(-y.clamp(max=0) / math.sqrt(2)) / 2)
    high = y.clamp(min=0) ** 2 / 2 + torch.special.log_ndtr(y.clamp(min=0))
    return c / tau - a ** 2 / 2 + torch.where(y < 0, low, high) - torch.special.log_ndtr(a)
