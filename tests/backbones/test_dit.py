import pytest
import torch

from backbones.dit import DiT, check_shape


def grid(*sizes):
    axes = torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, len(sizes))


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(in_dim=6, out_dim=6, hidden_size=32, depth=2, num_heads=2)
    return DiT(**{**args, **kw})


def randomize(model):
    """Move off the adaLN-Zero initialisation (whose output is exactly zero) so outputs carry signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("sizes", [(12,), (3, 4), (2, 2, 3)])
def test_positions_of_any_dimension(sizes):
    model = randomize(tiny()).eval()
    pos = grid(*sizes)
    x = torch.randn(2, pos.shape[0], 6)
    out = model(x, pos, torch.rand(2))
    assert out.shape == (2, pos.shape[0], 6) and out.isfinite().all()
    # Rotary positions and attention are equivariant: permuting tokens with their positions permutes the output.
    perm = torch.randperm(pos.shape[0])
    torch.testing.assert_close(
        model(x[:, perm], pos[perm], torch.full((2,), 0.5)),
        model(x, pos, torch.full((2,), 0.5))[:, perm],
        atol=1e-5,
        rtol=1e-4,
    )
    # ... and the positions matter.
    assert not torch.allclose(model(x, pos.flip(0), torch.full((2,), 0.5)), model(x, pos, torch.full((2,), 0.5)))


def test_adaln_zero_starts_at_zero():
    model = tiny(num_classes=3)
    out = model(torch.randn(2, 4, 6), grid(2, 2), torch.rand(2), label=torch.tensor([0, 2]))
    assert torch.count_nonzero(out) == 0


def test_drop_uses_the_null_condition():
    model = randomize(tiny(num_classes=3, cond_dim=5, context_dim=7)).eval()
    x, pos, t = torch.randn(2, 4, 6), grid(2, 2), torch.rand(2)
    cond = dict(
        label=torch.tensor([0, 1]),
        cond=torch.randn(2, 5),
        context=torch.randn(2, 3, 7),
        context_mask=torch.ones(2, 3, dtype=torch.bool),
    )
    other = dict(
        label=torch.tensor([2, 2]),
        cond=torch.randn(2, 5),
        context=torch.randn(2, 3, 7),
        context_mask=torch.ones(2, 3, dtype=torch.bool),
    )
    drop = torch.tensor([True, False])
    a, b = model(x, pos, t, **cond, drop=drop), model(x, pos, t, **other, drop=drop)
    torch.testing.assert_close(a[0], b[0])  # dropped: the condition no longer matters
    assert not torch.allclose(a[1], b[1])  # kept: it does


def test_token_ids_and_causal_mask():
    model = randomize(tiny(in_dim=0, in_vocab=11, out_dim=11, causal=True)).eval()
    ids = torch.randint(0, 11, (2, 8))
    out = model(ids, grid(8), torch.zeros(2))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    # Causal attention: the first five outputs cannot see the later tokens.
    torch.testing.assert_close(model(changed, grid(8), torch.zeros(2))[:, :5], out[:, :5])


def test_gradient_checkpointing_gives_same_gradients():
    x, pos, t = torch.randn(2, 4, 6), grid(2, 2), torch.rand(2)
    grads = []
    for ckpt in (False, True):
        model = randomize(tiny(grad_checkpointing=ckpt))
        torch.manual_seed(1)
        model(x, pos, t).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_impossible_shapes_are_named():
    with pytest.raises(
        ValueError, match=r"backbone.num_heads=5 does not divide backbone.hidden_size=64; try backbone.num_heads=4"
    ):
        check_shape(64, 5, "rope")
    with pytest.raises(ValueError, match="backbone.pos='alibi'"):
        check_shape(64, 4, "alibi")


def rotate_pairs(x, angles):
    """The rotary reference written as complex numbers: feature pair (i, i + Dh/2) is x_i + i x_(i+Dh/2),
    multiplied by exp(i angle_i)."""
    x1, x2 = x.chunk(2, dim=-1)
    z = torch.complex(x1, x2) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rope_rotates_feature_pairs_and_keeps_relative_positions():
    from backbones.dit import apply_rope, grid_angles, rope_tables

    torch.manual_seed(0)
    pos = grid(3, 4)
    angles = grid_angles(pos, 16)  # (12, 8)
    x = torch.randn(2, 3, 12, 16)
    rotated = apply_rope(x, *rope_tables(angles))
    torch.testing.assert_close(rotated, rotate_pairs(x, angles))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths
    stacked = apply_rope(torch.stack([x, 2 * x]), *rope_tables(angles))  # q and k in one call
    torch.testing.assert_close(stacked[1], 2 * rotated)
    # q.k after rotation depends only on the offset: the same vectors at (0, 0)-(1, 2) and (1, 1)-(2, 3)
    q, k = torch.randn(16), torch.randn(16)
    at = {tuple(p.tolist()): i for i, p in enumerate(pos)}
    table = rope_tables(angles)
    rq = apply_rope(q.expand(12, 16), *table)
    rk = apply_rope(k.expand(12, 16), *table)
    torch.testing.assert_close(rq[at[0, 0]] @ rk[at[1, 2]], rq[at[1, 1]] @ rk[at[2, 3]])
    assert not torch.allclose(rq[at[0, 0]] @ rk[at[1, 2]], rq[at[0, 0]] @ rk[at[2, 3]])


def test_factorized_attention_equals_masked_full_attention():
    """Within a frame, or across frames at one pixel: the same as full attention with a mask that
    allows exactly those pairs (the reference written with an explicit (N, N) mask)."""
    from backbones.dit import SelfAttention, grid_angles, rope_tables

    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=2, qk_norm=True, causal=False).eval()
    attn.backend = "math"
    pos = grid(3, 2, 4)  # 3 frames of 2 x 4 tokens
    x = torch.randn(2, 24, 32)
    angles = grid_angles(pos, 16)
    rope = rope_tables(angles)
    frame, pixel = pos[:, 0], pos[:, 1] * 4 + pos[:, 2]
    for kind, allowed in (("within", frame[:, None] == frame[None]), ("across", pixel[:, None] == pixel[None])):
        q, k, v = attn.qkv(x).reshape(2, 24, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        ref = attn.proj(ref.transpose(1, 2).reshape(2, 24, 32))
        torch.testing.assert_close(attn(x, rope, (kind, 3)), ref, atol=1e-5, rtol=1e-4)


def test_factorized_layout_keeps_a_frame_to_itself_until_a_temporal_block():
    pos = grid(3, 2, 2)  # frames of 4 tokens; token 1 is in frame 0
    x = torch.randn(1, 12, 6)
    changed = x.clone()
    changed[0, 1] += 1.0
    one = randomize(tiny(depth=1, layout="factorized")).eval()  # a single within-frame block
    moved = (one(changed, pos, torch.zeros(1)) - one(x, pos, torch.zeros(1))).abs().amax(-1)[0]
    assert moved[:4].min() > 0 and moved[4:].max() == 0  # frame 0 changes, frames 1 and 2 do not
    full = randomize(tiny(depth=1)).eval()
    assert (full(changed, pos, torch.zeros(1)) - full(x, pos, torch.zeros(1))).abs().amax(-1)[0, 4:].min() > 0
    two = randomize(tiny(depth=2, layout="factorized")).eval()  # then across frames: it reaches everything
    assert (two(changed, pos, torch.zeros(1)) - two(x, pos, torch.zeros(1))).abs().amax(-1)[0].min() > 0


def test_factorized_layout_rejects_what_it_cannot_split():
    with pytest.raises(ValueError, match="backbone.layout='diagonal'"):
        tiny(layout="diagonal")
    with pytest.raises(ValueError, match="cannot be causal"):
        tiny(layout="factorized", causal=True)
    model = tiny(layout="factorized")
    with pytest.raises(ValueError, match="needs a grid of 2 or more axes"):
        model(torch.randn(1, 8, 6), grid(8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"needs the full grid \[2, 4\] of tokens, got 6"):
        model(torch.randn(1, 6, 6), grid(2, 4)[:6], torch.zeros(1))


def assert_same_values_and_gradients(fused, composite, out, inputs):
    torch.testing.assert_close(fused, composite)
    g_fused = torch.autograd.grad((fused * out).sum(), inputs)
    g_composite = torch.autograd.grad((composite * out).sum(), inputs)
    for a, b in zip(g_fused, g_composite):
        torch.testing.assert_close(a, b)


def test_fused_norm_and_rope_match_the_composite_values_and_gradients():
    """NormRope (QK-norm and rotation as one hand-written autograd node) against autograd through
    F.rms_norm and apply_rope: outputs and the gradients of input and weight."""
    from backbones.dit import NormRope, apply_rope, grid_angles, rope_tables

    torch.manual_seed(0)
    cos, sin = (t.double() for t in rope_tables(grid_angles(grid(3, 4), 16)))
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    x = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided, as q is in attention
    weight = (1 + 0.3 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    out = torch.randn(2, 3, 12, 16, dtype=torch.float64)

    fused = NormRope.apply(x, weight, cos, sin, 1e-6)
    composite = apply_rope(torch.nn.functional.rms_norm(x, (16,), weight, 1e-6), cos, sin)
    assert_same_values_and_gradients(fused, composite, out, (x, weight))
    assert torch.autograd.gradcheck(lambda x, w: NormRope.apply(x, w, cos, sin, 1e-6), (x, weight))
    half = NormRope.apply(x.detach().bfloat16(), weight.detach().float(), cos.float(), sin.float(), 1e-6)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), composite.detach(), atol=0.05, rtol=0.02)


def test_fused_norm_without_rotation_matches_rms_norm():
    """NormRope with no rotation tables (QK-norm under sincos positions) is torch's rms_norm with
    the weight, in value and in the gradients of input and weight."""
    from backbones.dit import NormRope

    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    x = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    weight = (1 + 0.3 * torch.randn(16, dtype=torch.float64)).requires_grad_()
    out = torch.randn(2, 3, 12, 16, dtype=torch.float64)
    fused = NormRope.apply(x, weight, None, None, 1e-6)
    composite = torch.nn.functional.rms_norm(x, (16,), weight, 1e-6)
    assert_same_values_and_gradients(fused, composite, out, (x, weight))
    assert torch.autograd.gradcheck(lambda x, w: NormRope.apply(x, w, None, None, 1e-6), (x, weight))
