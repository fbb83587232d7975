"""A convolutional output head for the DiT on grid data (images, video).

The DiT's final layer maps each token to its patch's values through one linear layer, so a token
draws its pixels from a fixed dictionary of patches and neighbouring tokens meet at hard seams: at
a small budget the samples are blobs with ragged outlines (bench/RESULTS.md, issue 12). U-ViT (Bao
et al. 2023) adds a 3x3 convolution after unpatchifying. Here the DiT emits `features` values per
grid cell instead of the data's channels, the modality unpatchifies them like data, and two small
convolutions, which see across token borders and draw the same at every offset, turn them into
the prediction. Written here because it is a few layers; no library offers it as a module.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvHead(nn.Module):
    """(B, features, *grid) -> (B, channels, *grid) for grids of 2 (H, W) or 3 (T, H, W) axes: a 1x1
    projection plus a residual of two 3-wide convolutions. The second convolution and the projection's
    bias start at zero, so the model's first output is zero, as the DiT's own is (adaLN-Zero)."""

    def __init__(self, features: int, channels: int, axes: int):
        super().__init__()
        if axes not in (2, 3):
            raise ValueError(f"a convolutional head needs a grid of 2 or 3 axes, got {axes}")
        conv = nn.Conv2d if axes == 2 else nn.Conv3d
        self.skip = conv(features, channels, 1)
        self.conv1 = conv(features, features, 3, padding=1)
        self.conv2 = conv(features, channels, 3, padding=1)
        for param in (self.skip.bias, self.conv2.weight, self.conv2.bias):  # zero output, as the DiT's
            nn.init.zeros_(param)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.skip(f) + self.conv2(F.silu(self.conv1(f)))


class HeadedDiT(nn.Module):
    """The DiT followed by a ConvHead; what the checkpoint of a model with modality.head_channels > 0
    holds (`dit.*`, `head.*`). The modality's unpatchify (tokens -> grid features) is passed to each
    call, so the whole network runs in one forward (what DDP wraps)."""

    def __init__(self, dit: nn.Module, head: ConvHead):
        super().__init__()
        self.dit, self.head = dit, head

    def forward(self, x, positions, t, unpatchify, **cond):
        return self.head(unpatchify(self.dit(x, positions, t, **cond)))

    def set_attention_backend(self, name: str, device_type: str | None = None):
        self.dit.set_attention_backend(name, device_type)

    def compile_blocks(self, **options):
        self.dit.compile_blocks(**options)
