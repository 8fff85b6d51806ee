"""Per-token training losses (SPEC §4), pure functions of the network's logits.

Shapes: logits (B, L, K) in any float dtype; token ids x0, xt (B, L) int64; per-sequence
alpha_t, dalpha_t (B, 1). Every loss returns float32 (B, L): the reported NLL bound is their
mean over all positions. Losses are computed in float32 whatever the autocast precision, and
none keeps a (B, L, K) intermediate alive for backward beyond the logits themselves.
"""
import torch

# Rows processed at once by the fused softmax statistics: bounds their float32 temporaries
# to a few (CHUNK_ROWS, K) blocks instead of (B * L, K).
CHUNK_ROWS = 1024


def ar_nll(logits: torch.Tensor, x0: torch.Tensor, excluded_id: int | None = None) -> torch.Tensor:
    """-log p(x_{j+1} | x_{<=j}) for j = 0..L-2, as (B, L-1) float32.

    `excluded_id` (the extra [MASK]/pad id) can never be predicted: its logit is -inf.
    """
    log_z, _ = softmax_stats(logits, excluded_id=excluded_id)  # all L rows: no strided copy
    return log_z[:, :-1] - _gather(logits[:, :-1], x0[:, 1:])


def mdlm_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha_t: torch.Tensor,
              dalpha_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Continuous-time MDLM NELBO per token, SUBS parameterisation (SPEC §4).

    l = alpha'_t / (1 - alpha_t) * log x_theta[x0] at masked positions, 0 elsewhere (unmasked
    positions copy their input, so they cost nothing). The [MASK] logit is -inf.
    """
    log_z, _ = softmax_stats(logits, excluded_id=mask_id)
    log_p_x0 = _gather(logits, x0) - log_z
    weight = _at_least_f32(dalpha_t / (1 - alpha_t))
    return torch.where(xt == mask_id, weight * log_p_x0, torch.zeros_like(log_p_x0))


def duo_loss(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, alpha_t: torch.Tensor,
             dalpha_t: torch.Tensor) -> torch.Tensor:
    """Uniform-state continuous-time NELBO per token (SPEC §4), float32 (B, L).

    With a = K alpha, b = 1 - alpha, i = z_t, m = x0, x̄ = a e_m + b 1 and x̄θ = a xθ + b 1,
    the sum over j reduces to terms in x̄θ_i, x̄θ_m and S = sum_j log x̄θ_j, using
    sum_j x̄_j = K and sum_j x̄_j log x̄_j = (K-1) b log b + (a+b) log(a+b).
    """
    K = logits.shape[-1]
    alpha, dalpha = _at_least_f32(alpha_t), _at_least_f32(dalpha_t)
    a = (K * alpha).expand(x0.shape)
    b = (1 - alpha).expand(x0.shape)
    log_z, S = softmax_stats(logits, a, b)
    log_xbt_i = torch.log(a * torch.exp(_gather(logits, xt) - log_z) + b)
    log_xbt_m = torch.log(a * torch.exp(_gather(logits, x0) - log_z) + b)
    xbar_i = b + a * (xt == x0)
    sum_xbar_log_xbar = (K - 1) * torch.xlogy(b, b) + torch.xlogy(a + b, a + b)
    sum_term = (K * (log_xbt_i - torch.log(xbar_i)) + sum_xbar_log_xbar
                - b * S - a * log_xbt_m) / xbar_i
    bracket = K / xbar_i - K * torch.exp(-log_xbt_i) - sum_term
    return dalpha / (K * alpha) * bracket


def _gather(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return _at_least_f32(logits.gather(-1, ids[..., None]).squeeze(-1))


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged (float64 keeps gradcheck exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def softmax_stats(logits: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
                  excluded_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of logits (..., K): log Z = logsumexp and, given a, b (...), S = sum_j log(a p_j + b).

    p = softmax(logits) with class `excluded_id` (if any) removed. Float32 results of shape (...).
    Differentiable w.r.t. logits only.
    """
    with_s = a is not None
    if not with_s:
        a = b = logits.new_zeros(())
    log_z, S = _SoftmaxStats.apply(logits, a.expand(logits.shape[:-1]), b.expand(logits.shape[:-1]),
                                   excluded_id, with_s)
    return log_z, (S if with_s else None)


