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
