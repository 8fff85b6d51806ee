"""Gaussian latents of the duality (SPEC §5): w = alpha~ onehot(x0) + sigma~ eps, eps ~ N(0, I_K).

argmax(w) is uniform-state noise with alpha = T(gamma); the DUO curriculum also feeds the network
the relaxed one-hot softmax(w / tau), and distillation needs the argmax at two noise levels of one
eps. Shapes: x0 (B, L) int64 ids, gamma (B,) per sequence; K the vocabulary size.

eps is drawn in row blocks that stay in cache through the passes over them, so nothing of size
(B, L, K) exists but the relaxed input itself. On the CPU the draw is most of the cost (torch's
normal_ there is one serial Mersenne Twister), so the blocks are shared out between RANDOM_STREAMS
generators, seeded from the global one (a run reproduces and resumes exactly), and drawn on a
thread pool. The streams, not the threads, fix the numbers: results do not depend on the core count.
"""
import functools
import math
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