class _SoftmaxStats(torch.autograd.Function):
    """Fused, chunked log Z and S = sum_j log(a p_j + b) (see softmax_stats).

    Only the logits are saved for backward (no softmax, no float32 copy); forward and backward
    run over CHUNK_ROWS rows at a time so the float32 temporaries stay (CHUNK_ROWS, K).
    Gradients: d logZ / dl = p;  dS/dl_k = a p_k / f_k - p_k sum_j a p_j / f_j, f = a p + b.
    """

    @staticmethod
    def forward(ctx, logits, a, b, excluded_id, with_s):
        rows = logits.reshape(-1, logits.shape[-1])
        dtype = torch.promote_types(logits.dtype, torch.float32)
        a_rows, b_rows = a.reshape(-1, 1).to(dtype), b.reshape(-1, 1).to(dtype)
        log_z = torch.empty(rows.shape[0], device=logits.device, dtype=dtype)
        S = torch.zeros_like(log_z)
        for sl in _chunks(rows.shape[0]):
            log_p = _log_softmax_rows(rows[sl], excluded_id)
            log_z[sl] = log_p[1]
            if with_s:
                S[sl] = torch.log(log_p[0].exp_().mul_(a_rows[sl]).add_(b_rows[sl])).sum(-1)
        ctx.save_for_backward(logits, a_rows, b_rows)
        ctx.excluded_id, ctx.with_s = excluded_id, with_s
        shape = logits.shape[:-1]
        return log_z.reshape(shape), S.reshape(shape)

    @staticmethod
    def backward(ctx, grad_log_z, grad_S):
        logits, a_rows, b_rows = ctx.saved_tensors
        rows = logits.reshape(-1, logits.shape[-1])
        g_z = grad_log_z.reshape(-1, 1)
        g_s = grad_S.reshape(-1, 1) if ctx.with_s else None
        grad = torch.empty_like(rows)
        for sl in _chunks(rows.shape[0]):
            p = _log_softmax_rows(rows[sl], ctx.excluded_id)[0].exp_()
            g = g_z[sl] * p
            if g_s is not None:
                ap_over_f = a_rows[sl] * p / (a_rows[sl] * p + b_rows[sl])
                g += g_s[sl] * (ap_over_f - p * ap_over_f.sum(-1, keepdim=True))
            grad[sl] = g.to(grad.dtype)
        return grad.reshape(logits.shape), None, None, None, None


def _chunks(n: int):
    return (slice(i, i + CHUNK_ROWS) for i in range(0, n, CHUNK_ROWS))


def _log_softmax_rows(rows: torch.Tensor, excluded_id: int | None):
    """(log_softmax (n, K) fresh tensor of at least float32, logsumexp (n,)) with one class excluded."""
    x = _at_least_f32(rows)
    if x.data_ptr() == rows.data_ptr():
        x = x.clone()  # float32 input: never write into the caller's logits
    if excluded_id is not None:
        x[:, excluded_id] = float('-inf')
    log_z = torch.logsumexp(x, -1)
    return x.sub_(log_z[:, None]), log_z


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_type: str = 'kl-bwd') -> torch.Tensor:
    """Per-token KL between student and teacher predictions (B, L, K) -> (B, L), at least float32.

    kl-bwd = KL(p_student || p_teacher) (DCD default); kl-fwd = KL(p_teacher || p_student).
    Fused and chunked like softmax_stats: no (B, L, K) float32 intermediate is kept.
    """
    if loss_type not in ('kl-bwd', 'kl-fwd'):
        raise ValueError(f"algo.loss_type={loss_type!r} is unknown; use kl-bwd or kl-fwd (e.g. algo.loss_type=kl-bwd)")
    return _ChunkedKL.apply(student_logits, teacher_logits, loss_type == 'kl-bwd')


class _ChunkedKL(torch.autograd.Function):
    """KL(p_s || p_t) (backward=True) or KL(p_t || p_s) per row of the logits, CHUNK_ROWS rows at a time.

    With p = softmax(student), q = softmax(teacher) and D the row's KL:
    KL(p || q): dD/ds = p (log p - log q - D),  dD/dt = q - p;
    KL(q || p): dD/ds = p - q,                  dD/dt = q (log q - log p - D).
    """

    @staticmethod
    def forward(ctx, student, teacher, backward_kl):
        K = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, K), teacher.reshape(-1, K)
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
        kl = torch.empty(s_rows.shape[0], device=student.device, dtype=dtype)
        for sl in _chunks(s_rows.shape[0]):
            log_p, log_q = torch.log_softmax(s_rows[sl].to(dtype), -1), torch.log_softmax(t_rows[sl].to(dtype), -1)
            if backward_kl:
                kl[sl] = (log_p.exp() * (log_p - log_q)).sum(-1)
            else:
                kl[sl] = (log_q.exp() * (log_q - log_p)).sum(-1)
        ctx.save_for_backward(student, teacher, kl)
        ctx.backward_kl = backward_kl
        return kl.reshape(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, kl = ctx.saved_tensors
        K = student.shape[-1]
        s_rows, t_rows = student.reshape(-1, K), teacher.reshape(-1, K)
        g_rows, kl_rows = grad_kl.reshape(-1, 1), kl.reshape(-1, 1)
        want_s, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_s = torch.empty_like(s_rows) if want_s else None
        grad_t = torch.empty_like(t_rows) if want_t else None
        for sl in _chunks(s_rows.shape[0]):
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
                grad_t.reshape(teacher.shape) if want_t else None, None)

