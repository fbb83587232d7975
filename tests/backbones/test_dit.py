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


def test_factorized_attention_equals_masked_full_attention():
    """Within a frame, or across frames at one pixel: the same as full attention with a mask that
    allows exactly those pairs (the reference written with an explicit (N, N) mask)."""
    from backbones.dit import SelfAttention, apply_rope, grid_angles

    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=2, qk_norm=True, causal=False).eval()
    attn.backend = "math"
    pos = grid(3, 2, 4)  # 3 frames of 2 x 4 tokens
    x = torch.randn(2, 24, 32)
    angles = grid_angles(pos, 16)
    rope = (angles.cos(), angles.sin())
    frame, pixel = pos[:, 0], pos[:, 1] * 4 + pos[:, 2]
    for kind, allowed in (("within", frame[:, None] == frame[None]), ("across", pixel[:, None] == pixel[None])):
        q, k, v = attn.qkv(x).reshape(2, 24, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
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
