"""Per-token training losses (SPEC §4), pure functions of the network's logits.

Shapes: logits (B, L, K) in any float dtype; token ids x0, xt (B, L) int64; per-sequence
alpha_t, dalpha_t (B, 1). Every loss returns float32 (B, L): the reported NLL bound is their
mean over all positions. Losses are computed in float32 whatever the autocast precision, and
none keeps a (B, L, K) intermediate alive for backward beyond the logits themselves.

`reuse_logits=True` (training steps): the backward writes the gradient into the logits' own
memory instead of a second (B, L, K) tensor, so the caller must not read the logits after
backward. Autograd notices the misuse it can see (another node that saved the logits, a second
backward through the graph) and raises its in-place modification error; logits that are a leaf
tensor are never overwritten.
"""
import math

import torch

# Rows per block of the fused kernels. None = automatic: on the CPU a block of about
# CPU_BLOCK_ELEMENTS float32 values (K = 50258: 20 rows, 4 MB) stays in cache through the
# several elementwise passes over it, where a (1024, K) block (200 MB) went to memory on every
# pass; on a GPU, blocks of GPU_BLOCK_ELEMENTS keep the number of kernel launches small.
CHUNK_ROWS: int | None = None
CPU_BLOCK_ELEMENTS = 1 << 22
GPU_BLOCK_ELEMENTS = 1 << 25


def block_rows(K: int, device: torch.device) -> int:
    """Rows per block for rows of K values on `device` (CHUNK_ROWS when set)."""
    if CHUNK_ROWS:
        return CHUNK_ROWS
    return max(1, (CPU_BLOCK_ELEMENTS if device.type == 'cpu' else GPU_BLOCK_ELEMENTS) // K)


def ar_nll(logits: torch.Tensor, x0: torch.Tensor, excluded_id: int | None = None,
           reuse_logits: bool = False) -> torch.Tensor:
    """-log p(x_{j+1} | x_{<=j}) for j = 0..L-2, as (B, L-1) float32.

    `excluded_id` (the extra [MASK]/pad id) can never be predicted: its logit is -inf.
    """
    targets = torch.cat([x0[:, 1:], x0[:, -1:]], dim=1)  # position L-1 predicts nothing: dropped below
    log_z, _, picked = _stats(logits, excluded_id=excluded_id, ids=targets[..., None], reuse=reuse_logits)
    return (log_z - picked[..., 0])[:, :-1]


def token_nll(logits: torch.Tensor, ids: torch.Tensor, excluded_id: int | None = None) -> torch.Tensor:
    """-log softmax(logits)[ids] per row, float32 (...): logits (..., K), ids (...) int64.

    Class `excluded_id` (if any) is removed from the softmax (SUBS: the [MASK] logit is -inf).
    One fused, blocked pass: no (..., K) intermediate (the harness scores (n, K) rows of
    continuation positions with it, likelihood.py).
    """
    log_z, _, picked = _stats(logits, excluded_id=excluded_id, ids=ids[..., None])
    return log_z - picked[..., 0]


def mdlm_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha_t: torch.Tensor,
              dalpha_t: torch.Tensor, mask_id: int, reuse_logits: bool = False) -> torch.Tensor:
    """Continuous-time MDLM NELBO per token, SUBS parameterisation (SPEC §4), float32 (B, L).

    l = alpha'_t / (1 - alpha_t) * log x_theta[x0] at masked positions, 0 elsewhere (unmasked
    positions copy their input, so they cost nothing: their softmax is never computed). The
    [MASK] logit is -inf. logits: (B, L, K), or (n, K) for the n masked positions only, in
    row-major order (DiT(..., output_rows=xt == mask_id): the network skips the other rows).
    """
    masked = xt == mask_id
    if logits.dim() == 2:
        _check_masked_rows(logits, masked)
        log_z, _, picked = _stats(logits, excluded_id=mask_id, ids=x0[masked][:, None], reuse=reuse_logits)
        weight = _at_least_f32(dalpha_t / (1 - alpha_t)).expand(x0.shape)[masked]
        values = weight * (picked[:, 0] - log_z)
        return values.new_zeros(x0.shape).masked_scatter(masked, values)
    log_z, _, picked = _stats(logits, excluded_id=mask_id, ids=x0[..., None], rows=masked, reuse=reuse_logits)
    log_p_x0 = picked[..., 0] - log_z
    weight = _at_least_f32(dalpha_t / (1 - alpha_t))
    return torch.where(masked, weight * log_p_x0, torch.zeros_like(log_p_x0))


