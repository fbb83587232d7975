"""The convolutional output head: it starts at zero like the DiT, draws the same at every offset,
and sees across token borders."""

import pytest
import torch

from backbones.heads import ConvHead


def randomize(head):
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return head


@pytest.mark.parametrize("axes", [2, 3])
def test_a_new_head_outputs_zero_and_a_trained_one_draws_the_same_at_every_offset(axes):
    torch.manual_seed(0)
    head = ConvHead(features=4, channels=3, axes=axes)
    shape = (2, 4, *([6] * (axes - 2)), 12, 12)
    f = torch.randn(shape)
    # a new DiT emits zero features and the new head turns them into zero: the first prediction is zero
    assert torch.equal(head(torch.zeros(shape)), torch.zeros(2, 3, *shape[2:]))
    assert torch.equal(head(f), head.skip(f))  # the convolutions start switched off
    randomize(head)
    blob = torch.zeros(shape)
    blob[..., 3:6, 3:6] = torch.randn(*shape[:-2], 3, 3)
    moved = torch.roll(blob, shifts=(1, 2), dims=(-2, -1))  # one pixel down, two right, far from the border
    out, out_moved = head(blob), head(moved)
    # the same drawing, moved; compared away from the zero padding (two 3-wide convolutions reach 2 cells)
    assert torch.allclose(out[..., 2:8, 2:8], out_moved[..., 3:9, 4:10], atol=1e-6)
    assert not torch.allclose(out[..., 2:8, 2:8], out_moved[..., 2:8, 2:8], atol=1e-3)
    # a 2x2-patch token covers rows 4-5; the head's output there depends on row 3, another token's
    poke = blob.clone()
    poke[..., 3, 4] += 1.0
    assert not torch.allclose(head(poke)[..., 4, 4], out[..., 4, 4])


def test_a_head_needs_a_grid_of_two_or_three_axes():
    with pytest.raises(ValueError, match="2 or 3 axes, got 1"):
        ConvHead(features=4, channels=1, axes=1)
