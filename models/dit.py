"""DiT backbone of DUO / MDLM / AR (SPEC §8), loadable from upstream and released weights.

Parameter names, their registration order (the EMA stores shadow params as a list in this
order) and every numerical convention follow SPEC §8. Shapes: B batch, L length, K vocabulary,
d hidden size, c condition size, H heads, Dh = d / H head size.

The attention backend is runtime.py's decision: FlashAttention when it imports and a CUDA GPU
with compute capability >= 8.0 is present, else torch SDPA; `attn_backend` overrides it per model.
"""
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime

log = logging.getLogger(__name__)

SIGMA_FEATURES = 256
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def sigma_features(sigma: torch.Tensor, dim: int = SIGMA_FEATURES,
                   max_period: float = 10000.0) -> torch.Tensor:
    """sigma (B,) -> (B, dim) float32 features [cos(sigma f), sin(sigma f)], f_j = max_period^(-j/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return h * (1 + scale) + shift


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, L, ..., Dh) by the angles of cos, sin (L, Dh/2), halves convention.

    Equals x*[cos, cos] + rotate_half(x)*[sin, sin] with rotate_half(x) = [-x2, x1].
    """
    shape = (cos.shape[0],) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    cos = cos.view(shape).to(x.dtype)
    sin = sin.view(shape).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def sdpa_mask(attention_mask: torch.Tensor | None, length: int, causal: bool):
    """Mask arguments of F.scaled_dot_product_attention for keys (B, L) 1 = token, 0 = padding.

    Returns (attn_mask, is_causal); attn_mask is boolean (True = may attend), (B, 1, 1, L)
    without causality, (B, 1, L, L) with it. No query row is left without keys (that gives
    NaN): an all-padding sequence attends everywhere, and a causal query always sees itself.
    Outputs at padded queries are meaningless; real queries never see padded keys.
    """
    if attention_mask is None:
        return None, causal
    valid = attention_mask.bool()
    if not causal:
        valid = valid | ~valid.any(dim=-1, keepdim=True)
        return valid[:, None, None, :], False
    ones = torch.ones(length, length, dtype=torch.bool, device=valid.device)
    return (valid[:, None, None, :] & ones.tril()) | torch.eye(length, dtype=torch.bool, device=valid.device), False


def sdpa_attention(q, k, v, attn_mask=None, is_causal=False) -> torch.Tensor:
    """q (B, Lq, H, Dh), k, v (B, Lk, H, Dh) -> (B, Lq, H, Dh); softmax(q k^T / sqrt(Dh)) v."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=is_causal)
    return out.transpose(1, 2)


def _flash_attention(q, k, v, causal, unpad):
    """FlashAttention on (B, L, H, Dh); unpad = (token indices, cu_seqlens) when padded."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func  # only where runtime found it usable
    if unpad is None:
        return flash_attn_func(q, k, v, causal=causal)
    index, cu_seqlens = unpad
    B, L, H, Dh = q.shape
    out = flash_attn_varlen_func(
        q.reshape(B * L, H, Dh)[index], k.reshape(B * L, H, Dh)[index],
        v.reshape(B * L, H, Dh)[index], cu_seqlens, cu_seqlens, L, L, causal=causal)
    return q.new_zeros(B * L, H, Dh).index_copy_(0, index, out).view(B, L, H, Dh)


@dataclass
class KVCache:
    """Rotated keys and values of a causal DiT for incremental decoding.

    k, v: (n_blocks, B, H, max_len, Dh); positions [0, length) are filled.
    """
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def _cached_attention(cache: KVCache, layer: int, q, k, v):
    """Append k, v (B, n, H, Dh) at positions [cache.length, +n) of `layer`, attend over all."""
    start, n = cache.length, q.shape[1]
    end = start + n
    cache.k[layer, :, :, start:end] = k.transpose(1, 2)
    cache.v[layer, :, :, start:end] = v.transpose(1, 2)
    keys = cache.k[layer, :, :, :end].to(q.dtype)
    values = cache.v[layer, :, :, :end].to(q.dtype)
    attn_mask = None
    if n > 1 and start > 0:  # query i (position start + i) sees keys at positions <= start + i
        attn_mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn_mask,
                                         is_causal=n > 1 and start == 0)
    return out.transpose(1, 2)


