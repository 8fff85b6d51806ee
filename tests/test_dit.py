"""DiT backbone (SPEC §8): layout, parameter counts, attention, masking, KV cache, backends.

The model is checked against an independent float64 re-implementation written here from the
SPEC text (explicit LayerNorm, rotary, einsum attention with explicit masks).
"""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import runtime
from models.dit import DiT, sdpa_attention, sdpa_mask

K, D, C, N_BLOCKS, HEADS, MAX_LEN = 37, 32, 16, 2, 4, 16


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (fresh adaLN / output layers are zero, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm1.weight') or name.endswith('norm2.weight') or 'norm_final' in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and name != 'vocab_embed.embedding':
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p.dim() == 2 else 0.1))
    return model.eval()


def small_model(causal=False, seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_(DiT(K, D, C, N_BLOCKS, HEADS, MAX_LEN, causal=causal, **kw), seed)


# --------------------------------------------------------------------------- reference (float64)

def ref_layer_norm(x, w):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_attention(q, k, v, allowed):
    """q, k, v (B, L, H, Dh); allowed (B, Lq, Lk) bool -> (B, Lq, H, Dh)."""
    scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float('-inf'))
    return torch.einsum('bhqk,bkhd->bqhd', scores.softmax(-1), v)


def ref_allowed(key_valid, causal):
    """key_valid (B, L) bool -> (B, L, L): query q may attend key k."""
    L = key_valid.shape[1]
    allowed = key_valid[:, None, :].expand(-1, L, -1)
    if causal:
        allowed = allowed & (torch.arange(L)[None, :] <= torch.arange(L)[:, None])
    return allowed


