"""Samplers (SPEC §6): ancestral sampling of uniform-state (DUO) and absorbing (MDLM) diffusion,
and autoregressive sampling with a KV cache.

Everything here is a pure function of its inputs and of `generator`. Shapes: B batch, L length,
K classes, N = number of rows (tokens) being drawn. The denoiser is passed as a function that
returns LOGITS, so that the samplers only touch the (rows, K) slices they need:

- uniform-state step: per token, a three-component mixture with scalar weights (draw from x̂, keep
  z_t, draw a uniform id). Only x̂_{z_t} (one log-softmax per row) is needed for every token; a
  draw from x̂ is needed only for the tokens that pick that component.
- absorbing step: which masked tokens unmask does not depend on x̂, so it is decided first, and
  the network runs only on the sequences that have a token to fill (`cache=True`).
- SEDD `analytic` and D3PM steps (SPEC-2 §11, §12): the unmask probability of a masked token does
  depend on the network (its score mass S, resp. x̂_mask), so they take the step's logits; one pass
  per masked row gives it, then the token is drawn like the absorbing step's.

Categorical draws are (two-level) Gumbel-max over the logits with noise drawn in float64 by
default (low-precision noise truncates the Gumbel tail and lowers sample entropy), in row chunks
of bounded size.
"""
import math

import torch

from progress import steps as progress_steps

KINDS = ('uniform', 'absorbing')
NOISE_REMOVAL = ('ancestral', 'greedy', 'none')
T_MIN = 1e-5
# Elements (rows x K) of one chunk of temporaries (Gumbel noise, log-softmax, sorted probabilities):
# small enough to bound memory and, on CPU, to stay cheap to allocate; large on GPUs, where every
# chunk costs kernel launches.
CHUNK_ELEMENTS = {'cpu': 1 << 22, 'cuda': 1 << 26}


# ---------------------------------------------------------------------------- argument checks

def check_steps(steps):
    if int(steps) != steps or steps < 1:
        raise ValueError(f"sampling.steps={steps} must be an integer >= 1 (e.g. sampling.steps=128)")


def check_p_nucleus(p_nucleus):
    if not 0 < p_nucleus <= 1:
        raise ValueError(f"sampling.p_nucleus={p_nucleus} must be in (0, 1] (e.g. sampling.p_nucleus=0.9)")


def check_noise_removal(noise_removal):
    if noise_removal not in NOISE_REMOVAL:
        raise ValueError(f"sampling.noise_removal={noise_removal} is unknown; use one of "
                         f"{', '.join(NOISE_REMOVAL)} (e.g. sampling.noise_removal=ancestral)")


# ---------------------------------------------------------------------------- building blocks

def time_grid(steps: int, t_min: float = T_MIN, device=None) -> torch.Tensor:
    """(steps + 1,) float64 times t_0 = 1 > ... > t_S = t_min, equally spaced."""
    check_steps(steps)
    return torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64, device=device)