class LayerNorm(nn.Module):
    """LayerNorm without bias, normalised in float32 (eps 1e-5), then times the weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-5) * self.weight.float()
        return h.type_as(x)


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """x: ids (B, L), or weights (B, L, K) over the vocabulary, or with `weights` (B, L, k) the ids
        (B, L, k) they weigh (the top-k relaxed input: sum_slots weights * E[ids]) -> (B, L, d)."""
        if weights is not None:
            B, L, k = x.shape
            # float32 with autocast off, as the dense relaxed input; the bag sum never builds (B, L, K)
            with torch.autocast(x.device.type, enabled=False):
                h = F.embedding_bag(x.reshape(B * L, k), self.embedding.float(),
                                    per_sample_weights=weights.reshape(B * L, k).float(), mode='sum')
            return h.view(B, L, -1).type_as(self.embedding)
        if not x.is_floating_point():
            return F.embedding(x, self.embedding)
        # Autocast off so that it does not make a low-precision copy of the (B, L, K) weights.
        with torch.autocast(x.device.type, enabled=False):
            return torch.matmul(x, self.embedding.to(x.dtype)).type_as(self.embedding)


class TimestepEmbedder(nn.Module):
    """sigma (B,) -> (B, c): sinusoidal features, Linear(256, c), SiLU, Linear(c, c)."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(SIGMA_FEATURES, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(sigma_features(sigma).to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer('inv_freq', inv_freq)  # persistent: upstream checkpoints hold it

    def forward(self, start: int, length: int):
        """cos, sin (length, Dh/2) float32 of the angles at positions start .. start+length-1."""
        pos = torch.arange(start, start + length, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(pos, self.inv_freq.float())
        return angles.cos(), angles.sin()


def _zero_linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float, adaLN: bool):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate='tanh'),
                                 nn.Linear(4 * dim, dim))
        self.adaLN_modulation = _zero_linear(cond_dim, 6 * dim) if adaLN else None

    def forward(self, x, c, cos, sin, attend):
        """x (B, L, d), c (B, c) or None, cos/sin (L, Dh/2), attend(q, k, v) -> (B, L, H, Dh)."""
        B, L, d = x.shape
        h = self.norm1(x)
        if self.adaLN_modulation is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = (
                self.adaLN_modulation(c)[:, None].chunk(6, dim=2))
            h = modulate(h, shift1, scale1)
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, d // self.n_heads)
        qk = apply_rotary(qkv[:, :, :2], cos, sin)
        a = attend(qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2]).reshape(B, L, d)
        a = F.dropout(self.attn_out(a), self.dropout, self.training)
        if self.adaLN_modulation is None:
            x = x + a
            return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)
        x = x + gate1 * a
        m = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2 * F.dropout(m, self.dropout, self.training)


class DiTFinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int, adaLN: bool):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = _zero_linear(dim, vocab_size)
        self.adaLN_modulation = _zero_linear(cond_dim, 2 * dim) if adaLN else None

    def forward(self, x, c, rows=None, out=None):
        """Logits (B, L, K) of x (B, L, d), or (n, K) of the n positions where `rows` (B, L) is True;
        written into `out` (that shape, h's dtype) when given."""
        h = self.norm_final(x)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
            h = modulate(h, shift, scale)
        if rows is not None:
            h = h[rows]
        if out is None:
            return self.linear(h)
        torch.addmm(self.linear.bias, h.reshape(-1, h.shape[-1]), self.linear.weight.t(),
                    out=out.view(-1, out.shape[-1]))
        return out