def sedd_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha_t: torch.Tensor,
              dalpha_t: torch.Tensor, mask_id: int, reuse_logits: bool = False) -> torch.Tensor:
    """SEDD absorbing score entropy per token (SPEC-2 §11), float32 (B, L) (float64 for float64 logits).

    The network's logits l give the unnormalised x_theta u_j = exp(l_j) / (K - 1), j != mask, with
    total mass S, log S = LSE_{j != mask}(l) - log(K - 1). At a masked position with clean id m
    l = (-alpha'_t / (1 - alpha_t)) [(S - 1 - log S) + (LSE_{j != mask}(l) - l_m)],
    0 elsewhere: the MDLM loss of softmax_{j != mask}(l) plus a normalisation penalty >= 0 (0 iff
    S = 1). It equals upstream's sigma'_t [sum_j s_j - r log s_m + r (log r - 1)], r = alpha/(1-alpha).
    logits: (B, L, K), or (n, K) for the n masked positions only (DiT(..., output_rows=xt == mask_id)).
    """
    masked = xt == mask_id
    K = logits.shape[-1]
    if logits.dim() == 2:
        _check_masked_rows(logits, masked)
        log_z, _, picked = _stats(logits, excluded_id=mask_id, ids=x0[masked][:, None], reuse=reuse_logits)
        weight = _at_least_f32(-dalpha_t / (1 - alpha_t)).expand(x0.shape)[masked]
        values = weight.to(log_z.dtype) * _score_entropy(log_z, picked[:, 0], K)
        return values.new_zeros(x0.shape).masked_scatter(masked, values)
    log_z, _, picked = _stats(logits, excluded_id=mask_id, ids=x0[..., None], rows=masked, reuse=reuse_logits)
    weight = _at_least_f32(-dalpha_t / (1 - alpha_t)).to(log_z.dtype)
    values = weight * _score_entropy(log_z, picked[..., 0], K)
    return torch.where(masked, values, torch.zeros_like(values))


def _score_entropy(log_z: torch.Tensor, logit_m: torch.Tensor, K: int) -> torch.Tensor:
    """(S - 1 - log S) + (log Z - l_m) with log S = log Z - log(K - 1); expm1 keeps S ~ 1 exact."""
    log_s = log_z - math.log(K - 1)
    return (torch.expm1(log_s) - log_s) + (log_z - logit_m)


def d3pm_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha_t: torch.Tensor,
              alpha_s: torch.Tensor, T: int, mask_id: int, reuse_logits: bool = False) -> torch.Tensor:
    """T KL_i per token of absorbing D3PM in discrete time (SPEC-2 §12), float32 (B, L).

    x̂ = softmax(l) over all K classes, the [MASK] included (mean parameterisation, no SUBS).
    alpha_t, alpha_s (B, 1): alpha(t_i), alpha(t_{i-1}) of the step i (noise_schedule.discrete_alphas;
    alpha_s = 1 at i = 1). With rho = alpha/(1 - alpha), a = (alpha_s - alpha_t)/(1 - alpha_t),
    b = (1 - alpha_s)/(1 - alpha_t), at a masked position
    KL_i = a [log(1 + rho_t x̂_mask) - log x̂_m] + b [log(1 + rho_t x̂_mask) - log(1 + rho_s x̂_mask)],
    the KL between the true posterior q(z_s | z_t = mask, x) and p_theta(z_s | z_t); 0 elsewhere.
    The b term is omitted where alpha_s = 1 (b = 0, rho_s = inf). Only log Z, l_m and l_mask of a
    row are needed (one fused pass). logits: (B, L, K), or (n, K) for the masked positions only.
    The per-token NELBO estimate is d3pm_reconstruction_loss(clean pass) + this, with i ~ U{1..T}.
    """
    masked = xt == mask_id
    ids = torch.stack([x0, torch.full_like(x0, mask_id)], dim=-1)
    shape = x0.shape
    if logits.dim() == 2:
        _check_masked_rows(logits, masked)
        log_z, _, picked = _stats(logits, ids=ids[masked], reuse=reuse_logits)
        coefs = [c.expand(shape)[masked] for c in _d3pm_coefficients(alpha_t, alpha_s)]
        values = T * _d3pm_kl(log_z, picked, *coefs)
        return values.new_zeros(shape).masked_scatter(masked, values)
    log_z, _, picked = _stats(logits, ids=ids, rows=masked, reuse=reuse_logits)
    # rows without statistics have log Z = 0: exp(l_mask - 0) may overflow there, and an inf in the
    # branch torch.where discards still turns its zero gradient into NaN (0 * inf)
    picked = picked.masked_fill(~masked[..., None], 0)
    values = T * _d3pm_kl(log_z, picked, *_d3pm_coefficients(alpha_t, alpha_s))
    return torch.where(masked, values, torch.zeros_like(values))


