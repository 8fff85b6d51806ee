"""Samplers (SPEC §6, SPEC-2 §13): ancestral and Ψ sampling of uniform-state (DUO) and absorbing (MDLM)
diffusion, and autoregressive sampling with a KV cache.

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
- Ψ-samplers and ReMDM (SPEC-2 §13): each step mixes the posterior with weight κ and "predict x̂,
  re-noise to s" with 1 - κ; per token this stays a mixture with scalar weights (uniform: the same
  three components; absorbing: unmask w.p. p_unmask, remask w.p. p_remask). psi_schedule gives the
  time grid and the κ of every step from the `sampling.psi.*` strings.

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
                 p_nucleus: float = 1.0, generator=None, use_float64: bool = True,
                 kappa: float = 1.0) -> torch.Tensor:
    """One step t -> s of uniform-state diffusion: z_t (B, L) -> z_s (B, L); kappa = 1 (the default)
    is the ancestral step of SPEC §6, kappa < 1 the Ψ-step of SPEC-2 §13.1.

    logits (B, L, K): the denoiser x_θ(z_t) (modified in place: nucleus filter, log-softmax); x̂ is
    x_θ after the nucleus filter, so a filtered id is reachable only through the uniform component.
    q_Ψ(z_s | z_t) = κ q(z_s | z_t, x̂) + (1 - κ) [α_s x̂' + (1 - α_s)/K · 1], with
    q(z_s | z_t, x̂) ∝ (α_s - α_t) x̂ + (K α_t x̂_{z_t} + α_t/α_s - α_t) e_{z_t}
                      + (1 - α_t/α_s)(1 - α_s)/K · 1
    and x̂' ∝ (1 - α_t) x̂ + K α_t x̂_{z_t} e_{z_t}, is a mixture whose three components have per-token
    weights (psi_uniform_weights): pick the component, then draw from x̂, keep z_t, or draw a uniform
    id. α_s = 1 gives the last (noise-removal) step: w_unif = 0. kappa in [0, 1].
    """
    if not 0 <= kappa <= 1:
        raise ValueError(f"kappa={kappa} must be in [0, 1] for uniform-state diffusion (sampling.psi.*_mode)")
    B, L, K = logits.shape
    flat = logits.reshape(B * L, K)
    nucleus_filter_(flat, p_nucleus)
    ids = z.reshape(-1)
    x_at_z = torch.exp(log_softmax_at_(flat, ids))
    w_x, w_keep, w_unif = psi_uniform_weights(x_at_z, K, alpha_t, alpha_s, kappa)
    u = torch.rand(ids.shape, dtype=torch.float64, generator=generator, device=ids.device)
    u.mul_(w_x + w_keep + w_unif)
    out = ids.clone()
    from_x = (u < w_x).nonzero().squeeze(1)
    out[from_x] = gumbel_argmax(flat[from_x], generator, use_float64)
    from_unif = (u >= w_x + w_keep).nonzero().squeeze(1)
    out[from_unif] = torch.randint(K, from_unif.shape, generator=generator, device=ids.device)
    return out.view(B, L)


def psi_uniform_weights(x_at_z: torch.Tensor, K: int, alpha_t: float, alpha_s: float, kappa: float = 1.0):
    """Unnormalised weights (w_x, w_keep, w_unif) of the uniform Ψ-step's three components (SPEC-2 §13.1).

    x_at_z (N,) float64: x̂_{z_t} per token. Returns w_x (a float) and w_keep, w_unif ((N,) float64),
    each Z = 1 - α_t + K α_t x̂_{z_t} times the weight of SPEC-2 §13.1, so that they sum to Z per token
    (the step draws u ~ U(0, sum) and never divides). kappa = 1: the ancestral weights of SPEC §6,
    bit for bit (the (1 - κ) terms are exact zeros).
    """
    alpha_ts = alpha_t / alpha_s
    tilt = K * alpha_t * x_at_z                 # K α_t x̂_{z_t}: x̂' = [(1 - α_t) x̂ + tilt e_{z_t}] / Z
    w_x = kappa * (alpha_s - alpha_t) + (1 - kappa) * alpha_s * (1 - alpha_t)
    w_keep = kappa * (tilt + (alpha_ts - alpha_t)) + (1 - kappa) * alpha_s * tilt
    w_unif = kappa * (1 - alpha_ts) * (1 - alpha_s) + (1 - kappa) * (1 - alpha_s) * (1 - alpha_t + tilt)
    return w_x, w_keep, w_unif


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
              p_nucleus: float = 1.0, generator=None, use_float64: bool = True,
              normalised: bool = False) -> torch.Tensor:
    """One SEDD `analytic` (Tweedie tau-leaping) step t -> s, absorbing (SPEC-2 §11): z_t (B, L) -> z_s (B, L).

    logits (B, L, K): the score network at (z_t, sigma_t); at a masked position they define the
    unnormalised x̂: u_j = exp(l_j) / (K - 1), j != mask, with mass S. A masked token is unmasked
    w.p. min(1, c S), c = (alpha_s - alpha_t) / (1 - alpha_t), to j ∝ u_j (upstream's p_mask = 1 - c S
    can be negative; its Gumbel draw never picks it, i.e. it clamps at 0: done here explicitly);
    unmasked tokens never change. alpha_s = 1 is the final denoising (upstream's `_denoiser_update`):
    every remaining mask is drawn. p_nucleus < 1 truncates u (normalised) before the draw of j and
    leaves the unmask probability as it is, like the absorbing sampler of §6 (upstream ignores it).
    Only the masked rows of logits are read, and only those of the tokens that unmask are copied
    whole. normalised=True: the logits are those of a normalised x̂ (any per-row shift, e.g. MDLM's,
    whose score log s = log x̂ + log(alpha/(1 - alpha)) has S = 1, SPEC-2 §11 pitfalls): the unmask
    probability is c, and S is not computed.
    """
    out = z.clone()
    positions = (z == mask_id).nonzero()
    if len(positions) == 0:
        return out
    if alpha_s < 1:
        c = (alpha_s - alpha_t) / (1 - alpha_t)
        if normalised:
            p_unmask = torch.full(positions[:, 0].shape, c, dtype=torch.float64, device=z.device)
        else:
            log_mass = _logsumexp_without(logits, positions, mask_id) - math.log(logits.shape[-1] - 1)  # log S
            p_unmask = torch.exp(log_mass + math.log(c)).clamp_(max=1)
        positions = positions[_bernoulli(p_unmask, generator)]
    rows = logits[positions[:, 0], positions[:, 1]]
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


def _logsumexp_without(logits: torch.Tensor, positions: torch.Tensor, excluded_id: int) -> torch.Tensor:
    """LSE over every class but excluded_id of the rows logits[positions] (logits (B, L, K), positions
    (N, 2)) -> (N,) float64; logits unchanged. The rows are gathered a chunk at a time (no (N, K) copy)."""
    out = torch.empty(positions.shape[0], dtype=torch.float64, device=logits.device)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    for start, end in _row_chunks(positions.shape[0], logits.shape[-1], logits.device):
        chunk = logits[positions[start:end, 0], positions[start:end, 1]].to(dtype)  # a copy
        chunk[:, excluded_id] = float('-inf')
        out[start:end] = torch.logsumexp(chunk, -1)
    return out


# ---------------------------------------------------------------------------- Ψ-samplers (SPEC-2 §13)

KAPPA_MODES = ('pure-posterior', 'pure-pc', 'constant-<eta>', 'constant-remdm-<eta>', 'max-capped-<eta>',
               'max-rescale-<eta>')
# Longest prefix first: 'constant-remdm-0.01' must not parse as 'constant-' with eta 'remdm-0.01'.
_ETA_MODES = ('constant-remdm', 'max-capped', 'max-rescale', 'constant')
_LCL = 'linear-constant-linear-'
TIME_PROFILES = ('linear', _LCL + '<c>', _LCL + '<alpha level>-inv')


def parse_kappa_mode(mode: str, key: str = 'sampling.psi.high_mode') -> tuple[str, float | None]:
    """A κ mode string -> (name, η): ('pure-posterior', None), ('pure-pc', None), ('constant', η),
    ('constant-remdm', η), ('max-capped', η) or ('max-rescale', η).

    η is the whole text after the mode's prefix (so 'max-capped-1e-3' is 0.001, not 3: upstream
    pitfall (c)); it must be a finite number >= 0, and <= 1 for 'constant' (κ itself). key names the
    config key in the one-line ValueError.
    """
    mode = str(mode)
    if mode in ('pure-posterior', 'pure-pc'):
        return mode, None
    for name in _ETA_MODES:
        if mode.startswith(name + '-'):
            text = mode[len(name) + 1:]
            try:
                eta = float(text)
            except ValueError:
                eta = math.nan
            if not (math.isfinite(eta) and eta >= 0 and (name != 'constant' or eta <= 1)):
                bound = 'in [0, 1]' if name == 'constant' else '>= 0'
                raise ValueError(f"{key}={mode}: {text!r} after '{name}-' must be a number {bound} "
                                 f"(e.g. {key}={name}-0.01)")
            return name, eta
    raise ValueError(f"{key}={mode} is unknown: use one of {', '.join(KAPPA_MODES)} (e.g. {key}=pure-posterior)")


def segment_kappas(mode: str, alphas: torch.Tensor, key: str = 'sampling.psi.high_mode',
                   rescale_compat: bool = False, negative_kappa: bool = False) -> torch.Tensor:
    """κ for a segment of n consecutive grid points with signal levels alphas (n,) float64 -> (n,) float64.

    pure-posterior: 1; pure-pc: 0; constant-η: η. ReMDM-like modes: for each of the n - 1 pairs
    (α_t, α_s) = (alphas[j], alphas[j+1]), κ_j = clip(1 - σ_j / (1 - α_s), 0, 1) (κ = 1 where α_s = 1,
    when there is nothing left to re-noise), then κ = 1 for the last point (the pair that crosses
    into the next segment is never formed; a one-point segment is just [1], upstream pitfall (d)):
      max-capped-η     σ = min(η, (1 - α_s)/α_t)                     (ReMDM-cap; η where α_t = 0)
      max-rescale-η    σ = η · min(1, (1 - α_s)/α_t)                 (ReMDM-rescale; η where α_t = 0)
                       rescale_compat: upstream's η · min(η, (1 - α_s)/α_t) (pitfall (a))
      constant-remdm-η σ = η
    The clip at 0 (upstream; required for uniform-state diffusion) caps σ at 1 - α_s, which makes
    max-capped-η give exactly the κ of constant-remdm-η. negative_kappa (absorbing only, upstream
    pitfall (b)): κ = min(1, 1 - σ/(1 - α_s)) bounded below by 1 - σ_max/(1 - α_s), σ_max =
    min(1, (1 - α_s)/α_t) (ReMDM's bound, where MDLM's Ψ-step is still a distribution): ReMDM's σ
    exactly for max-capped and max-rescale.
    """
    name, eta = parse_kappa_mode(mode, key)
    alphas = alphas.to(torch.float64)
    n = alphas.shape[0]
    if name in ('pure-posterior', 'pure-pc', 'constant'):
        return torch.full((n,), {'pure-posterior': 1.0, 'pure-pc': 0.0}.get(name, eta),
                          dtype=torch.float64, device=alphas.device)
    if n == 0:
        return alphas.new_empty(0)
    a_t, a_s = alphas[:-1], alphas[1:]
    ratio = (1 - a_s) / a_t.clamp(min=torch.finfo(torch.float64).tiny)  # (1 - α_s)/α_t where α_t > 0
    if name == 'max-capped':
        sigma = torch.where(a_t > 0, ratio.clamp(max=eta), eta)
    elif name == 'max-rescale':
        sigma = eta * torch.where(a_t > 0, ratio.clamp(max=eta if rescale_compat else 1.0), 1.0)
    else:
        sigma = torch.full_like(a_t, eta)
    remaining = 1 - a_s
    kappa = torch.where(remaining > 0, 1 - sigma / remaining.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    if negative_kappa:
        sigma_max = torch.where(a_t > 0, ratio.clamp(max=1.0), 1.0)
        lowest = torch.where(remaining > 0, 1 - sigma_max / remaining.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    else:
        lowest = torch.zeros_like(kappa)
    return torch.cat([torch.maximum(kappa, lowest).clamp(max=1), alphas.new_ones(1)])


def psi_segment_sizes(n: int, high_frac: float, middle_frac: float) -> tuple[int, int, int]:
    """(n_hi, n_mid, n_lo) points of n: n_hi = round(high_frac n), n_mid = round(middle_frac n)
    (Python round, half to even), n_lo = n - n_hi - n_mid (SPEC-2 §13.3)."""
    for key, frac in (('high_frac', high_frac), ('middle_frac', middle_frac)):
        if not 0 <= frac <= 1:
            raise ValueError(f"sampling.psi.{key}={frac} must be in [0, 1] (e.g. sampling.psi.{key}=0.5)")
    n_hi, n_mid = round(high_frac * n), round(middle_frac * n)
    if n_hi + n_mid > n:
        raise ValueError(f"sampling.psi.high_frac={high_frac} + sampling.psi.middle_frac={middle_frac} "
                         f"must not exceed 1 (e.g. sampling.psi.high_frac=0.2 sampling.psi.middle_frac=0.6)")
    return n_hi, n_mid, n - n_hi - n_mid


def alpha_inverse(alpha_fn, level: float, key: str = 'sampling.psi.time_profile') -> float:
    """The t in [0, 1] with alpha_fn(t) = level, for a decreasing schedule (bisection to float64
    resolution; the schedule's own alpha_fn, ε included: upstream's closed forms ignore ε)."""
    def alpha(t):
        return float(alpha_fn(torch.tensor(t, dtype=torch.float64)))
    if not alpha(1.0) <= level <= alpha(0.0):
        raise ValueError(f"{key}: alpha level {level} is outside the schedule's range "
                         f"[{alpha(1.0):.6g}, {alpha(0.0):.6g}] (e.g. {key}={_LCL}0.9-inv)")
    lo, hi = 0.0, 1.0                      # alpha(lo) >= level >= alpha(hi)
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return lo if alpha(lo) - level <= level - alpha(hi) else hi
        if alpha(mid) >= level:
            lo = mid
        else:
            hi = mid


def psi_time_grid(steps: int, alpha_fn, time_profile: str = 'linear', high_frac: float = 0.2,
                  middle_frac: float = 0.6, t_min: float = T_MIN, device=None) -> torch.Tensor:
    """(steps + 1,) float64 non-increasing times of a Ψ time profile (SPEC-2 §13.3).

    'linear': time_grid. 'linear-constant-linear-c': [linspace(1, t_c, n_hi), t_c × n_mid,
    linspace(t_c, t_min, n_lo)] over n = steps + 1 points with psi_segment_sizes, t_c = c; with the
    suffix '-inv' c is an α level and t_c = alpha_inverse(alpha_fn, c). Needs n_hi >= 1 (the grid
    starts at the t = 1 prior, upstream pitfall (e)), n_lo >= 1 and t_min <= t_c <= 1. The plateau
    and its two junctions give n_mid + 1 zero-length steps.
    """
    key = 'sampling.psi.time_profile'
    check_steps(steps)
    profile = str(time_profile)
    if profile == 'linear':
        return time_grid(steps, t_min, device=device)
    if not profile.startswith(_LCL):
        raise ValueError(f"{key}={profile} is unknown: use one of {', '.join(TIME_PROFILES)} "
                         f"(e.g. {key}={_LCL}0.9-inv)")
    text = profile[len(_LCL):]
    inverse = text.endswith('-inv')
    text = text[:-len('-inv')] if inverse else text
    try:
        c = float(text)
    except ValueError:
        c = math.nan
    if not math.isfinite(c):
        raise ValueError(f"{key}={profile}: {text!r} after '{_LCL}' must be a number (e.g. {key}={_LCL}0.9-inv)")
    t_c = alpha_inverse(alpha_fn, c, key) if inverse else c
    if not t_min <= t_c <= 1:
        raise ValueError(f"{key}={profile}: the plateau time {t_c:.6g} must be in [{t_min}, 1] "
                         f"(e.g. {key}={_LCL}0.9-inv)")
    n_hi, n_mid, n_lo = psi_segment_sizes(steps + 1, high_frac, middle_frac)
    if n_hi < 1 or n_lo < 1:
        raise ValueError(f"{key}={profile} needs at least one point in the high and the low segments; "
                         f"sampling.steps={steps}, sampling.psi.high_frac={high_frac} and "
                         f"sampling.psi.middle_frac={middle_frac} give {n_hi} and {n_lo} "
                         f"(e.g. sampling.psi.high_frac=0.45 sampling.psi.middle_frac=0.5)")
    kw = dict(dtype=torch.float64, device=device)
    return torch.cat([torch.linspace(1.0, t_c, n_hi, **kw), torch.full((n_mid,), t_c, **kw),
                      torch.linspace(t_c, t_min, n_lo, **kw)])


def psi_kappas(grid: torch.Tensor, alpha_fn, high_mode: str = 'pure-posterior', middle_mode: str = 'pure-posterior',
               low_mode: str = 'pure-posterior', high_frac: float = 0.2, middle_frac: float = 0.6,
               rescale_compat: bool = False, negative_kappa: bool = False) -> torch.Tensor:
    """(n,) float64 κ for the n grid points (grid (n,) float64): the points split into high / middle /
    low segments of psi_segment_sizes(n, ...) points, each with its segment_kappas. κ[j] drives step
    j (grid[j] -> grid[j+1]); the last entry is unused."""
    n_hi, n_mid, _ = psi_segment_sizes(grid.shape[0], high_frac, middle_frac)
    alphas = alpha_fn(grid.to(torch.float64)).to(torch.float64)
    parts = ((high_mode, 'high_mode', alphas[:n_hi]), (middle_mode, 'middle_mode', alphas[n_hi:n_hi + n_mid]),
             (low_mode, 'low_mode', alphas[n_hi + n_mid:]))
    return torch.cat([segment_kappas(mode, seg, f'sampling.psi.{key}', rescale_compat, negative_kappa)
                      for mode, key, seg in parts])


def psi_schedule(steps: int, alpha_fn, *, time_profile: str = 'linear', high_mode: str = 'pure-posterior',
                 middle_mode: str = 'pure-posterior', low_mode: str = 'pure-posterior', high_frac: float = 0.2,
                 middle_frac: float = 0.6, rescale_compat: bool = False, negative_kappa: bool = False,
                 t_min: float = T_MIN, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid (steps + 1,) float64, kappas (steps + 1,) float64) of `sampling.predictor=psi`, the
    arguments of sample_diffusion(grid=..., kappas=...). The defaults are the ancestral sampler;
    negative_kappa only for absorbing diffusion (segment_kappas)."""
    grid = psi_time_grid(steps, alpha_fn, time_profile, high_frac, middle_frac, t_min, device)
    return grid, psi_kappas(grid, alpha_fn, high_mode, middle_mode, low_mode, high_frac, middle_frac,
                            rescale_compat, negative_kappa).to(grid.device)


def psi_absorbing_probs(alpha_t: float, alpha_s: float, kappa):
    """(p_unmask, p_remask) of the absorbing Ψ-step (SPEC-2 §13.1): a masked token becomes a draw of
    x̂ w.p. κ(α_s - α_t)/(1 - α_t) + (1 - κ)α_s, an unmasked one is remasked w.p. (1 - κ)(1 - α_s).

    kappa: a float or a per-token tensor. With κ = 1 - σ/(1 - α_s) these are ReMDM's 1 - (1-α_s-σα_t)/(1-α_t)
    and σ; any κ in [1 - σ_max/(1 - α_s), 1], σ_max = min(1, (1 - α_s)/α_t), gives probabilities in [0, 1].
    """
    return (kappa * (alpha_s - alpha_t) / (1 - alpha_t) + (1 - kappa) * alpha_s,
            (1 - kappa) * (1 - alpha_s))


def absorbing_psi_step(z: torch.Tensor, logits: torch.Tensor, alpha_t: float, alpha_s: float, kappa,
                       mask_id: int, fixed: torch.Tensor | None = None, confidence: torch.Tensor | None = None,
                       p_nucleus: float = 1.0, generator=None, use_float64: bool = True) -> torch.Tensor:
    """One Ψ-step t -> s of absorbing (MDLM) diffusion: z_t (B, L) -> z_s (B, L) (a new tensor).

    logits (B, L, K): the denoiser on the whole batch at z_t (only the rows of the tokens that unmask
    are read; x̂ = SUBS x_θ: [MASK] logit -inf, then the nucleus filter). kappa: a float or (B, L)
    per-token tensor (psi_absorbing_probs). fixed (B, L) bool: positions never changed (prompts).
    confidence (B, L) float64, the ReMDM-conf state (remdm_conf_kappa), updated in place: a token
    that unmasks stores x̂ of its drawn id, a remasked one loses it (NaN). kappa = 1 draws the same
    as the uncached ancestral step of sample_diffusion.
    """
    masked = z == mask_id
    p_unmask, p_remask = psi_absorbing_probs(alpha_t, alpha_s, kappa)
    u = torch.rand(z.shape, dtype=torch.float64, generator=generator, device=z.device)
    unmask = masked & (u < p_unmask)
    remask = ~masked & (u < p_remask)
    if fixed is not None:
        unmask &= ~fixed
        remask &= ~fixed
    out = z.masked_fill(remask, mask_id)
    positions = unmask.nonzero()
    rows = logits[positions[:, 0], positions[:, 1]].float()        # (n, K), a copy
    rows[:, mask_id] = float('-inf')
    nucleus_filter_(rows, p_nucleus)
    drawn = gumbel_argmax(rows, generator, use_float64)
    out[positions[:, 0], positions[:, 1]] = drawn
    if confidence is not None:
        confidence[remask] = math.nan
        confidence[positions[:, 0], positions[:, 1]] = log_softmax_at_(rows, drawn).exp()
    return out


def remdm_conf_kappa(confidence: torch.Tensor, alpha_t: float, alpha_s: float) -> torch.Tensor:
    """Per-token κ (B, L) float64 of ReMDM-conf (SPEC-2 §13.6) for the step t -> s.

    confidence (B, L) float64: ψ^ℓ, x̂'s probability of the token at ℓ when it was unmasked; NaN where
    there is none (masked, never decoded by the sampler, remasked; start from all NaN). σ^ℓ = η^ℓ σ_max
    with η = softmax over the positions that have a ψ of -ψ (0 elsewhere) and σ_max = min(1, (1 -
    α_s)/α_t) (1 where α_t = 0); κ^ℓ = 1 - σ^ℓ/(1 - α_s), unclipped (any σ <= σ_max is a valid MDLM
    step), and 1 where α_s = 1. Positions without a ψ get κ = 1: the plain posterior.
    """
    decoded = ~confidence.isnan()
    eta = (-confidence).masked_fill(~decoded, float('-inf')).softmax(-1)
    eta = torch.where(decoded, eta, 0.0)            # a row with nothing decoded: NaN from the softmax -> 0
    if alpha_s >= 1:
        return torch.ones_like(confidence)
    sigma_max = min(1.0, (1 - alpha_s) / alpha_t) if alpha_t > 0 else 1.0
    return 1 - eta * (sigma_max / (1 - alpha_s))


# ---------------------------------------------------------------------------- samplers

def sample_diffusion(logits_fn, batch_size: int, length: int, vocab_size: int, alpha_fn, steps: int, *,
                     kind: str, mask_id: int | None = None, noise_removal: str = 'ancestral',
                     p_nucleus: float = 1.0, use_float64: bool = True, cache: bool = True,
                     generator=None, device=None, progress: bool = False, t_min: float = T_MIN,
                     grid: torch.Tensor | None = None, kappas: torch.Tensor | None = None,
                     remdm_conf: bool = False, step=None,
                     fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Ancestral or Ψ sampling over a time grid t_0 = 1 > ... > t_S; returns ids (B, L) int64.

    logits_fn(z (b, L) int64, t (b,) float32) -> denoiser logits (b, L, K), any float dtype; it may
    be called on a subset of the batch (b <= B), and may write every call's logits into one buffer
    (a step is done with its logits before the next call). alpha_fn(t float64 tensor) -> α_t, elementwise.
    kind: 'uniform' starts from uniform ids over the K classes; 'absorbing' from all-[MASK]
    (mask_id). noise_removal after the S steps: 'ancestral' (one more step to α_s = 1), 'greedy'
    (argmax of x̂ at t_S, the Greedy-Tail) or 'none'; the first two cost one extra forward.
    grid: (S + 1,) float64 non-increasing times (psi_schedule; zero-length steps allowed), default
    time_grid(steps, t_min). kappas: (S + 1,) float64 Ψ weights, kappas[i] for step i (the last one
    unused; SPEC-2 §13); None: every step ancestral (κ = 1). A zero-length step with κ = 1 is the
    identity and skipped (no network call). remdm_conf (absorbing, kappas None):
    ReMDM-conf, per-token κ from the confidences of the decoded tokens (remdm_conf_kappa).
    cache (absorbing only; ignored for uniform, where every token can change at every step):
    True runs the network only on the sequences that have a token to fill at this step, which is
    exact for any absorbing denoiser (x̂ is evaluated at the current z_t and t), so it is used at the
    steps with κ = 1 (with κ < 1 any token may change: the network sees the whole batch); False
    runs it on the whole batch at every step (the plain ancestral sampler).
    step (absorbing only, without kappas or remdm_conf; cache is then not used): an absorbing step
    whose unmask probabilities depend on the network, step(z, logits (B, L, K), alpha_t, alpha_s,
    mask_id, p_nucleus=, generator=, use_float64=) -> z_s (sedd_step: SEDD's `analytic` predictor,
    d3pm_step); it replaces the ancestral step, runs on the whole batch at every step that has a
    [MASK] left (a step without any is the identity: no network call), and noise_removal='ancestral'
    is the same step to alpha_s = 1.
    fixed: (mask (B, L) bool, tokens (B, L) int64), positions F held at y_F (prompts, infilling;
    SPEC-2 §15): the sampler starts from z_F = y_F and F never changes. Absorbing: the steps only
    unmask masked tokens and Ψ/ReMDM never remask F, so this is the model's own conditional (exact
    for an exact denoiser in the many-step limit). Uniform: z_F is reset to y_F after every step and
    after noise removal (the clamp: not the exact conditional, since the denoiser reads y_F as a
    noisy observation at α_t; the error vanishes as α_t -> 1).
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use 'uniform' (duo, duo_base) or 'absorbing' (mdlm)")
    check_steps(steps)
    check_noise_removal(noise_removal)
    check_p_nucleus(p_nucleus)
    if grid is None:
        grid = time_grid(steps, t_min, device=device)
    elif tuple(grid.shape) != (steps + 1,) or not bool((grid[1:] <= grid[:-1]).all()):
        raise ValueError(f"grid must be ({steps + 1},) non-increasing times for sampling.steps={steps}, "
                         f"got shape {tuple(grid.shape)}")
    if kappas is not None and tuple(kappas.shape) != (steps + 1,):
        raise ValueError(f"kappas must have shape ({steps + 1},) for sampling.steps={steps}, got {tuple(kappas.shape)}")
    if remdm_conf and (kind != 'absorbing' or kappas is not None):
        raise ValueError("ReMDM-conf is an absorbing (mdlm) sampler and sets its own kappas (sampling.psi.*)")
    if step is not None and (kind != 'absorbing' or kappas is not None or remdm_conf):
        raise ValueError("step= replaces the ancestral step of absorbing sampling: not with kind='uniform', "
                         "kappas (sampling.psi.*) or ReMDM-conf")
    alphas = alpha_fn(grid.double()).double().tolist()
    step_kappas = [1.0] * steps if kappas is None else kappas.double().tolist()[:steps]
    draw = dict(p_nucleus=p_nucleus, generator=generator, use_float64=use_float64)
    shape = (batch_size, length)
    check_fixed(fixed, shape, mask_id if kind == 'absorbing' else None, vocab_size)
    if kind == 'uniform':
        z = hold_fixed(torch.randint(vocab_size, shape, generator=generator, device=device), fixed)
        for i in progress_steps(range(steps), 'sampling', unit='steps', enabled=progress):
            if alphas[i] != alphas[i + 1] or step_kappas[i] != 1:  # else the identity: no network call
                z = hold_fixed(uniform_step(z, _call(logits_fn, z, grid[i]), alphas[i], alphas[i + 1],
                                            kappa=step_kappas[i], **draw), fixed)
        if noise_removal == 'ancestral':
            z = hold_fixed(uniform_step(z, _call(logits_fn, z, grid[-1]), alphas[-1], 1.0, **draw), fixed)
        elif noise_removal == 'greedy':
            z = hold_fixed(_call(logits_fn, z, grid[-1]).argmax(-1), fixed)
        return z
    if mask_id is None or not 0 <= mask_id < vocab_size:
        raise ValueError(f"absorbing sampling needs mask_id in [0, {vocab_size}), got {mask_id}")
    # Fixed tokens are unmasked from the start: no absorbing step below changes an unmasked token
    # except the Ψ/ReMDM remasking, which is told to skip them.
    z = hold_fixed(torch.full(shape, mask_id, dtype=torch.long, device=device), fixed)
    confidence = torch.full(shape, math.nan, dtype=torch.float64, device=device) if remdm_conf else None
    cache = cache and step is None
    for i in progress_steps(range(steps), 'sampling', unit='steps', enabled=progress):
        a_t, a_s = alphas[i], alphas[i + 1]
        if step is not None:
            if a_t != a_s and bool((z == mask_id).any()):  # else the identity: no network call
                z = step(z, _call(logits_fn, z, grid[i]), a_t, a_s, mask_id, **draw)
            continue
        if a_t == a_s and step_kappas[i] == 1 and not remdm_conf:
            continue  # a zero-length posterior step is the identity: no network call
        if remdm_conf or step_kappas[i] != 1:
            kappa = remdm_conf_kappa(confidence, a_t, a_s) if remdm_conf else step_kappas[i]
            if not remdm_conf and not all(-1e-12 <= p <= 1 + 1e-12 for p in psi_absorbing_probs(a_t, a_s, kappa)):
                raise ValueError(f"kappa={kappa} at step {i} (alpha {a_t:.6g} -> {a_s:.6g}) is not a distribution: "
                                 f"absorbing kappas must be in [1 - min(1, (1 - alpha_s)/alpha_t)/(1 - alpha_s), 1] "
                                 f"(sampling.psi.*_mode)")
            z = absorbing_psi_step(z, _call(logits_fn, z, grid[i]), a_t, a_s, kappa, mask_id,
                                   fixed=None if fixed is None else fixed[0], confidence=confidence, **draw)
            continue
        u = torch.rand(shape, dtype=torch.float64, generator=generator, device=device)
        unmask = (z == mask_id) & (u < (a_s - a_t) / (1 - a_t))
        _absorbing_fill(logits_fn, z, unmask, grid[i], cache, mask_id, **draw)
    masked = z == mask_id
    if noise_removal == 'ancestral' and step is not None:
        if bool(masked.any()):
            z = step(z, _call(logits_fn, z, grid[-1]), alphas[-1], 1.0, mask_id, **draw)
    elif noise_removal == 'ancestral':
        _absorbing_fill(logits_fn, z, masked, grid[-1], cache, mask_id, **draw)
    elif noise_removal == 'greedy':
        rows = masked.any(1).nonzero().squeeze(1) if cache else torch.arange(batch_size, device=z.device)
        if len(rows):
            logits = _call(logits_fn, z[rows], grid[-1])
            logits[..., mask_id] = float('-inf')
            z[rows] = torch.where(masked[rows], logits.argmax(-1), z[rows])
    return z


def check_fixed(fixed, shape, mask_id: int | None = None, vocab_size: int | None = None):
    """fixed = (mask (B, L) bool, tokens (B, L) int64) of `shape`, fixed tokens in [0, vocab_size)
    and, for absorbing sampling (mask_id given), never the [MASK]; None passes."""
    if fixed is None:
        return
    mask, tokens = fixed
    if tuple(mask.shape) != tuple(shape) or tuple(tokens.shape) != tuple(shape) or mask.dtype != torch.bool:
        raise ValueError(f"fixed must be (mask bool {tuple(shape)}, tokens {tuple(shape)}), got "
                         f"({mask.dtype} {tuple(mask.shape)}, {tuple(tokens.shape)})")
    held = tokens[mask]
    if vocab_size is not None and len(held) and not (0 <= int(held.min()) and int(held.max()) < vocab_size):
        raise ValueError(f"fixed tokens must be ids in [0, {vocab_size})")
    if mask_id is not None and bool((held == mask_id).any()):
        raise ValueError("a fixed token is the [MASK] id: absorbing sampling would fill it; fix real tokens only")


def hold_fixed(z: torch.Tensor, fixed) -> torch.Tensor:
    """z (B, L) with the fixed positions reset to their tokens (a new tensor); fixed None: z."""
    return z if fixed is None else torch.where(fixed[0], fixed[1], z)


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
              use_float64: bool = True, generator=None, device=None, progress: bool = False,
              fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Ancestral autoregressive sampling: ids (B, length) int64 starting with bos_id.

    step(new_tokens (B, n) int64) -> logits (B, K) of the next token after them; the caller keeps
    the KV cache (or recomputes the prefix) inside `step`. Without `fixed` it is called length - 1
    times with one new token each. top_k > 0 keeps the k largest logits, p_nucleus < 1 the nucleus,
    before the draw.
    fixed: (mask (B, length) bool, tokens (B, length)), a prompt per row: every row's mask must be
    a prefix of P_b >= 1 positions (its tokens replace bos_id). The P = min_b P_b positions that
    every row holds go through `step` in one call; from there one token per call, drawn, except
    where a row's prompt goes on (its token is taken as it is: teacher forcing through the cache).
    """
    check_p_nucleus(p_nucleus)
    if length < 1:
        raise ValueError(f"model.length={length} must be >= 1 (e.g. model.length=1024)")
    tokens = torch.full((batch_size, length), bos_id, dtype=torch.long, device=device)
    start, held = 1, None
    if fixed is not None:
        check_fixed(fixed, (batch_size, length))
        held = fixed[0].to(tokens.device)
        if not bool(held[:, 0].all()) or bool((held[:, 1:] & ~held[:, :-1]).any()):
            raise ValueError("an autoregressive model can only continue a prefix: every row's fixed positions "
                             "must be 0..P-1 (the gap of an infilling template at the end)")
        tokens = hold_fixed(tokens, (held, fixed[1].to(tokens.device)))
        start = int(held.sum(1).min())
    fed = 0  # tokens [0, fed) are in the cache
    for i in progress_steps(range(start, length), 'sampling', unit='tokens', enabled=progress):
        logits = step(tokens[:, fed:i]).float()
        fed = i
        top_k_filter_(logits, top_k)
        nucleus_filter_(logits, p_nucleus)
        drawn = gumbel_argmax(logits, generator, use_float64)
        tokens[:, i] = drawn if held is None else torch.where(held[:, i], tokens[:, i], drawn)
    return tokens


# ---------------------------------------------------------------------------- beyond one window, variable length (SPEC-2 §15)

# bd3lms' variable-length rule: after a block, once the sample is longer than ENTROPY_WINDOW tokens,
# a unigram entropy (nats) of its last ENTROPY_WINDOW tokens below ENTROPY_FLOOR ends it.
ENTROPY_WINDOW, ENTROPY_FLOOR = 256, 4.0


def check_semi_ar(length: int, stride: int, num_strides: int):
    if int(stride) != stride or not 1 <= stride < length:
        raise ValueError(f"sampling.stride_length={stride} must be an integer in [1, model.length={length}) "
                         f"(e.g. sampling.stride_length={max(length // 2, 1)})")
    if int(num_strides) != num_strides or num_strides < 0:
        raise ValueError(f"sampling.num_strides={num_strides} must be an integer >= 0 (e.g. sampling.num_strides=2)")


def semi_ar_length(length: int, stride: int, num_strides: int) -> int:
    """Tokens of a semi-autoregressive sample: L + n stride."""
    return length + num_strides * stride


def sample_semi_ar(window_fn, batch_size: int, length: int, stride: int, num_strides: int, *,
                   fixed: tuple[torch.Tensor, torch.Tensor] | None = None, stop=None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-autoregressive sampling beyond one window (SPEC-2 §15): (ids (B, N'), lengths (B,) int64).

    Window r = 0..n covers positions [r stride, r stride + L) of a canvas of N = L + n stride
    tokens. window_fn(fixed_window) -> ids (B, L) samples one window given fixed_window = (mask
    (B, L) bool, tokens (B, L)) or None; window r > 0 holds its first L - stride positions (the
    last L - stride tokens of window r - 1), and every window the positions of `fixed` (mask,
    tokens (B, N): a prompt or template spanning the canvas) that fall inside it. The output is
    w_0[:stride] + ... + w_{n-1}[:stride] + w_n. stop(ids (B, end)) -> lengths (B,) int64, -1 for
    rows that go on, else where that row ends; called after every window (end = its last position
    + 1); once every row has ended, no more windows are drawn and N' = that end. lengths: N' for
    rows that never stopped (without stop: all N).
    """
    check_semi_ar(length, stride, num_strides)
    total = semi_ar_length(length, stride, num_strides)
    if fixed is not None:
        check_fixed(fixed, (batch_size, total))
    canvas = torch.zeros(batch_size, total, dtype=torch.long, device=device)
    known = torch.zeros(batch_size, total, dtype=torch.bool, device=device)
    if fixed is not None:
        canvas = hold_fixed(canvas, fixed)
        known |= fixed[0]
    lengths = torch.full((batch_size,), -1, dtype=torch.long, device=device)
    end = length
    for r in range(num_strides + 1):
        begin, end = r * stride, r * stride + length
        window = (known[:, begin:end], canvas[:, begin:end])
        drawn = window_fn(window if bool(window[0].any()) else None)
        canvas[:, begin:end] = hold_fixed(drawn, window)
        known[:, begin:end] = True
        if stop is not None:
            ended = stop(canvas[:, :end])
            lengths = torch.where(lengths < 0, ended, lengths)
            if bool((lengths >= 0).all()):
                break
    return canvas[:, :end], torch.where(lengths < 0, end, lengths)


def eos_lengths(ids: torch.Tensor, eos_id: int, start: torch.Tensor) -> torch.Tensor:
    """Per-row length (B,) int64 that ends each row of ids (B, N) right after its first eos_id at a
    position >= max(start_b, 1) (start (B,): where the row's generated text begins; position 0
    holds the BOS, which is the EOS for GPT-2); -1 for rows without one."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    hits = (ids == eos_id) & (positions >= start.clamp(min=1)[:, None])
    first = torch.where(hits, positions, ids.shape[1]).amin(1) if ids.shape[1] else start.new_zeros(len(ids))
    return torch.where(first < ids.shape[1], first + 1, -1)


def low_entropy_tail(ids: torch.Tensor, vocab_size: int, window: int = ENTROPY_WINDOW,
                     floor: float = ENTROPY_FLOOR) -> torch.Tensor:
    """(B,) bool: rows of ids (B, N), N > window, whose last `window` tokens have a unigram entropy
    (nats) below floor; all False when N <= window, and when log(vocab_size) <= floor (no text over
    such a vocabulary, e.g. characters, reaches the floor: the rule would end every sample)."""
    if ids.shape[1] <= window or math.log(vocab_size) <= floor:
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tail = ids[:, -window:]
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float64, device=ids.device)
    counts.scatter_add_(1, tail, torch.ones_like(tail, dtype=torch.float64))
    probs = counts / window
    entropy = -(probs * probs.clamp(min=1e-300).log()).sum(1)
    return entropy < floor


def window_stop(ids: torch.Tensor, eos_id: int, start: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The variable-length rule of semi-autoregressive sampling after a window (SPEC-2 §15), ids
    (B, end): a row ends right after its first generated EOS (eos_lengths), else, when its last
    ENTROPY_WINDOW tokens are a low-entropy tail (low_entropy_tail), before them; -1: it goes on."""
    ended = eos_lengths(ids, eos_id, start)
    tail = low_entropy_tail(ids, vocab_size)
    return torch.where((ended < 0) & tail, ids.shape[1] - ENTROPY_WINDOW, ended)
