import pytest
import torch

from backbones.attention import attention, available_backends, resolve_backend


@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("causal", [False, True])
def test_backends_agree_with_math(backend, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=g) for _ in range(3))
    expected = attention(q, k, v, backend="math", causal=causal)
    torch.testing.assert_close(attention(q, k, v, backend=backend, causal=causal), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_key_mask_excludes_padding(backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    out = attention(q, k, v, backend=backend, mask=mask)
    # The padded keys of sample 0 must not matter: the same as attending to its first three keys only.
    torch.testing.assert_close(
        out[:1], attention(q[:1], k[:1, :, :3], v[:1, :, :3], backend="math"), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(out, attention(q, k, v, backend="math", mask=mask), atol=1e-5, rtol=1e-4)


def test_unknown_or_unavailable_backend_is_named():
    with pytest.raises(ValueError, match="flash3.*choose one of"):
        resolve_backend("flash3", "cpu")
    with pytest.raises(ValueError, match="xformers does not run on cpu"):
        resolve_backend("xformers", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"
