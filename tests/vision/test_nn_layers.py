"""vision.nn transformer layers against direct reference computations, and the KV cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from vision.nn import (MLP, AdaLNModulation, Attention, KVCache, RMSNorm, SwiGLU, apply_rotary,
                       block_causal_mask, modulate, rope_1d, rope_2d, swiglu_hidden_dim)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- norms, MLPs, AdaLN


def llamagen_rmsnorm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + eps)).type_as(x) * weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_llamagen_formula_bit_for_bit(dtype):
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_rand(48, seed=1))
    x = (_rand(3, 5, 48) * 4).to(dtype)
    assert torch.equal(norm(x), llamagen_rmsnorm(x, norm.weight, 1e-5))


def test_rmsnorm_equals_torch_rmsnorm_in_float32():
    ours, theirs = RMSNorm(32, eps=1e-6), torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(_rand(32, seed=2))
        theirs.weight.copy_(ours.weight)
    x = _rand(4, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
    assert list(ours.state_dict()) == ["weight"]


def test_swiglu_against_formula_and_llamagen_widths():
    ff = SwiGLU(16, 40)
    x = _rand(2, 3, 16)
    w1, w2, w3 = ff.w1.weight, ff.w2.weight, ff.w3.weight
    expected = (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
    torch.testing.assert_close(ff(x), expected, rtol=1e-5, atol=1e-6)
    assert sorted(ff.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]
    # LlamaGen GPT-B / L / XL / XXL / 3B feed-forward widths (w1.weight rows in the checkpoints)
    assert [swiglu_hidden_dim(d) for d in (768, 1024, 1280, 1536, 3200)] == [2048, 2816, 3584, 4096, 8704]


def test_mlp_against_formula():
    mlp = MLP(8, 20, approximate="tanh")
    x = _rand(5, 8)
    h = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias, approximate="tanh")
    torch.testing.assert_close(mlp(x), h @ mlp.fc2.weight.T + mlp.fc2.bias)


def test_adaln_modulation_order_and_formula():
    ada = AdaLNModulation(cond_dim=6, dim=4, n_vectors=6)
    cond = _rand(2, 6)
    out = ada(cond)
    flat = F.silu(cond) @ ada.ada_lin[1].weight.T + ada.ada_lin[1].bias
    assert len(out) == 6 and all(o.shape == (2, 1, 4) for o in out)
    for i, o in enumerate(out):
        torch.testing.assert_close(o[:, 0], flat[:, 4 * i: 4 * i + 4])
    assert sorted(ada.state_dict()) == ["ada_lin.1.bias", "ada_lin.1.weight"]
    x = _rand(2, 3, 4)
    torch.testing.assert_close(modulate(x, out[2], out[4]), x * (1 + out[2]) + out[4])


# ----------------------------------------------------------------------------- rotary embeddings


def rotate_complex(x, angles):
    """Reference: adjacent channel pairs as complex numbers times exp(i angle)."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_rope_1d_rotates_pairs_by_position_times_frequency():
    L, H, D = 7, 2, 8
    x = _rand(1, L, H, D)
    table = rope_1d(L, D, base=100.0)
    freqs = 100.0 ** (-torch.arange(0, D, 2).double() / D)
    angles = torch.arange(L).double()[:, None] * freqs  # (L, D/2)
    expected = rotate_complex(x, angles[None, :, None, :])
    torch.testing.assert_close(apply_rotary(x, table).double(), expected, rtol=0, atol=1e-5)