def _row_chunks(n_rows: int, width: int, device) -> list[tuple[int, int]]:
    elements = CHUNK_ELEMENTS.get(torch.device(device).type, CHUNK_ELEMENTS['cpu'])
    rows = max(1, elements // max(width, 1))
    return [(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def gumbel_argmax(logits: torch.Tensor, generator=None, use_float64: bool = True) -> torch.Tensor:
    """One draw per row of softmax(logits): logits (N, K), -inf allowed -> ids (N,) int64.

    Gumbel-max in two levels, so that a row needs about 2 sqrt(K) Gumbel draws instead of K:
    the classes are split into consecutive groups of W (the last one shorter when W does not
    divide K); a group g is drawn by Gumbel-max over the groups' log masses log M_g (M_g = sum
    of exp(l_j) over the group), then a class j inside it by Gumbel-max over the group's logits.
    P(g) P(j | g) = (M_g / M)(exp(l_j) / M_g) = softmax(l)_j: the distribution of one Gumbel-max
    over all K classes. The noise is float64 when use_float64 (low-precision noise truncates the
    Gumbel tail and lowers sample entropy); the log masses are float32 logsumexps (a relative
    error of about 1e-7, no truncation).
    """
    N, K = logits.shape
    dtype = torch.float64 if use_float64 else torch.float32
    width = _group_width(K)
    full = K // width * width
    out = torch.empty(N, dtype=torch.long, device=logits.device)
    for start, end in _row_chunks(N, K, logits.device):
        rows = logits[start:end]
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        log_mass = _log_group_masses(rows[:, :full].reshape(-1, full // width, width))
        if full < K:
            log_mass = torch.cat([log_mass, _log_group_masses(rows[:, None, full:])], dim=1)
        group = _add_gumbel(log_mass.to(dtype), generator).argmax(-1)  # (n,) a group of -inf logits: -inf
        cols = group[:, None] * width + torch.arange(width, device=rows.device)  # (n, W)
        outside = cols >= K  # the last, shorter group
        inside = rows.gather(1, cols.clamp_(max=K - 1)).to(dtype).masked_fill_(outside, float('-inf'))
        out[start:end] = cols.gather(1, _add_gumbel(inside, generator).argmax(-1, keepdim=True))[:, 0]
    return out


def _log_group_masses(groups: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last dim of (n, G, W) logits, each group shifted by its own max (no
    underflow; a group of -inf logits gets -inf). Faster than torch.logsumexp on small groups."""
    top = groups.amax(-1, keepdim=True)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))
    return (groups - top).exp_().sum(-1).log_().add_(top[..., 0])


def _group_width(K: int) -> int:
    """Classes per group of gumbel_argmax: about sqrt(K) (fewest draws per row)."""
    return max(1, round(K ** 0.5))


def _add_gumbel(x: torch.Tensor, generator) -> torch.Tensor:
    """In place: x + G, G = -log(-log U) standard Gumbel noise of x's dtype. U is clamped into
    [tiny, 1 - eps] so that G is finite and a -inf entry can never win an argmax."""
    info = torch.finfo(x.dtype)
    noise = torch.empty_like(x).uniform_(generator=generator).clamp_(info.tiny, 1 - info.eps)
    return x.add_(noise.log_().neg_().log_().neg_())


def top_k_filter_(logits: torch.Tensor, k: int) -> torch.Tensor:
    """In place on logits (N, K): all but the k largest logits of each row become -inf (k = 0: off)."""
    if k < 0:
        raise ValueError(f"sampling.top_k={k} must be >= 0 (0 = off; e.g. sampling.top_k=50)")
    if 0 < k < logits.shape[-1]:
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float('-inf'))
    return logits


def nucleus_filter_(logits: torch.Tensor, p_nucleus: float) -> torch.Tensor:
    """In place on logits (N, K): keep, per row, the most probable classes whose total probability
    first reaches p_nucleus (classes tied with the last one kept are kept too); the rest -> -inf."""
    check_p_nucleus(p_nucleus)
    if p_nucleus == 1:
        return logits
    for start, end in _row_chunks(logits.shape[0], logits.shape[1], logits.device):
        chunk = logits[start:end]
        probs = chunk.float().softmax(-1)
        ranked = probs.sort(dim=-1, descending=True).values
        mass_before = ranked.cumsum(-1) - ranked
        n_keep = (mass_before < p_nucleus).sum(-1, keepdim=True).clamp_(min=1)
        threshold = ranked.gather(-1, n_keep - 1)
        chunk.masked_fill_(probs < threshold, float('-inf'))
    return logits


def log_softmax_at_(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] per row: logits (N, K), ids (N,) -> (N,) float64.

    float32 and float64 logits become their log-softmax in place (a draw from them is the same:
    Gumbel-max does not see a per-row shift); other dtypes are converted chunk by chunk and left
    as they are. log_softmax in row chunks: its fused kernel is cheaper than a separate max / exp /
    sum (and handles -inf logits), and in place it writes no new memory.
    """
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for start, end in _row_chunks(logits.shape[0], logits.shape[1], logits.device):
        chunk = logits[start:end]
        if chunk.dtype not in (torch.float32, torch.float64):
            chunk = chunk.float()
        torch.log_softmax(chunk, -1, out=chunk)
        out[start:end] = chunk.gather(1, ids[start:end, None])[:, 0]
    return out


def uniform_step(z: torch.Tensor, logits: torch.Tensor, alpha_t: float, alpha_s: float,
                 p_nucleus: float = 1.0, generator=None, use_float64: bool = True) -> torch.Tensor:
    """One ancestral step t -> s of uniform-state diffusion (SPEC §6): z_t (B, L) -> z_s (B, L).

    logits (B, L, K): the denoiser x_θ(z_t) (modified in place: nucleus filter, log-softmax).
    q(z_s | z_t, x̂) ∝ (α_s - α_t) x̂ + (K α_t x̂_{z_t} + α_t/α_s - α_t) e_{z_t}
                      + (1 - α_t/α_s)(1 - α_s)/K · 1,
    a mixture whose three components have the per-token weights w_x, w_keep, w_unif: pick the
    component, then draw from x̂, keep z_t, or draw a uniform id. α_s = 1 gives the last
    (noise-removal) step: w_unif = 0.
    """
    B, L, K = logits.shape
    flat = logits.reshape(B * L, K)
    nucleus_filter_(flat, p_nucleus)
    ids = z.reshape(-1)
    x_at_z = torch.exp(log_softmax_at_(flat, ids))
    alpha_ts = alpha_t / alpha_s
    w_x = alpha_s - alpha_t
    w_keep = K * alpha_t * x_at_z + (alpha_ts - alpha_t)
    w_unif = (1 - alpha_ts) * (1 - alpha_s)
    u = torch.rand(ids.shape, dtype=torch.float64, generator=generator, device=ids.device)
    u.mul_(w_x + w_keep + w_unif)
    out = ids.clone()
    from_x = (u < w_x).nonzero().squeeze(1)
    out[from_x] = gumbel_argmax(flat[from_x], generator, use_float64)
    from_unif = (u >= w_x + w_keep).nonzero().squeeze(1)
    out[from_unif] = torch.randint(K, from_unif.shape, generator=generator, device=ids.device)
    return out.view(B, L)


def fill_from_logits(z: torch.Tensor, positions: torch.Tensor, logits_rows: torch.Tensor, mask_id: int,
                     p_nucleus: float = 1.0, generator=None, use_float64: bool = True) -> torch.Tensor:
    """Absorbing: draw z[positions] ~ x̂ with the [MASK] logit at -inf (SUBS), in place on z.

    positions (N, 2) (sequence, position) pairs; logits_rows (N, K) the denoiser's logits there
    (modified in place when float32).
    """
    rows = logits_rows.float()
    rows[:, mask_id] = float('-inf')
    nucleus_filter_(rows, p_nucleus)
    z[positions[:, 0], positions[:, 1]] = gumbel_argmax(rows, generator, use_float64)
    return z


def sedd_step(z: torch.Tensor, logits: torch.Tensor, alpha_t: float, alpha_s: float, mask_id: int,
              p_nucleus: float = 1.0, generator=None, use_float64: bool = True) -> torch.Tensor:
    """One SEDD `analytic` (Tweedie tau-leaping) step t -> s, absorbing (SPEC-2 §11): z_t (B, L) -> z_s (B, L).

    logits (B, L, K): the score network at (z_t, sigma_t); at a masked position they define the
    unnormalised x̂: u_j = exp(l_j) / (K - 1), j != mask, with mass S. A masked token is unmasked
    w.p. min(1, c S), c = (alpha_s - alpha_t) / (1 - alpha_t), to j ∝ u_j (upstream's p_mask = 1 - c S
    can be negative; its Gumbel draw never picks it, i.e. it clamps at 0: done here explicitly);
    unmasked tokens never change. alpha_s = 1 is the final denoising (upstream's `_denoiser_update`):
    every remaining mask is drawn. p_nucleus < 1 truncates u (normalised) before the draw of j and
    leaves the unmask probability as it is, like the absorbing sampler of §6 (upstream ignores it).
    Only the masked rows of logits are read (and copied).
    """
    out = z.clone()
    positions = (z == mask_id).nonzero()
    if len(positions) == 0:
        return out
    rows = logits[positions[:, 0], positions[:, 1]]
    if alpha_s < 1:
        K = rows.shape[-1]
        log_mass = _logsumexp_without(rows, mask_id) - math.log(K - 1)  # log S
        p_unmask = torch.exp(log_mass + math.log((alpha_s - alpha_t) / (1 - alpha_t))).clamp_(max=1)
        unmask = _bernoulli(p_unmask, generator)
        positions, rows = positions[unmask], rows[unmask]
    return fill_from_logits(out, positions, rows, mask_id, p_nucleus, generator, use_float64)


def d3pm_step(z: torch.Tensor, logits: torch.Tensor, alpha_t: float, alpha_s: float, mask_id: int,
              p_nucleus: float = 1.0, generator=None, use_float64: bool = True) -> torch.Tensor:
    """One reverse step t -> s (any s < t) of absorbing D3PM (SPEC-2 §12): z_t (B, L) -> z_s (B, L).

    logits (B, L, K): x̂ = softmax over all K classes, the [MASK] included. A masked token goes to
    j != mask w.p. (alpha_s - alpha_t) x̂_j / N and stays masked w.p. [(1 - alpha_s)(1 - x̂_mask) + x̂_mask] / N,
    N = (1 - alpha_t)(1 - x̂_mask) + x̂_mask: it unmasks w.p. (alpha_s - alpha_t)(1 - x̂_mask) / N, to
    j ∝ x̂_j, j != mask. Unmasked tokens never change (no SUBS carry-over is assumed of the network).
    alpha_s = 1 is the last step: every mask is drawn from x̂ restricted to j != mask. p_nucleus < 1
    truncates that restricted x̂ before the draw (the unmask probability keeps the model's x̂_mask).
    Only the masked rows of logits are read (and copied).
    """
    out = z.clone()
    positions = (z == mask_id).nonzero()
    if len(positions) == 0:
        return out
    rows = logits[positions[:, 0], positions[:, 1]]
    if alpha_s < 1:
        # log-softmax in place (the draw below does not see a per-row shift); 1 - x̂_mask by expm1
        log_x_mask = log_softmax_at_(rows, torch.full_like(positions[:, 0], mask_id))
        x_mask, not_mask = torch.exp(log_x_mask), -torch.expm1(log_x_mask)
        p_unmask = (alpha_s - alpha_t) * not_mask / ((1 - alpha_t) * not_mask + x_mask)
        unmask = _bernoulli(p_unmask, generator)
        positions, rows = positions[unmask], rows[unmask]
    return fill_from_logits(out, positions, rows, mask_id, p_nucleus, generator, use_float64)


def _bernoulli(p: torch.Tensor, generator) -> torch.Tensor:
    """(N,) bool, True w.p. p (float64 uniforms)."""
    return torch.rand(p.shape, dtype=torch.float64, generator=generator, device=p.device) < p


def _logsumexp_without(rows: torch.Tensor, excluded_id: int) -> torch.Tensor:
    """LSE over every class but excluded_id per row of rows (N, K) -> (N,) float64; rows unchanged."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    for start, end in _row_chunks(rows.shape[0], rows.shape[1], rows.device):
        chunk = rows[start:end].to(torch.promote_types(rows.dtype, torch.float32), copy=True)
        chunk[:, excluded_id] = float('-inf')
        out[start:end] = torch.logsumexp(chunk, -1)
    return out


# ---------------------------------------------------------------------------- samplers

def sample_diffusion(logits_fn, batch_size: int, length: int, vocab_size: int, alpha_fn, steps: int, *,
                     kind: str, mask_id: int | None = None, noise_removal: str = 'ancestral',
                     p_nucleus: float = 1.0, use_float64: bool = True, cache: bool = True,
                     generator=None, device=None, progress: bool = False, t_min: float = T_MIN) -> torch.Tensor:
    """Ancestral sampling over the grid t_0 = 1 > ... > t_S = t_min; returns ids (B, L) int64.

    logits_fn(z (b, L) int64, t (b,) float32) -> denoiser logits (b, L, K), any float dtype; it may
    be called on a subset of the batch (b <= B), and may write every call's logits into one buffer
    (a step is done with its logits before the next call). alpha_fn(t float64 tensor) -> α_t, elementwise.
    kind: 'uniform' starts from uniform ids over the K classes; 'absorbing' from all-[MASK]
    (mask_id). noise_removal after the S steps: 'ancestral' (one more step to α_s = 1), 'greedy'
    (argmax of x̂ at t_min, the Greedy-Tail) or 'none'; the first two cost one extra forward.
    cache (absorbing only; ignored for uniform, where every token can change at every step):
    True runs the network only on the sequences that have a token to fill at this step, which is
    exact for any absorbing denoiser (x̂ is evaluated at the current z_t and t); False runs it on the
    whole batch at every step (the plain ancestral sampler).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use 'uniform' (duo, duo_base) or 'absorbing' (mdlm)")
    check_steps(steps)
    check_noise_removal(noise_removal)
    check_p_nucleus(p_nucleus)
    grid = time_grid(steps, t_min, device=device)
    alphas = alpha_fn(grid).double().tolist()
    draw = dict(p_nucleus=p_nucleus, generator=generator, use_float64=use_float64)
    shape = (batch_size, length)
    if kind == 'uniform':
        z = torch.randint(vocab_size, shape, generator=generator, device=device)
        for i in progress_steps(range(steps), 'sampling', unit='steps', enabled=progress):
            z = uniform_step(z, _call(logits_fn, z, grid[i]), alphas[i], alphas[i + 1], **draw)
        if noise_removal == 'ancestral':
            z = uniform_step(z, _call(logits_fn, z, grid[-1]), alphas[-1], 1.0, **draw)
        elif noise_removal == 'greedy':
            z = _call(logits_fn, z, grid[-1]).argmax(-1)
        return z
    if mask_id is None or not 0 <= mask_id < vocab_size:
        raise ValueError(f"absorbing sampling needs mask_id in [0, {vocab_size}), got {mask_id}")
    z = torch.full(shape, mask_id, dtype=torch.long, device=device)
    for i in progress_steps(range(steps), 'sampling', unit='steps', enabled=progress):
        a_t, a_s = alphas[i], alphas[i + 1]
        u = torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
        unmask = (z == mask_id) & (u < (a_s - a_t) / (1 - a_t))
        _absorbing_fill(logits_fn, z, unmask, grid[i], cache, mask_id, **draw)
    masked = z == mask_id
    if noise_removal == 'ancestral':
        _absorbing_fill(logits_fn, z, masked, grid[-1], cache, mask_id, **draw)
    elif noise_removal == 'greedy':
        rows = masked.any(1).nonzero().squeeze(1) if cache else torch.arange(batch_size, device=z.device)
        if len(rows):
            logits = _call(logits_fn, z[rows], grid[-1])
            logits[..., mask_id] = float('-inf')
            z[rows] = torch.where(masked[rows], logits.argmax(-1), z[rows])
    return z


def _call(logits_fn, z, t):
    return logits_fn(z, torch.full(z.shape[:1], float(t), dtype=torch.float32, device=z.device))


def _absorbing_fill(logits_fn, z, fill, t, cache, mask_id, **draw):
    """Draw x̂ at the positions where fill (B, L) is True, in place on z (B, L).

    cache=True: the network sees only the sequences with something to fill; else the whole batch.
    """
    if not cache:
        logits = _call(logits_fn, z, t)
        positions = fill.nonzero()
        fill_from_logits(z, positions, logits[positions[:, 0], positions[:, 1]], mask_id, **draw)
        return
    rows = fill.any(1).nonzero().squeeze(1)
    if len(rows) == 0:
        return
    sub_z = z[rows]
    positions = fill[rows].nonzero()
    logits = _call(logits_fn, sub_z, t)
    fill_from_logits(sub_z, positions, logits[positions[:, 0], positions[:, 1]], mask_id, **draw)
    z[rows] = sub_z


def sample_ar(step, batch_size: int, length: int, *, bos_id: int, p_nucleus: float = 1.0, top_k: int = 0,
              use_float64: bool = True, generator=None, device=None, progress: bool = False) -> torch.Tensor:
    """Ancestral autoregressive sampling: ids (B, length) int64 starting with bos_id.

    step(new_tokens (B, n) int64) -> logits (B, K) of the next token after them; the caller keeps
    the KV cache (or recomputes the prefix) inside `step`. It is called length - 1 times with one
    new token each. top_k > 0 keeps the k largest logits, p_nucleus < 1 the nucleus, before the draw.
    """
    check_p_nucleus(p_nucleus)
    if length < 1:
        raise ValueError(f"model.length={length} must be >= 1 (e.g. model.length=1024)")
    tokens = torch.full((batch_size, length), bos_id, dtype=torch.long, device=device)
    for i in progress_steps(range(length - 1), 'sampling', unit='tokens', enabled=progress):
        logits = step(tokens[:, i:i + 1]).float()
        top_k_filter_(logits, top_k)
        nucleus_filter_(logits, p_nucleus)
        tokens[:, i + 1] = gumbel_argmax(logits, generator, use_float64)
    return tokens