def _d3pm_coefficients(alpha_t: torch.Tensor, alpha_s: torch.Tensor):
    """(a, b, rho_t, rho_s, rho_t - rho_s) in the alphas' precision (at least float32); rho_s := 0 where
    alpha_s = 1 (there b = 0 exactly, and b * log(1 + rho_s x̂_mask) must be 0, not 0 * inf)."""
    alpha_t, alpha_s = _at_least_f32(alpha_t), _at_least_f32(alpha_s)
    final = alpha_s == 1
    a = (alpha_s - alpha_t) / (1 - alpha_t)
    b = (1 - alpha_s) / (1 - alpha_t)
    rho_t = alpha_t / (1 - alpha_t)
    rho_s = torch.where(final, torch.zeros_like(alpha_s), alpha_s / torch.where(final, torch.ones_like(alpha_s),
                                                                                 1 - alpha_s))
    return a, b, rho_t, rho_s, rho_t - rho_s


def _d3pm_kl(log_z, picked, a, b, rho_t, rho_s, rho_diff):
    """KL_i from the row statistics: picked (..., 2) = (l_m, l_mask); coefficients broadcast to log_z.

    The b term log(1 + rho_t x̂_mask) - log(1 + rho_s x̂_mask) is computed as
    log1p((rho_t - rho_s) x̂_mask / (1 + rho_s x̂_mask)) with rho_t - rho_s from the alphas' precision:
    the two logs differ by O(1/T), and their float32 difference, times T, lost 4 digits at T = 1000.
    """
    a, b, rho_t, rho_s, rho_diff = (c.to(log_z.dtype) for c in (a, b, rho_t, rho_s, rho_diff))
    log_x_m = picked[..., 0] - log_z
    x_mask = torch.exp(picked[..., 1] - log_z)
    log_n_t = torch.log1p(rho_t * x_mask)  # log(N / (1 - alpha_t)), N the normaliser of p_theta
    return a * (log_n_t - log_x_m) + b * torch.log1p(rho_diff * x_mask / (1 + rho_s * x_mask))


def d3pm_reconstruction_loss(logits: torch.Tensor, x0: torch.Tensor, reuse_logits: bool = False) -> torch.Tensor:
    """L_rec = -log x̂(x, sigma = 0)[x0] per token (SPEC-2 §12), float32 (B, L).

    logits (B, L, K): the network on the CLEAN sequence x0 at sigma = 0; x̂ = softmax over all K
    classes (the [MASK] included, as in d3pm_loss). Every position counts (z_0 = x everywhere).
    """
    log_z, _, picked = _stats(logits, ids=x0[..., None], reuse=reuse_logits)
    return log_z - picked[..., 0]


def _check_masked_rows(logits: torch.Tensor, masked: torch.Tensor) -> None:
    if logits.shape[0] != int(masked.sum()):
        raise ValueError(f'{logits.shape[0]} rows of logits for {int(masked.sum())} masked positions: pass '
                         'all (B, L, K) logits or those of the masked positions (output_rows=xt == mask_id)')


