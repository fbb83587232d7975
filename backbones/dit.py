"""The shared Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

It knows tokens, their integer grid positions, a diffusion time and optional
conditions; it knows nothing about pixels, frames, spectrograms or words. Each
modality patchifies its data into (B, N, in_dim) tokens (or (B, N) token ids) and
gives the grid coordinates of every token: 1-D for text, 2-D for images and
spectrograms, 3-D (t, h, w) for video.

Conditioning: adaLN-Zero from the time embedding plus a pooled condition (class
label and/or a pooled caption vector); optional cross-attention to condition tokens.
Dropping the condition for classifier-free guidance is done here, per sample, by
swapping in learned null conditions (``drop`` in ``forward``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from backbones.attention import attention, resolve_backend


def modulate(x, shift, scale):
    """x (1 + scale) + shift as one fused pass over x (addcmul) instead of two; with gated_add below
    this saves four of the elementwise passes over (B, N, D) that a block's forward makes, which is
    what a CPU step at 256 tokens spends beyond its matrix products (bench/RESULTS.md, issue 12)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_add(x, gate, y):
    """The adaLN-Zero residual x + gate * y, one fused pass (addcmul) instead of two."""
    return torch.addcmul(x, gate, y)


def split_pairs(n_pairs: int, n_axes: int) -> list[int]:
    """Share n_pairs frequency pairs among n_axes grid axes as evenly as possible."""
    return [n_pairs // n_axes + (1 if i < n_pairs % n_axes else 0) for i in range(n_axes)]


def grid_angles(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Axial sinusoid angles for integer grid positions.

    Args:
        positions: (N, A) integer coordinates, A axes.
        dim: the feature size the angles are for (even); dim/2 pairs split over the axes.
    Returns:
        (N, dim/2) angles, axis by axis.
    """
    angles = []
    for axis, n in enumerate(split_pairs(dim // 2, positions.shape[1])):
        freqs = theta ** (-torch.arange(n, device=positions.device, dtype=torch.float32) / max(n, 1))
        angles.append(positions[:, axis, None].float() * freqs[None])  # (N, n)
    return torch.cat(angles, dim=-1)


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, Dh/2) angles -> the (N, Dh) tables apply_rope takes: (cos, cos) and (-sin, sin), built once
    per forward pass rather than in every block."""
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (i, i + Dh/2) (half-split layout, as in GPT-NeoX): x1 cos - x2 sin and
    x2 cos + x1 sin, written as x * cos + swap_halves(x) * sin with rope_tables' full-width tables,
    three passes over x instead of seven.

    Args:
        x: (..., N, Dh), e.g. (B, H, N, Dh).
        cos, sin: (N, Dh) fp32 from rope_tables.
    Returns:
        x rotated, in x's dtype (the products are fp32 under bf16 autocast).
    """
    return torch.addcmul(x * cos, swap_halves(x), sin).to(x.dtype)


class NormRope(torch.autograd.Function):
    """RMS-normalise with a weight, then rotate (apply_rope): QK-norm and rotary positions in one
    autograd node. Written by hand because autograd's composite of the two (pow, mean, rsqrt and
    three products, then the rotation) runs about 18 passes over q forward and 36 backward, and at
    256 tokens those passes cost more than 10% of a training step on a CPU; this forward runs 6
    and the backward 10. cos and sin None: QK-norm alone (for sincos positions), where torch's
    rms_norm on the strided q and k costs as much again. Computes in fp32 (or fp64), returns x's
    dtype. Checked against the composite in tests/backbones/test_dit.py."""

    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        wide = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 compute in fp32
        xf = x.to(wide)
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_() / x.shape[-1] + eps)  # (..., N, 1)
        n = xf * r
        w = weight.to(wide)
        y = n * w if cos is None else torch.addcmul(n * (w * cos), swap_halves(n), swap_halves(w) * sin)
        ctx.save_for_backward(n, r, w, cos, sin)
        ctx.dtypes = x.dtype, weight.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        n, r, w, cos, sin = ctx.saved_tensors
        x_dtype, weight_dtype = ctx.dtypes
        gy = gy.to(n.dtype)
        gm = gy if cos is None else torch.addcmul(swap_halves(gy * sin), gy, cos)  # the gradient at m = n * w
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gm * n).sum_to_size(w.shape).to(weight_dtype)
        gn = gm * w
        dot = (gn * n).mean(dim=-1, keepdim=True)
        gx = torch.addcmul(gn, n, dot, value=-1).mul_(r)
        return gx.to(x_dtype), gw, None, None, None


class RMSNorm(nn.RMSNorm):
    """QK-norm over the last axis, then the rotation where `rope` tables are given, as one NormRope
    node in eager mode and as torch's composite under torch.compile (both computed in fp32, returned
    in the input's dtype, so bf16 q and k under autocast need no cast of the fp32 weight)."""

    def forward(self, x, rope=None):
        if torch.compiler.is_compiling():
            # Under torch.compile the composite: inductor fuses its passes itself, and dynamo's trace of
            # NormRope's backward is wrong in torch 2.11 (zero weight gradients, other input gradients;
            # tests/bench/test_throughput.py compares the compiled gradients with eager ones).
            y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
            return (y if rope is None else apply_rope(y, *rope)).to(x.dtype)
        return NormRope.apply(x, self.weight, *(rope or (None, None)), self.eps)


class TimestepEmbedder(nn.Module):
    """Diffusion time t in [0, 1] -> (B, D), through sinusoids of 1000 t and an MLP."""

    def __init__(self, hidden_size: int, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, D)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, causal: bool):
        super().__init__()
        self.num_heads, self.causal, self.backend = num_heads, causal, "sdpa"
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # one fused projection
        head_dim = hidden_size // num_heads
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, rope, groups=None):
        """groups: None (every token sees every token), or ("within", F) / ("across", F) for a
        row-major grid whose first axis has F slices: attend within one slice (one frame), or
        across slices at one position of the other axes (one pixel through time)."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)
        # positions are rotated in the full grid, before any regrouping
        if isinstance(self.q_norm, RMSNorm):  # norm and rotation in one node
            q, k = self.q_norm(q, rope), self.k_norm(k, rope)
        elif rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if groups is None:
            out = attention(q, k, v, backend=self.backend, causal=self.causal)  # (B, H, N, Dh)
            return self.proj(rearrange(out, "b h n d -> b n (h d)"))
        kind, f = groups
        pattern = "b h (f s) d -> (b f) h s d" if kind == "within" else "b h (f s) d -> (b s) h f d"
        q, k, v = (rearrange(z, pattern, f=f) for z in (q, k, v))
        out = attention(q, k, v, backend=self.backend, causal=self.causal)
        back = "(b f) h s d -> b (f s) (h d)" if kind == "within" else "(b s) h f d -> b (f s) (h d)"
        return self.proj(rearrange(out, back, b=x.shape[0]))


class CrossAttention(nn.Module):
    """Tokens attend to condition tokens (caption encoder states)."""

    def __init__(self, hidden_size: int, context_dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.backend = num_heads, "sdpa"
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(context_dim, 2 * hidden_size)
        head_dim = hidden_size // num_heads
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, context, mask):
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        out = attention(self.q_norm(q), self.k_norm(k), v, backend=self.backend, mask=mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Fig. 3)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, qk_norm, causal, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, causal)
        self.cross = None
        if context_dim:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross = CrossAttention(hidden_size, context_dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope=None, context=None, context_mask=None, groups=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = gated_add(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope, groups))  # (B, N, D)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask)
        return gated_add(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer over tokens with integer grid positions.

    Args:
        in_dim: size of each input token vector; or ``in_vocab`` for token ids.
        out_dim: size of each output token vector (patch values, or vocabulary logits).
        hidden_size, depth, num_heads, mlp_ratio: the transformer's shape.
        num_classes: class labels for the label embedder (0: no labels); index
            ``num_classes`` is the learned "no label" used for guidance.
        cond_dim: size of a pooled condition vector (0: none), e.g. a mean caption embedding.
        context_dim: size of condition tokens for cross-attention (0: no cross-attention).
        cond_dropout: probability, in training, of dropping all conditions of a sample
            (classifier-free guidance, Ho & Salimans 2022).
        pos: "rope" (rotary on q and k) or "sincos" (added to the tokens).
        qk_norm: RMS-normalise queries and keys per head (stabilises bf16 training).
        causal: causal self-attention (the autoregressive baseline).
        attn_backend: see backbones/attention.py.
        layout: "full" (every token attends to every token) or "factorized" (Latte-style
            interleaving for grids of 2+ axes, e.g. video (t, h, w): even blocks attend within a
            slice of the first axis (a frame), odd blocks across the first axis (through time) at
            fixed other coordinates). Attention cost falls from N^2 to N (S + F) for F slices of S
            tokens. Tokens must be the row-major grid that ``positions`` lists.
        grad_checkpointing: recompute block activations in backward to save memory.
    """

    def __init__(
        self,
        in_dim: int = 0,
        out_dim: int = 0,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        in_vocab: int = 0,
        num_classes: int = 0,
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_dropout: float = 0.1,
        pos: str = "rope",
        qk_norm: bool = True,
        causal: bool = False,
        attn_backend: str = "auto",
        layout: str = "full",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        check_shape(hidden_size, num_heads, pos)
        if layout not in LAYOUTS:
            raise ValueError(f"backbone.layout={layout!r}: choose one of {LAYOUTS}")
        if layout == "factorized" and causal:
            raise ValueError("backbone.layout=factorized cannot be causal (the autoregressive baseline is 1-D)")
        self.layout = layout
        if bool(in_dim) == bool(in_vocab):
            raise ValueError("DiT needs exactly one of in_dim (token vectors) or in_vocab (token ids)")
        self.hidden_size, self.num_heads, self.pos = hidden_size, num_heads, pos
        self.num_classes, self.cond_dropout = num_classes, cond_dropout
        self.grad_checkpointing = grad_checkpointing
        self.x_embedder = nn.Embedding(in_vocab, hidden_size) if in_vocab else nn.Linear(in_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.cond_embedder = None
        if cond_dim:
            self.cond_embedder = nn.Sequential(
                nn.Linear(cond_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
            self.cond_null = nn.Parameter(torch.zeros(cond_dim))
        if context_dim:
            self.context_null = nn.Parameter(torch.zeros(context_dim))
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, causal, context_dim) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, out_dim)
        self.initialize_weights()
        self.set_attention_backend(attn_backend)

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        for emb in (self.x_embedder, self.y_embedder):
            if isinstance(emb, nn.Embedding):
                nn.init.normal_(emb.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross is not None:  # cross-attention enters as a residual that starts at zero
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_attention_backend(self, name: str, device_type: str | None = None):
        """Choose the attention kernel for every layer ("auto", "sdpa", "xformers", "math")."""
        backend = resolve_backend(name, device_type or next(self.parameters()).device.type)
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.backend = backend

    def compile_blocks(self, **options):
        """torch.compile each transformer block in place (state_dict keys stay unchanged)."""
        for block in self.blocks:
            block.compile(**options)

    def _drop_mask(self, batch: int, device, drop):
        if drop is not None:
            return drop.to(device=device, dtype=torch.bool)
        if self.training and self.cond_dropout > 0:
            return torch.rand(batch, device=device) < self.cond_dropout
        return torch.zeros(batch, dtype=torch.bool, device=device)

    def forward(self, x, positions, t, label=None, cond=None, context=None, context_mask=None, drop=None):
        """
        Args:
            x: (B, N, in_dim) token vectors, or (B, N) token ids.
            positions: (N, A) integer grid coordinates shared by the batch.
            t: (B,) diffusion time in [0, 1].
            label: (B,) class ids; cond: (B, cond_dim); context: (B, M, context_dim)
                with context_mask (B, M) True where a context token is real.
            drop: (B,) bool, replace this sample's conditions by the null ones (guidance);
                None draws it with probability cond_dropout in training.
        Returns:
            (B, N, out_dim)
        """
        x = self.x_embedder(x)  # (B, N, D)
        angles = grid_angles(positions, self.hidden_size // self.num_heads if self.pos == "rope" else self.hidden_size)
        rope = None
        if self.pos == "rope":
            rope = rope_tables(angles)  # (N, Dh) each
        else:
            x = x + torch.cat([angles.sin(), angles.cos()], dim=-1).to(x.dtype)[None]
        c = self.t_embedder(t)  # (B, D)
        dropped = self._drop_mask(x.shape[0], x.device, drop)
        if self.y_embedder is not None:
            if label is None:
                raise ValueError("this DiT was built with num_classes > 0 and needs a label")
            label = torch.where(dropped, torch.full_like(label, self.num_classes), label)
            c = c + self.y_embedder(label)
        if self.cond_embedder is not None:
            cond = torch.where(dropped[:, None], self.cond_null.to(cond.dtype), cond)
            c = c + self.cond_embedder(cond)
        if context is not None:
            context = torch.where(dropped[:, None, None], self.context_null.to(context.dtype), context)
            if context_mask is not None:  # a dropped sample keeps one (null) context token
                first = torch.zeros_like(context_mask)
                first[:, 0] = True
                context_mask = torch.where(dropped[:, None], first, context_mask)
        slices = first_axis_slices(positions) if self.layout == "factorized" else None
        for i, block in enumerate(self.blocks):
            groups = None if slices is None else ("within" if i % 2 == 0 else "across", slices)
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, rope, context, context_mask, groups, use_reentrant=False)
            else:
                x = block(x, c, rope, context, context_mask, groups)  # (B, N, D)
        return self.final_layer(x, c)  # (B, N, out_dim)


LAYOUTS = ("full", "factorized")


def first_axis_slices(positions: torch.Tensor) -> int:
    """How many slices the first grid axis has, for the factorized layout. positions must be a full
    row-major grid (as torch.meshgrid(..., indexing="ij") lists it); one small host read."""
    n, axes = positions.shape
    if axes < 2:
        raise ValueError("backbone.layout=factorized needs a grid of 2 or more axes (video: t, h, w); use full")
    sizes = (positions.amax(dim=0) + 1).tolist()
    if math.prod(sizes) != n:
        raise ValueError(f"backbone.layout=factorized needs the full grid {sizes} of tokens, got {n} tokens")
    return int(sizes[0])


def check_shape(hidden_size: int, num_heads: int, pos: str):
    """Reject impossible backbone shapes with the keys to change."""
    if pos not in ("rope", "sincos"):
        raise ValueError(f"backbone.pos={pos!r}: choose 'rope' or 'sincos'")
    if hidden_size % num_heads:
        divisors = [h for h in range(1, hidden_size + 1) if hidden_size % h == 0 and 2 <= hidden_size // h <= 256]
        near = min(divisors, key=lambda h: abs(h - num_heads))
        raise ValueError(
            f"backbone.num_heads={num_heads} does not divide backbone.hidden_size={hidden_size}; "
            f"try backbone.num_heads={near}"
        )
    if (hidden_size // num_heads) % 2:
        raise ValueError(
            f"head size backbone.hidden_size/backbone.num_heads={hidden_size // num_heads} must be even for "
            "rotary positions; change backbone.num_heads"
        )


def num_flops_per_token(hidden_size: int, depth: int, n_tokens: float) -> float:
    """Training FLOPs per token: 6 x (12 d^2 + 2 N d) x depth (forward and backward), N the keys each
    query attends to (all tokens for the full layout)."""
    return 6 * (12 * hidden_size**2 + 2 * n_tokens * hidden_size) * depth