def ref_forward(sd, n_heads, ids, sigma, key_valid, causal):
    sd = {k: v.double() for k, v in sd.items()}
    E = sd['vocab_embed.embedding']
    d = E.shape[1]
    B, L = ids.shape
    dh = d // n_heads
    x = E[ids]
    lin = lambda h, name, bias=True: h @ sd[name + '.weight'].T + (sd[name + '.bias'] if bias else 0)
    if not causal:
        half = 128
        f = torch.tensor([math.exp(-math.log(10000) * j / half) for j in range(half)], dtype=torch.float64)
        feats = torch.cat([torch.cos(sigma.double()[:, None] * f), torch.sin(sigma.double()[:, None] * f)], -1)
        c = F.silu(lin(F.silu(lin(feats, 'sigma_map.mlp.0')), 'sigma_map.mlp.2'))
    inv = torch.tensor([10000 ** (-2 * j / dh) for j in range(dh // 2)], dtype=torch.float64)
    theta = torch.arange(L, dtype=torch.float64)[:, None] * inv
    cos = torch.cat([theta.cos(), theta.cos()], -1)[:, None, :]
    sin = torch.cat([theta.sin(), theta.sin()], -1)[:, None, :]
    rot_half = lambda t: torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1)
    allowed = ref_allowed(key_valid, causal)
    for n in range(sum(k.endswith('norm1.weight') for k in sd)):
        p = f'blocks.{n}.'
        h = ref_layer_norm(x, sd[p + 'norm1.weight'])
        if not causal:
            chunks = lin(c, p + 'adaLN_modulation')[:, None]
            shift1, scale1, gate1, shift2, scale2, gate2 = [chunks[..., i * d:(i + 1) * d] for i in range(6)]
            h = h * (1 + scale1) + shift1
        qkv = lin(h, p + 'attn_qkv', bias=False)
        q, k, v = [qkv[..., i * d:(i + 1) * d].reshape(B, L, n_heads, dh) for i in range(3)]
        q = q * cos + rot_half(q) * sin
        k = k * cos + rot_half(k) * sin
        a = lin(ref_attention(q, k, v, allowed).reshape(B, L, d), p + 'attn_out', bias=False)
        x = x + (a if causal else gate1 * a)
        h = ref_layer_norm(x, sd[p + 'norm2.weight'])
        if not causal:
            h = h * (1 + scale2) + shift2
        m = lin(ref_gelu_tanh(lin(h, p + 'mlp.0')), p + 'mlp.2')
        x = x + (m if causal else gate2 * m)
    h = ref_layer_norm(x, sd['output_layer.norm_final.weight'])
    if not causal:
        mod = lin(c, 'output_layer.adaLN_modulation')[:, None]
        h = h * (1 + mod[..., d:]) + mod[..., :d]
    return lin(h, 'output_layer.linear')


# --------------------------------------------------------------------------- layout and size

def expected_keys(n_blocks, causal):
    keys = ['vocab_embed.embedding']
    if not causal:
        keys += [f'sigma_map.mlp.{i}.{w}' for i in (0, 2) for w in ('weight', 'bias')]
    keys.append('rotary_emb.inv_freq')
    for n in range(n_blocks):
        p = f'blocks.{n}.'
        keys += [p + 'norm1.weight', p + 'attn_qkv.weight', p + 'attn_out.weight', p + 'norm2.weight',
                 p + 'mlp.0.weight', p + 'mlp.0.bias', p + 'mlp.2.weight', p + 'mlp.2.bias']
        if not causal:
            keys += [p + 'adaLN_modulation.weight', p + 'adaLN_modulation.bias']
    keys += ['output_layer.norm_final.weight', 'output_layer.linear.weight', 'output_layer.linear.bias']
    if not causal:
        keys += ['output_layer.adaLN_modulation.weight', 'output_layer.adaLN_modulation.bias']
    return keys


@pytest.mark.parametrize('causal', [False, True])
def test_state_dict_keys_and_order(causal):
    model = DiT(K, D, C, 3, HEADS, MAX_LEN, causal=causal)
    keys = expected_keys(3, causal)
    assert list(model.state_dict()) == keys
    # EMA shadow params are a list in parameters() order: it must be upstream's order.
    assert [n for n, _ in model.named_parameters()] == [k for k in keys if k != 'rotary_emb.inv_freq']
    sd = model.state_dict()
    assert sd['vocab_embed.embedding'].shape == (K, D)
    assert sd['blocks.0.attn_qkv.weight'].shape == (3 * D, D)
    assert sd['output_layer.linear.weight'].shape == (K, D)
    assert torch.allclose(sd['rotary_emb.inv_freq'],
                          torch.tensor([10000 ** (-2 * j / (D // HEADS)) for j in range(D // HEADS // 2)]))
    if not causal:
        assert sd['blocks.0.adaLN_modulation.weight'].shape == (6 * D, C)
        assert sd['output_layer.adaLN_modulation.weight'].shape == (2 * D, C)
        assert sd['sigma_map.mlp.0.weight'].shape == (C, 256)


def n_params_formula(K, d, c, n, causal):
    block = 2 * d + 3 * d * d + d * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    final = d + d * K + K
    total = K * d + n * block + final
    if not causal:
        total += (256 * c + c) + (c * c + c) + n * (c * 6 * d + 6 * d) + (c * 2 * d + 2 * d)
    return total


@pytest.mark.parametrize('name,d,n,heads,millions', [
    ('tiny', 256, 8, 8, 33.8), ('small', 768, 12, 12, 169.6), ('medium', 1024, 24, 16, 424.5)])
def test_parameter_counts(name, d, n, heads, millions):
    for causal in (False, True):
        with torch.device('meta'):
            model = DiT(50258, d, 128, n, heads, 1024, causal=causal)
        count = sum(p.numel() for p in model.parameters())
        assert count == n_params_formula(50258, d, 128, n, causal)
        if not causal:
            assert round(count / 1e6, 1) == millions, name


def test_fresh_model_outputs_zero_logits():
    model = DiT(K, D, C, N_BLOCKS, HEADS, MAX_LEN)
    for name, p in model.named_parameters():
        if 'adaLN_modulation' in name or 'output_layer.linear' in name:
            assert torch.count_nonzero(p) == 0, name
    ids = torch.randint(0, K, (2, 8))
    assert torch.count_nonzero(model(ids, torch.rand(2))) == 0


# --------------------------------------------------------------------------- attention

MASKS = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                      [1, 1, 1, 1, 0, 0, 0],
                      [0, 0, 1, 1, 1, 1, 1],
                      [0, 0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('padded', [False, True])
def test_sdpa_matches_softmax_reference(causal, padded):
    g = torch.Generator().manual_seed(1)
    B, L, H, Dh = 4, 7, 3, 8
    q, k, v = (torch.randn(B, L, H, Dh, generator=g) for _ in range(3))
    attention_mask = MASKS if padded else None
    out = sdpa_attention(q, k, v, *sdpa_mask(attention_mask, L, causal))
    assert out.shape == (B, L, H, Dh)
    assert torch.isfinite(out).all()  # also on padded rows and the all-padding sequence
    key_valid = MASKS.bool() if padded else torch.ones(B, L, dtype=torch.bool)
    ref = ref_attention(q.double(), k.double(), v.double(), ref_allowed(key_valid, causal))
    real = key_valid  # query rows of real tokens; every one of them has a valid key
    torch.testing.assert_close(out[real], ref[real].float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_model_matches_independent_reference(causal):
    model = small_model(causal)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, K, (3, 9), generator=g)
    sigma = torch.rand(3, generator=g) * 5
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
    with torch.no_grad():
        out = model(ids, sigma, attention_mask=mask)
        out_nomask = model(ids, sigma)
    ref = ref_forward(model.state_dict(), HEADS, ids, sigma, mask.bool(), causal)
    ref_nomask = ref_forward(model.state_dict(), HEADS, ids, sigma, torch.ones(3, 9, dtype=torch.bool), causal)
    real = mask.bool()
    torch.testing.assert_close(out[real].double(), ref[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_nomask.double(), ref_nomask, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize('causal', [False, True])
def test_padding_invariance(causal):
    model = small_model(causal)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, K, (3, 10), generator=g)
    sigma = torch.rand(3, generator=g)
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6, [0] * 10])
    other = torch.where(mask.bool(), ids, torch.randint(0, K, ids.shape, generator=g))
    with torch.no_grad():
        a = model(ids, sigma, attention_mask=mask)
        b = model(other, sigma, attention_mask=mask)
        alone = model(ids[1:2, :4], sigma[1:2])  # the padded row equals its unpadded prefix
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[1, :4], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_causal_logits_ignore_future_tokens():
    model = small_model(causal=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, K, (2, 12), generator=g)
    with torch.no_grad():
        base = model(ids)
        for j in (0, 5, 10):
            changed = ids.clone()
            changed[:, j + 1:] = torch.randint(0, K, (2, 11 - j), generator=g)
            torch.testing.assert_close(model(changed)[:, :j + 1], base[:, :j + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(model(changed)[:, j + 1:], base[:, j + 1:])


def test_bidirectional_logits_see_every_token():
    model = small_model()
    ids = torch.randint(0, K, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % K
    with torch.no_grad():
        assert not torch.allclose(model(ids, torch.zeros(1))[0, 0], model(changed, torch.zeros(1))[0, 0])


# --------------------------------------------------------------------------- inputs and outputs

@pytest.mark.parametrize('causal', [False, True])
def test_relaxed_one_hot_equals_ids(causal):
    model = small_model(causal)
    ids = torch.randint(0, K, (2, 11))
    sigma = torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(model(F.one_hot(ids, K).float(), sigma), model(ids, sigma),
                                   atol=1e-6, rtol=0)


def test_relaxed_weights_embed_as_mixture():
    model = small_model()
    w = torch.softmax(torch.randn(2, 5, K), -1)
    expected = torch.einsum('blk,kd->bld', w.double(), model.vocab_embed.embedding.double())
    torch.testing.assert_close(model.vocab_embed(w).double(), expected, atol=1e-6, rtol=1e-6)


def topk_input(B, L, k, seed=0):
    """Random top-k input: k distinct ids per position (B, L, k) and positive weights summing to < 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(B, L, K, generator=g).argsort(-1)[..., :k]
    weights = torch.rand(B, L, k, generator=g) / k * 0.99
    return ids, weights


def dense_input(ids, weights):
    """The same input as a (B, L, K) vector over the vocabulary: the k weights scattered at their ids."""
    return torch.zeros(*ids.shape[:2], K).scatter_(-1, ids, weights)


@pytest.mark.parametrize('k', [1, 3])
def test_topk_weights_input_equals_dense_relaxed_input(k):
    """DiT(ids (B, L, k), sigma, weights=) == DiT(dense (B, L, K) with the same mass), to float32 precision;
    the embedding is sum_slots w E[id] (float64 reference), and the parameters are unchanged."""
    model = small_model()
    ids, weights = topk_input(2, 11, k)
    sigma = torch.rand(2)
    expected = torch.einsum('blk,blkd->bld', weights.double(), model.vocab_embed.embedding.double()[ids])
    torch.testing.assert_close(model.vocab_embed(ids, weights).double(), expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, sigma, weights=weights), model(dense_input(ids, weights), sigma),
                                   atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == expected_keys(N_BLOCKS, causal=False)


def test_topk_input_gradient_reaches_the_embedding():
    """The embedding's gradient through the top-k input equals the dense input's: nonzero exactly on the
    ids used (weights > 0), zero on every other row."""
    ids, weights = topk_input(2, 7, 2, seed=1)
    sigma = torch.rand(2)
    grads = []
    for inputs in ((ids, weights), (dense_input(ids, weights), None)):
        model = small_model()
        model.train()
        logits = model(inputs[0], sigma, weights=inputs[1])
        (logits * torch.linspace(-1, 1, K)).sum().backward()
        grads.append(model.vocab_embed.embedding.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)
    used = torch.zeros(K, dtype=torch.bool)
    used[ids.flatten()] = True
    assert (grads[0][used].abs().sum(-1) > 0).all() and (grads[0][~used] == 0).all()


def test_topk_input_stays_float32_under_autocast_and_grows_with_k():
    """Under bf16 autocast the bag sum is still float32 (as the dense relaxed input); no tensor made by the
    embedding of a top-k input has K elements per position."""
    model = small_model()
    ids, weights = topk_input(2, 5, 3)
    expected = model.vocab_embed(ids, weights)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        got = model.vocab_embed(ids, weights)
        assert model(ids, torch.zeros(2), weights=weights).shape == (2, 5, K)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    largest = 0

    class Largest(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal largest
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    largest = max(largest, t.numel())
            return out

    B, L = 2, 5
    with torch.no_grad(), Largest():
        model.vocab_embed(ids, weights)
    assert largest <= B * L * D < B * L * K


def test_output_shape_dtype_and_sigma_dependence():
    model = small_model()
    ids = torch.randint(0, K, (3, 13))
    with torch.no_grad():
        out = model(ids, torch.zeros(3))
        assert out.shape == (3, 13, K) and out.dtype == torch.float32
        assert not torch.allclose(out, model(ids, torch.full((3,), 2.0)))
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(ids, torch.zeros(3))
            relaxed = model(F.one_hot(ids, K).float(), torch.zeros(3))
    assert low.dtype == torch.bfloat16 and relaxed.dtype == torch.bfloat16  # no upcast inside
    torch.testing.assert_close(low.float(), out, atol=0.15, rtol=0.05)


def test_dropout_only_in_training():
    model = small_model(dropout=0.5)
    ids = torch.randint(0, K, (2, 8))
    sigma = torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, sigma), model(ids, sigma), atol=0, rtol=0)
        model.train()
        assert not torch.allclose(model(ids, sigma), model(ids, sigma))


def test_bad_inputs_raise_clear_errors():
    model = small_model()
    ids = torch.randint(0, K, (2, 8))
    with pytest.raises(ValueError, match='needs sigma'):
        model(ids)
    with pytest.raises(ValueError, match='exceeds the model length'):
        model(torch.randint(0, K, (1, MAX_LEN + 1)), torch.zeros(1))
    with pytest.raises(ValueError, match='weights'):
        model(torch.rand(2, 8, K + 1), torch.zeros(2))
    ids, weights = topk_input(2, 8, 3)
    for bad_x, bad_w in ((ids.float(), weights), (ids, weights[..., :2]), (ids[..., 0], weights[..., 0]),
                         (ids, ids)):
        with pytest.raises(ValueError, match='with weights'):
            model(bad_x, torch.zeros(2), weights=bad_w)
    with pytest.raises(ValueError, match='kv_cache needs a causal model|KV cache needs a causal'):
        model.init_kv_cache(2)
    with pytest.raises(ValueError, match='n_heads'):
        DiT(K, 30, C, 1, 4, MAX_LEN)


# --------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize('chunks', [[1] * 12, [4, 1, 4, 3], [12]])
def test_kv_cache_matches_full_causal_forward(chunks):
    model = small_model(causal=True)
    ids = torch.randint(0, K, (3, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.init_kv_cache(3, max_len=12)
        pieces, pos = [], 0
        for n in chunks:
            pieces.append(model(ids[:, pos:pos + n], kv_cache=cache))
            pos += n
            assert cache.length == pos
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_errors():
    model = small_model(causal=True)
    cache = model.init_kv_cache(1, max_len=4)
    with torch.no_grad():
        model(torch.randint(0, K, (1, 3)), kv_cache=cache)
        with pytest.raises(ValueError, match='larger max_len'):
            model(torch.randint(0, K, (1, 2)), kv_cache=cache)
        with pytest.raises(ValueError, match='attention_mask'):
            model(torch.randint(0, K, (1, 1)), attention_mask=torch.ones(1, 1), kv_cache=cache)


# --------------------------------------------------------------------------- backend choice

def fake_gpu(monkeypatch, capability, flash_importable):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: capability)
    monkeypatch.setattr(runtime, 'flash_attn_importable', lambda: flash_importable)


@pytest.mark.parametrize('capability,importable,expected', [
    ((7, 5), True, 'sdpa'), ((8, 0), True, 'flash'), ((9, 0), True, 'flash'), ((9, 0), False, 'sdpa')])
def test_detect_backend(monkeypatch, capability, importable, expected):
    fake_gpu(monkeypatch, capability, importable)
    assert runtime.detect_attn_backend() == expected


def test_detect_backend_without_cuda(monkeypatch):
    monkeypatch.setattr(runtime, 'flash_attn_importable', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert runtime.detect_attn_backend() == 'sdpa'


def test_resolve_backend(monkeypatch):
    monkeypatch.setattr(runtime, 'detect_attn_backend', lambda: 'sdpa')  # a 7.5 GPU / the CPU
    assert runtime.resolve_attn_backend('auto') == 'sdpa'
    assert runtime.resolve_attn_backend('sdpa') == 'sdpa'
    with pytest.raises(ValueError, match=r'model\.attn_backend=flash needs FlashAttention.*'
                                         r'compute capability >= 8\.0.*use model\.attn_backend=sdpa'):
        runtime.resolve_attn_backend('flash')
    with pytest.raises(ValueError, match='model.attn_backend=xformers'):
        runtime.resolve_attn_backend('xformers')
    monkeypatch.setattr(runtime, 'detect_attn_backend', lambda: 'flash')
    assert runtime.resolve_attn_backend('auto') == 'flash'
    assert runtime.resolve_attn_backend('flash') == 'flash'
    assert runtime.resolve_attn_backend('sdpa') == 'sdpa'


def test_forced_flash_raises_here_and_choice_is_logged(caplog):
    if runtime.detect_attn_backend() == 'flash':
        pytest.skip('FlashAttention is usable on this machine')
    with pytest.raises(ValueError, match='use model.attn_backend=sdpa'):
        DiT(K, D, C, 1, HEADS, MAX_LEN, attn_backend='flash')
    with caplog.at_level(logging.INFO, logger='models.dit'):
        model = DiT(K, D, C, 1, HEADS, MAX_LEN, attn_backend='auto')
    assert model.attn_backend == 'sdpa'
    assert any('sdpa' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('training', [False, True])
def test_output_rows_are_the_rows_of_the_full_logits(training):
    model = small_model().train(training)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, K, (2, MAX_LEN), generator=g)
    sigma = torch.tensor([0.3, 1.2])
    rows = torch.rand(2, MAX_LEN, generator=g) < 0.4
    target = torch.randn(int(rows.sum()), K, generator=g)
    grads = []
    for selected in (False, True):
        model.zero_grad()
        logits = model(x, sigma, output_rows=rows) if selected else model(x, sigma)[rows]
        (logits * target).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if selected:
            assert logits.shape == (int(rows.sum()), K)
            torch.testing.assert_close(logits, full, rtol=1e-6, atol=1e-6)
        else:
            full = logits.detach()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='output_rows'):
        model(x, sigma, output_rows=rows.long())


def test_logits_written_into_a_reused_buffer_are_the_logits():
    model = small_model().eval()
    g = torch.Generator().manual_seed(4)
    buffer = torch.full((3, MAX_LEN, K), float('nan'))
    with torch.no_grad():
        for batch in (3, 2):  # a sampler passes the first rows of one buffer for a sub-batch
            x = torch.randint(0, K, (batch, MAX_LEN), generator=g)
            sigma = torch.rand(batch, generator=g)
            out = model(x, sigma, out=buffer[:batch])
            assert out.data_ptr() == buffer.data_ptr()
            torch.testing.assert_close(out, model(x, sigma), rtol=1e-6, atol=1e-6)