def duo_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha_t: torch.Tensor,
             dalpha_t: torch.Tensor, reuse_logits: bool = False) -> torch.Tensor:
    """Uniform-state continuous-time NELBO per token (SPEC §4), float32 (B, L).

    With a = K alpha, b = 1 - alpha, i = z_t, m = x0, x̄ = a e_m + b 1 and x̄θ = a xθ + b 1,
    the sum over j reduces to terms in x̄θ_i, x̄θ_m and S = sum_j log x̄θ_j, using
    sum_j x̄_j = K and sum_j x̄_j log x̄_j = (K-1) b log b + (a+b) log(a+b).
    """
    K = logits.shape[-1]
    alpha, dalpha = _at_least_f32(alpha_t), _at_least_f32(dalpha_t)
    a = (K * alpha).expand(x0.shape)
    b = (1 - alpha).expand(x0.shape)
    log_z, S, picked = _stats(logits, a, b, ids=torch.stack([xt, x0], dim=-1), reuse=reuse_logits)
    log_xbt_i = torch.log(a * torch.exp(picked[..., 0] - log_z) + b)
    log_xbt_m = torch.log(a * torch.exp(picked[..., 1] - log_z) + b)
    xbar_i = b + a * (xt == x0)
    sum_xbar_log_xbar = (K - 1) * torch.xlogy(b, b) + torch.xlogy(a + b, a + b)
    sum_term = (K * (log_xbt_i - torch.log(xbar_i)) + sum_xbar_log_xbar
                - b * S - a * log_xbt_m) / xbar_i
    bracket = K / xbar_i - K * torch.exp(-log_xbt_i) - sum_term
    return dalpha / (K * alpha) * bracket


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged (float64 keeps gradcheck exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softmax_stats(logits: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  excluded_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of logits (..., K): log Z = logsumexp and, given a, b (...), S = sum_j log(a p_j + b).

    p = softmax(logits) with class `excluded_id` (if any) removed. Float32 results of shape (...).
    Differentiable w.r.t. logits only.
    """
    log_z, S, _ = _stats(logits, a, b, excluded_id)
    return log_z, S


def _stats(logits, a=None, b=None, excluded_id=None, ids=None, rows=None, reuse=False):
    """softmax_stats plus the logits picked at `ids` (..., n) as (..., n) float, in one autograd node.

    Picking inside the node keeps the gradient one (B, L, K) tensor: a separate gather would
    add a zero-filled (B, L, K) gradient per gather. `rows` (...) bool: compute the statistics of
    these rows only (the others get log Z = S = 0 and no gradient through them). `reuse`: see
    the module docstring.
    """
    shape = logits.shape[:-1]
    with_s = a is not None
    if not with_s:
        a = b = logits.new_zeros(())
    if ids is None:
        ids = torch.zeros(*shape, 0, dtype=torch.long, device=logits.device)
    log_z, S, picked = _SoftmaxStats.apply(logits, a.expand(shape), b.expand(shape), ids, rows,
                                           excluded_id, with_s, reuse)
    return log_z, (S if with_s else None), picked


class _SoftmaxStats(torch.autograd.Function):
    """Fused, blocked log Z, S = sum_j log(a p_j + b) and picked logits (see _stats).

    Only the logits are saved for backward (no softmax, no float32 copy); forward and backward
    work through blocks of block_rows() rows in two reused (rows, K) buffers, a few passes each
    while the block is in cache, and write the gradient once.
    Gradients, with f = a p + b and Q = sum_j a p_j / f_j:
    d logZ / dl = p;  dS/dl_k = a p_k / f_k - p_k Q;  d picked_n / dl = e_{ids_n}.
    """

    @staticmethod
    def forward(ctx, logits, a, b, ids, rows, excluded_id, with_s, reuse):
        K = logits.shape[-1]
        flat = logits.reshape(-1, K)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        a_rows, b_rows = a.reshape(-1, 1).to(dtype), b.reshape(-1, 1).to(dtype)
        log_z = flat.new_zeros(flat.shape[0], dtype=dtype)
        S = torch.zeros_like(log_z)
        active = None if rows is None else rows.reshape(-1).nonzero().squeeze(1)
        buf = _buffer(flat, dtype)
        for sel, src in _blocks(flat, active, _buffer(flat, flat.dtype) if active is not None else None):
            w = buf[:src.shape[0]]
            m = _row_max(src, excluded_id).to(dtype)
            torch.sub(src, m, out=w)
            if excluded_id is not None:
                w[:, excluded_id] = float('-inf')
            sum_exp = w.exp_().sum(-1, keepdim=True)
            log_z[sel] = (m + sum_exp.log()).squeeze(1)
            if with_s:  # f = a p + b with p = exp(l - m) / sum_exp
                S[sel] = torch.addcmul(b_rows[sel], w, a_rows[sel] / sum_exp, out=w).log_().sum(-1)
        ids_rows = ids.reshape(flat.shape[0], -1)
        picked = flat.gather(1, ids_rows).to(dtype)
        ctx.save_for_backward(logits, a_rows, b_rows, log_z, ids_rows, active)
        ctx.excluded_id, ctx.with_s, ctx.reuse = excluded_id, with_s, _may_overwrite(logits, reuse)
        return log_z.reshape(logits.shape[:-1]), S.reshape(logits.shape[:-1]), picked.reshape(ids.shape)

    @staticmethod
    def backward(ctx, grad_log_z, grad_S, grad_picked):
        logits, a_rows, b_rows, log_z, ids_rows, active = ctx.saved_tensors
        K = logits.shape[-1]
        flat = logits.reshape(-1, K)
        dtype = log_z.dtype
        g_z = grad_log_z.reshape(-1, 1).to(dtype)
        g_s = grad_S.reshape(-1, 1).to(dtype)
        # Each block's rows are read before its gradient is written, so the gradient can take
        # the place of the logits (a reshape that copied gave us our own copy anyway).
        grad = flat if ctx.reuse or flat.data_ptr() != logits.data_ptr() else torch.empty_like(flat)
        if active is not None:  # rows without statistics: only the picks below reach them
            idle = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
            idle[active] = False
            grad.index_fill_(0, idle.nonzero().squeeze(1), 0)
        p_buf, r_buf = _buffer(flat, dtype), _buffer(flat, dtype) if ctx.with_s else None
        # selected rows: gathered into, and their gradient staged in, one reused buffer
        rows_buf = _buffer(flat, flat.dtype) if active is not None else None
        for sel, src in _blocks(flat, active, rows_buf):
            n = src.shape[0]
            p = torch.sub(src, log_z[sel, None], out=p_buf[:n])
            if ctx.excluded_id is not None:
                p[:, ctx.excluded_id] = float('-inf')
            p.exp_()
            out = grad[sel] if active is None else rows_buf[:n]
            if not ctx.with_s:
                torch.mul(p, g_z[sel], out=out)
            else:  # grad = p (g_z - g_s Q) + g_s a p / f
                a, b, gs = a_rows[sel], b_rows[sel], g_s[sel]
                r = torch.div(p, torch.addcmul(b, p, a, out=r_buf[:n]), out=r_buf[:n])
                q = r.sum(-1, keepdim=True).mul_(a)
                torch.addcmul(p.mul_(g_z[sel] - gs * q), r, gs * a, out=out)
            if active is not None:
                grad.index_copy_(0, sel, out)
        if ids_rows.shape[1]:
            grad.scatter_add_(1, ids_rows, grad_picked.reshape(ids_rows.shape).to(grad.dtype))
        return grad.reshape(logits.shape), None, None, None, None, None, None, None


def _may_overwrite(logits: torch.Tensor, reuse: bool) -> bool:
    """reuse_logits honoured: only for logits computed inside the graph, never a leaf tensor."""
    return reuse and logits.requires_grad and not logits.is_leaf


def _buffer(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (block rows, K) work buffer, reused by every block of one kernel call."""
    K = flat.shape[1]
    return flat.new_empty((min(block_rows(K, flat.device), max(flat.shape[0], 1)), K), dtype=dtype)


def _blocks(flat: torch.Tensor, active: torch.Tensor | None, gather_buf: torch.Tensor | None = None):
    """(rows selector, (n, K) rows) over all rows (slices: views) or the `active` row indices
    (copied into gather_buf, a (block rows, K) buffer of flat's dtype)."""
    step = block_rows(flat.shape[1], flat.device)
    if active is None:
        for start in range(0, flat.shape[0], step):
            sel = slice(start, start + step)
            yield sel, flat[sel]
    else:
        for start in range(0, active.shape[0], step):
            sel = active[start:start + step]
            yield sel, torch.index_select(flat, 0, sel, out=gather_buf[:sel.shape[0]])


def _row_max(rows: torch.Tensor, excluded_id: int | None) -> torch.Tensor:
    """Max per row (n, 1) over every class but `excluded_id` (a huge excluded logit must not be the shift)."""
    if excluded_id is None:
        return rows.amax(-1, keepdim=True)
    K = rows.shape[-1]
    excluded_id = excluded_id % K
    parts = [part.amax(-1, keepdim=True) for part in (rows[:, :excluded_id], rows[:, excluded_id + 1:])
             if part.shape[-1]]
    return torch.maximum(*parts) if len(parts) == 2 else parts[0]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_type: str = 'kl-bwd',
                    reuse_logits: bool = False) -> torch.Tensor:
    """Per-token KL between student and teacher predictions (B, L, K) -> (B, L), at least float32.

    kl-bwd = KL(p_student || p_teacher) (DCD default); kl-fwd = KL(p_teacher || p_student).
    Fused and chunked like softmax_stats: no (B, L, K) float32 intermediate is kept.
    `reuse_logits` applies to the student's logits (see the module docstring).
    """
    if loss_type not in ('kl-bwd', 'kl-fwd'):
        raise ValueError(f"algo.loss_type={loss_type!r} is unknown; use kl-bwd or kl-fwd (e.g. algo.loss_type=kl-bwd)")
    return _ChunkedKL.apply(student_logits, teacher_logits, loss_type == 'kl-bwd', reuse_logits)


class _ChunkedKL(torch.autograd.Function):
    """KL(p_s || p_t) (backward=True) or KL(p_t || p_s) per row of the logits, block_rows() rows at a time.

    With p = softmax(student), q = softmax(teacher) and D the row's KL:
    KL(p || q): dD/ds = p (log p - log q - D),  dD/dt = q - p;
    KL(q || p): dD/ds = p - q,                  dD/dt = q (log q - log p - D).
    """

    @staticmethod
    def forward(ctx, student, teacher, backward_kl, reuse):
        K = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, K), teacher.reshape(-1, K)
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        kl = torch.empty(s_rows.shape[0], device=student.device, dtype=dtype)
        for sl, _ in _blocks(s_rows, None):
            log_p, log_q = torch.log_softmax(s_rows[sl].to(dtype), -1), torch.log_softmax(t_rows[sl].to(dtype), -1)
            if backward_kl:
                kl[sl] = (log_p.exp() * (log_p - log_q)).sum(-1)
            else:
                kl[sl] = (log_q.exp() * (log_q - log_p)).sum(-1)
        ctx.save_for_backward(student, teacher, kl)
        ctx.backward_kl, ctx.reuse = backward_kl, _may_overwrite(student, reuse)
        return kl.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, kl = ctx.saved_tensors
        K = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, K), teacher.reshape(-1, K)
        g_rows, kl_rows = grad_kl.reshape(-1, 1), kl.reshape(-1, 1)
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s = None
        if want_s:  # as in _SoftmaxStats: a block is read before its gradient is written
            grad_s = s_rows if ctx.reuse or s_rows.data_ptr() != student.data_ptr() else torch.empty_like(s_rows)
        grad_t = torch.empty_like(t_rows) if want_t else None
        for sl, _ in _blocks(s_rows, None):
            log_p, log_q = torch.log_softmax(s_rows[sl].to(kl.dtype), -1), torch.log_softmax(t_rows[sl].to(kl.dtype), -1)
            p, q = log_p.exp(), log_q.exp()
            if ctx.backward_kl:
                d_s = p * (log_p - log_q - kl_rows[sl]) if want_s else None
                d_t = q - p if want_t else None
            else:
                d_s = p - q if want_s else None
                d_t = q * (log_q - log_p - kl_rows[sl]) if want_t else None
            if want_s:
                grad_s[sl] = (g_rows[sl] * d_s).to(grad_s.dtype)
            if want_t:
                grad_t[sl] = (g_rows[sl] * d_t).to(grad_t.dtype)
        return (grad_s.reshape(student.shape) if want_s else None,
                grad_t.reshape(teacher.shape) if want_t else None, None, None)

