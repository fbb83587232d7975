"""One attention function, several kernels.

`attention(q, k, v)` takes heads-first tensors (B, H, N, Dh) and dispatches to

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. On an H100 with
  torch 2.11 its default dispatch already picks the cuDNN kernel (1.7-1.9x faster
  there than its FlashAttention-2 kernel); on CPU it runs a fused C++ kernel.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, only where its CUDA
  kernels actually load (xFormers 0.0.35 is built for torch 2.10 and has no CPU kernels).
- ``math``: the textbook softmax(QK^T/sqrt(d))V in fp32, the reference the others
  are tested against.

``auto`` picks SDPA, which was fastest wherever it was measured; the others can be
forced from the config (``attention=xformers``).
"""

from __future__ import annotations

import functools
import math as _math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers", "math")


def _math_attention(q, k, v, causal: bool = False, mask: torch.Tensor | None = None):
    """Reference attention in fp32. mask: (B, Nk) bool, True where a key may be attended."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    scores = q @ k.transpose(-2, -1) / _math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if causal:
        nq, nk = scores.shape[-2:]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(dtype)


def _sdpa_attention(q, k, v, causal: bool = False, mask: torch.Tensor | None = None):
    attn_mask = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal and mask is None)


def _xformers_attention(q, k, v, causal: bool = False, mask: torch.Tensor | None = None):
    import xformers.ops as xops  # guarded: only reached when xformers_available() said yes

    bias = None
    if causal:
        bias = xops.LowerTriangularMask()
    if mask is not None:
        bias = torch.zeros(mask.shape[0], q.shape[1], q.shape[2], mask.shape[1], dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))
    # xFormers wants (B, N, H, Dh).
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


@functools.cache
def xformers_available(device_type: str = "cuda") -> bool:
    """True when xFormers imports *and* its kernel runs here (import alone is not enough:
    wheels built for another torch import fine and then fail at the first call)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import xformers.ops as xops

        x = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


_KERNELS = {"sdpa": _sdpa_attention, "xformers": _xformers_attention, "math": _math_attention}


def available_backends(device_type: str) -> list[str]:
    """The concrete backends that run on this device type."""
    names = ["sdpa", "math"]
    if xformers_available(device_type):
        names.insert(1, "xformers")
    return names


def resolve_backend(name: str, device_type: str) -> str:
    """Turn a configured backend name into one that runs here, or say why not."""
    if name not in BACKENDS:
        raise ValueError(f"attention={name!r} is not a backend; choose one of {list(BACKENDS)}")
    if name == "auto":
        return "sdpa"
    if name not in available_backends(device_type):
        raise ValueError(
            f"attention={name} does not run on {device_type} here "
            f"(available: {available_backends(device_type)}); use attention=auto"
        )
    return name


def attention(q, k, v, backend: str = "sdpa", causal: bool = False, mask: torch.Tensor | None = None):
    """Scaled dot-product attention.

    Args:
        q: (B, H, Nq, Dh); k, v: (B, H, Nk, Dh).
        backend: a concrete name from ``available_backends`` ("auto" means sdpa).
        causal: token i attends to keys j <= i (autoregressive baselines).
        mask: optional (B, Nk) bool, True where a key may be attended (caption padding).
    Returns:
        (B, H, Nq, Dh) in q's dtype.
    """
    return _KERNELS["sdpa" if backend == "auto" else backend](q, k, v, causal=causal, mask=mask)