def test_rope_2d_is_llamagen_layout_rows_then_columns_with_zero_prefix():
    h, w, D, prefix = 3, 4, 16, 2
    table = rope_2d((h, w), D, base=10000.0, prefix=prefix)
    assert table.shape == (prefix + h * w, D // 2, 2)
    assert torch.equal(table[:prefix], torch.zeros(prefix, D // 2, 2))
    f = 10000.0 ** (-torch.arange(0, D // 2, 2).double() / (D // 2))  # D/4 speeds per axis
    for r in range(h):
        for c in range(w):
            angles = torch.cat([r * f, c * f])
            expected = torch.stack([angles.cos(), angles.sin()], -1)
            torch.testing.assert_close(table[prefix + r * w + c].double(), expected, rtol=0, atol=1e-6)
    # the zero prefix maps the condition tokens' queries/keys to zero, as in LlamaGen
    x = _rand(1, prefix + h * w, 1, D)
    assert torch.equal(apply_rotary(x, table)[:, :prefix], torch.zeros(1, prefix, 1, D))


# ----------------------------------------------------------------------------- attention


def reference_attention(attn, x, mask=None, rope=None):
    """Direct softmax(q k^T * scale + mask) v, written out, for a module's weights."""
    B, L, C = x.shape
    Hh, D = attn.heads, attn.head_dim
    bias = attn.qkv.bias
    if hasattr(attn, "q_bias"):
        bias = torch.cat([attn.q_bias, torch.zeros(C), attn.v_bias])
    qkv = x @ attn.qkv.weight.T + (0 if bias is None else bias)
    q, k, v = (t.reshape(B, L, Hh, D) for t in qkv.split(C, dim=-1))
    if rope is not None:
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
    q, k, v = (t.transpose(1, 2).double() for t in (q, k, v))
    scale = attn.scale
    if attn.qk_norm == "l2":
        q = q / q.norm(dim=-1, keepdim=True) * attn.log_head_scale.double().clamp(max=math.log(100)).exp()
        k = k / k.norm(dim=-1, keepdim=True)
    logits = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    out = out @ attn.proj.weight.double().T
    return out + (0 if attn.proj.bias is None else attn.proj.bias.double())


def _attention(seed=0, **kw):
    torch.manual_seed(seed)
    attn = Attention(32, 4, **kw)
    with torch.no_grad():  # non-zero biases and head scales, so a wrong formula shows
        for i, (name, p) in enumerate(attn.named_parameters()):
            if "bias" in name:
                p.copy_(_rand(*p.shape, seed=100 + i) * 0.3)
        if hasattr(attn, "log_head_scale"):
            attn.log_head_scale.copy_(torch.tensor([0.5, 1.5, 5.0, 2.0]).view(1, 4, 1, 1))  # 5.0 > log 100: clamped
    return attn.eval()


@pytest.mark.parametrize("kind", ["bidirectional", "causal", "explicit"])
def test_attention_matches_reference(kind):
    attn = _attention(qkv_bias=True, proj_bias=True)
    x = _rand(2, 6, 32, seed=3)
    mask = {"bidirectional": None, "causal": "causal", "explicit": _rand(6, 6, seed=4) > -0.5}[kind]
    ref_mask = torch.ones(6, 6, dtype=torch.bool).tril() if kind == "causal" else mask
    if kind == "explicit":
        mask[:, 0] = True  # no fully masked rows
    torch.testing.assert_close(attn(x, mask=mask).double(), reference_attention(attn, x, ref_mask), rtol=0, atol=1e-5)


def test_var_attention_l2_qk_norm_head_scale_and_qv_bias():
    attn = _attention(qv_bias=True, proj_bias=True, qk_norm="l2")
    assert sorted(attn.state_dict()) == ["log_head_scale", "proj.bias", "proj.weight", "q_bias", "qkv.weight", "v_bias"]
    assert Attention(32, 4, qk_norm="l2").log_head_scale.flatten().tolist() == pytest.approx([math.log(4)] * 4)
    x = _rand(2, 5, 32, seed=5)
    mask = block_causal_mask([1, 4])
    torch.testing.assert_close(attn(x, mask=mask).double(), reference_attention(attn, x, mask), rtol=0, atol=1e-5)


def test_attention_with_rotary_matches_reference():
    attn = _attention()
    x = _rand(1, 1 + 9, 32, seed=6)
    rope = rope_2d(3, 8, prefix=1)
    torch.testing.assert_close(attn(x, mask="causal", rope=rope).double(),
                               reference_attention(attn, x, torch.ones(10, 10, dtype=torch.bool).tril(), rope),
                               rtol=0, atol=1e-5)


def test_block_causal_mask():
    m = block_causal_mask([1, 2, 3])
    expected_blocks = torch.tensor([0, 1, 1, 2, 2, 2])
    assert torch.equal(m, expected_blocks[None, :] <= expected_blocks[:, None])


# ----------------------------------------------------------------------------- the KV cache


def test_cached_incremental_equals_uncached_causal():
    attn = _attention(qkv_bias=True)
    L = 1 + 16
    x = _rand(3, L, 32, seed=7)
    rope = rope_2d(4, 8, prefix=1)
    full = attn(x, mask="causal", rope=rope)
    cache, outs, start = KVCache(), [], 0
    for n in (1, 1, 3, 5, 1, 6):  # prefill, single tokens and windows
        outs.append(attn(x[:, start:start + n], mask="causal", rope=rope[start:start + n], cache=cache))
        start += n
    assert start == L and len(cache) == L
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5


def test_cached_incremental_equals_uncached_block_causal():
    """VAR: uncached with the block-causal mask == each block appended to the cache without a mask."""
    attn = _attention(qv_bias=True, proj_bias=True, qk_norm="l2")
    blocks = [1, 4, 9, 16]
    x = _rand(2, sum(blocks), 32, seed=8)
    full = attn(x, mask=block_causal_mask(blocks))
    cache, outs, start = KVCache(capacity=4), [], 0  # small capacity: the buffer grows on the way
    for n in blocks:
        outs.append(attn(x[:, start:start + n], cache=cache))
        start += n
    assert (torch.cat(outs, 1) - full).abs().max() <= 1e-5


def test_truncate_then_append_equals_never_having_appended():
    attn = _attention()
    rope = rope_1d(12, 8)
    prefix, drafts, other = _rand(2, 5, 32, seed=9), _rand(2, 4, 32, seed=10), _rand(2, 3, 32, seed=11)

    clean = KVCache()
    attn(prefix, mask="causal", rope=rope[:5], cache=clean)
    expected = attn(other, mask="causal", rope=rope[5:8], cache=clean)

    rolled = KVCache()
    attn(prefix, mask="causal", rope=rope[:5], cache=rolled)
    attn(drafts, mask="causal", rope=rope[5:9], cache=rolled)
    rolled.truncate(5)
    got = attn(other, mask="causal", rope=rope[5:8], cache=rolled)
    assert torch.equal(got, expected)
    assert torch.equal(rolled.read()[0], clean.read()[0]) and torch.equal(rolled.read()[1], clean.read()[1])
    with pytest.raises(ValueError):
        rolled.truncate(9)


def test_append_without_writing_leaves_cache_unchanged():
    attn = _attention()
    x = _rand(1, 7, 32, seed=12)
    cache = KVCache()
    attn(x[:, :4], mask="causal", cache=cache)
    before = [t.clone() for t in cache.read()]
    peek = attn(x[:, 4:], mask="causal", cache=cache, update_cache=False)
    assert len(cache) == 4 and all(torch.equal(a, b) for a, b in zip(before, cache.read()))
    torch.testing.assert_close(peek, attn(x, mask="causal")[:, 4:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
def test_read_with_substituted_positions_equals_full_recompute(per_sample):
    """ReCAP's cheap step: queries for a subset, fresh K/V for the subset, cached K/V elsewhere."""
    attn = _attention(qkv_bias=True)
    B, L = 2, 10
    old = _rand(B, L, 32, seed=13)
    cache = KVCache()
    attn(old, cache=cache)  # full step fills the cache (bidirectional)
    snapshot = [t.clone() for t in cache.read()]
    if per_sample:
        positions = torch.tensor([[1, 4, 7], [0, 2, 9]])
    else:
        positions = torch.tensor([1, 4, 7]).expand(B, 3)
    new_tokens = _rand(B, 3, 32, seed=14)
    mixed = old.clone()
    mixed[torch.arange(B)[:, None], positions] = new_tokens
    expected = attn(mixed)[torch.arange(B)[:, None], positions]

    got = attn(new_tokens, cache=cache, positions=positions if per_sample else positions[0], update_cache=False)
    assert (got - expected).abs().max() <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(snapshot, cache.read()))  # not written

    got_written = attn(new_tokens, cache=cache, positions=positions if per_sample else positions[0])
    assert torch.equal(got_written, got)
    full_cache = KVCache()
    attn(mixed, cache=full_cache)
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(cache.read(), full_cache.read()))


def test_causal_mask_follows_absolute_positions_with_a_cache():
    """Queries substituted at positions p attend keys 0..p only."""
    attn = _attention()
    x = _rand(1, 8, 32, seed=15)
    cache = KVCache()
    full = attn(x, mask="causal", cache=cache)
    got = attn(x[:, [2, 5]], mask="causal", cache=cache, positions=torch.tensor([2, 5]), update_cache=False)
    torch.testing.assert_close(got, full[:, [2, 5]], rtol=0, atol=1e-5)


def test_per_sample_positions_let_samples_advance_at_different_speeds():
    """Each sample writes its own window (rejected drafts left behind are overwritten, never read)."""
    attn = _attention()
    x = _rand(2, 9, 32, seed=16)
    rope = rope_1d(12, 8)
    full = attn(x, mask="causal", rope=rope[:9])
    cache = KVCache()
    attn(x[:, :2], mask="causal", rope=rope[:2], cache=cache)
    junk = _rand(2, 4, 32, seed=17)  # drafts at positions 2..5 of both samples, all rejected
    attn(junk, mask="causal", rope=rope[2:6], cache=cache, positions=torch.tensor([2, 3, 4, 5]))
    # sample 1 had its tokens 2, 3 accepted in a window of their own; sample 0 gets nothing there yet
    attn(torch.stack([junk[0, :2], x[1, 2:4]]), mask="causal", rope=rope[2:4], cache=cache,
         positions=torch.tensor([2, 3]))
    # then sample 0 resumes at position 2 and sample 1 at 4, in one call
    positions = torch.tensor([[2, 3, 4], [4, 5, 6]])
    window = torch.stack([x[0, 2:5], x[1, 4:7]])
    got = attn(window, mask="causal", rope=rope[positions], cache=cache, positions=positions, positions_end=7)
    assert (got[0] - full[0, 2:5]).abs().max() <= 1e-5
    assert (got[1] - full[1, 4:7]).abs().max() <= 1e-5
    assert len(cache) == 7