class DiT(nn.Module):
    """Diffusion transformer over token ids (SPEC §8); causal=True gives the AR transformer.

    The non-causal model is conditioned on sigma through adaLN (MDLM passes zeros); the causal
    model has no sigma_map and no adaLN parameters.
    """

    def __init__(self, vocab_size: int, hidden_size: int, cond_dim: int, n_blocks: int,
                 n_heads: int, max_length: int, dropout: float = 0.0, causal: bool = False,
                 attn_backend: str = 'auto'):
        super().__init__()
        if hidden_size % n_heads or (hidden_size // n_heads) % 2:
            raise ValueError(f'model.hidden_size={hidden_size} must be n_heads={n_heads} times an '
                             'even head size; e.g. model.hidden_size=768 model.n_heads=12')
        self.vocab_size, self.hidden_size, self.cond_dim = vocab_size, hidden_size, cond_dim
        self.n_blocks, self.n_heads, self.max_length = n_blocks, n_heads, max_length
        self.dropout, self.causal = dropout, causal
        self.attn_backend = runtime.resolve_attn_backend(attn_backend)
        # Registration order fixes parameters() order, which EMA shadow lists rely on.
        self.vocab_embed = VocabEmbedding(vocab_size, hidden_size)
        if not causal:
            self.sigma_map = TimestepEmbedder(cond_dim)
        self.rotary_emb = Rotary(hidden_size // n_heads)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, n_heads, cond_dim, dropout, adaLN=not causal)
            for _ in range(n_blocks))
        self.output_layer = DiTFinalLayer(hidden_size, vocab_size, cond_dim, adaLN=not causal)
        log.info('DiT (%s) uses %s attention', 'causal' if causal else 'bidirectional',
                 self.attn_backend)

    def init_kv_cache(self, batch_size: int, max_len: int | None = None, device=None,
                      dtype=None) -> KVCache:
        """Empty cache for `forward(x_new, kv_cache=cache)`; dtype should match the attention
        inputs (the autocast dtype under mixed precision) to avoid casts at every step."""
        if not self.causal:
            raise ValueError('a KV cache needs a causal model (algo=ar); diffusion models '
                             'attend to every position')
        ref = self.vocab_embed.embedding
        shape = (self.n_blocks, batch_size, self.n_heads, max_len or self.max_length,
                 self.hidden_size // self.n_heads)
        device, dtype = device or ref.device, dtype or ref.dtype
        return KVCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, output_rows: torch.Tensor | None = None,
                out: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, K) in the compute dtype (float32, or the autocast dtype).

        x: int ids (B, L), or float weights (B, L, K) whose rows are distributions over the
        vocabulary (embedding = x @ vocab_embed.embedding), or with `weights` (B, L, k) float the
        int ids (B, L, k) they weigh: the top-k relaxed input of latents.topk_relaxed_latent,
        embedding = sum_slots weights * E[ids] (float32). sigma: (B,) noise level, required
        by the non-causal model and ignored by the causal one. attention_mask: (B, L), 1 = token,
        0 = padding, masked out as keys. kv_cache (causal only): x holds the next tokens after
        the kv_cache.length cached ones; their keys/values are appended and only their logits
        returned. output_rows: (B, L) bool; only the logits of those positions are computed and
        returned, as (n, K) in row-major order (every position is still attended to). out: a
        contiguous tensor of the result's shape and dtype to write the logits into (CPU sampling
        reuses one for every step; see diffusion._Diffusion.sample).
        """
        B, L = x.shape[:2]
        start = 0 if kv_cache is None else kv_cache.length
        if kv_cache is not None:
            self._check_cache(kv_cache, L, attention_mask)
        if output_rows is not None and (output_rows.dtype != torch.bool or output_rows.shape != (B, L)):
            raise ValueError(f'output_rows must be a bool mask of shape {(B, L)} (the positions whose '
                             f'logits are wanted), got {output_rows.dtype} {tuple(output_rows.shape)}')
        if weights is not None:
            if x.is_floating_point() or x.dim() != 3 or weights.shape != x.shape or not weights.is_floating_point():
                raise ValueError(f'with weights, x must be int ids (B, L, k) and weights float of the same shape, '
                                 f'got x {x.dtype} {tuple(x.shape)} and weights {weights.dtype} {tuple(weights.shape)}')
        elif x.is_floating_point() and (x.dim() != 3 or x.shape[-1] != self.vocab_size):
            raise ValueError(f'float input must be weights (B, L, K={self.vocab_size}) over the '
                             f'vocabulary, got shape {tuple(x.shape)}')
        if start + L > self.max_length:
            raise ValueError(f'sequence length {start + L} exceeds the model length '
                             f'{self.max_length}; e.g. model.length={start + L}')
        c = None
        if not self.causal:
            if sigma is None:
                raise ValueError('the non-causal DiT needs sigma (B,); MDLM passes zeros')
            c = F.silu(self.sigma_map(sigma.reshape(-1).expand(B)))
        cos, sin = self.rotary_emb(start, L)
        h = self.vocab_embed(x, weights)
        attend = self._attention(attention_mask, L, kv_cache)
        for i, block in enumerate(self.blocks):
            layer_attend = attend if kv_cache is None else functools.partial(attend, i)
            h = block(h, c, cos, sin, layer_attend)
        if kv_cache is not None:
            kv_cache.length = start + L
        return self.output_layer(h, c, output_rows, out)

    def _check_cache(self, kv_cache, length, attention_mask):
        if not self.causal:
            raise ValueError('kv_cache needs a causal model (algo=ar)')
        if attention_mask is not None:
            raise ValueError('attention_mask is not supported with kv_cache; decode unpadded batches')
        if kv_cache.length + length > kv_cache.max_len:
            raise ValueError(f'the KV cache holds {kv_cache.max_len} positions but '
                             f'{kv_cache.length + length} are needed; pass a larger max_len')

    def _attention(self, attention_mask, length, kv_cache):
        """attend(q, k, v) for every block of one forward pass (masks built once)."""
        if kv_cache is not None:
            return functools.partial(_cached_attention, kv_cache)
        attn_mask, is_causal = sdpa_mask(attention_mask, length, self.causal)
        sdpa = functools.partial(sdpa_attention, attn_mask=attn_mask, is_causal=is_causal)
        if self.attn_backend == 'sdpa':
            return sdpa
        unpad = None
        if attention_mask is not None:
            lengths = attention_mask.sum(dim=-1, dtype=torch.int32)
            unpad = (attention_mask.flatten().nonzero().flatten(),
                     F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)))

        def attend(q, k, v):
            if q.dtype not in _HALF_DTYPES:  # FlashAttention runs in fp16/bf16 only
                return sdpa(q, k, v)
            return _flash_attention(q, k, v, self.causal, unpad)
        return attend
