"""polydiff's own KL autoencoder (modality=image_vae): a small configuration of diffusers'
AutoencoderKL trained through the same loop as the DiT (accelerator, EMA, checkpoints, resume,
bad-data handling), with no noise process.

Objective (Rombach et al. 2022, Sec. 3 and App. G, without the perceptual and adversarial terms):
a reconstruction error (L1 or L2) of the decoded posterior sample, plus kl_weight times
KL(q(z | x) || N(0, I)) per pixel value, which keeps the latent space smooth for the DiT.

At the end of training (Modality.finish) it measures the latents' mean and standard deviation on
training images and writes them into the VAE's config as shift_factor and scaling_factor (so that the
DiT sees unit-variance latents), prints the held-out reconstruction PSNR, saves originals beside
reconstructions as a PNG, and writes the diffusers folder `checkpoints/last/vae` (save_pretrained),
which `diffusers.AutoencoderKL.from_pretrained` loads and `modality.vae=runs/<run>/checkpoints/last`
names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.utils import save_image

from modalities.base import Modality
from modalities.data import Tolerant, collate
from modalities.image_data import image_dataset, image_source

if TYPE_CHECKING:  # imported where a VAE is built: diffusers costs every start-up a second
    from diffusers import AutoencoderKL


@dataclass
class ImageVAEConfig:
    name: str = "image_vae"
    dataset: str = "shapes"  # shapes (built in) | mnist | moving_mnist (its frames) (idx files in data.path) | folder
    size: int = 32
    channels: int | None = None  # None: 1 for mnist, 3 otherwise
    shapes_items: int = 20000
    background: str = "white"  # folder: colour that transparent pixels are composited onto
    classes: list[str] | None = None  # mnist / folder: class names, as for modality=image (not trained on)
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # 2^(len-1) downsampling
    layers_per_block: int = 1
    norm_num_groups: int = 8  # GroupNorm groups; must divide every block_out_channels entry
    reconstruction: str = "l1"  # l1 | l2
    kl_weight: float = 1e-5  # weight of the KL term per pixel value
    holdout: int = 512  # held-out images the final PSNR is measured on
    scale_items: int = 2048  # training images the latent scaling factor is measured on


class Autoencoder(nn.Module):
    """diffusers' AutoencoderKL as the trainer's model: forward(x) -> (reconstruction of a posterior
    sample, posterior), and the two methods the trainer calls on every model."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x, generator=None):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample(generator)).sample, posterior  # (B, C, H, W), q(z | x)

    def set_attention_backend(self, name: str, device_type: str | None = None):
        """Nothing to choose: the VAE's one attention layer (its mid-block, over the small latent grid)
        runs diffusers' own SDPA processor."""

    def compile_blocks(self, **options):
        self.vae.encoder.compile(**options)
        self.vae.decoder.compile(**options)


class ImageVAE(Modality):
    """Images -> an AutoencoderKL trained to reconstruct them (see the module docstring)."""

    Config = ImageVAEConfig
    grid_axes = 2
    RECONSTRUCTIONS = ("l1", "l2")

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        self.channels, self.background = image_source(cfg, self.data_path)
        if cfg.reconstruction not in self.RECONSTRUCTIONS:
            raise ValueError(f"modality.reconstruction={cfg.reconstruction!r}; choose one of {self.RECONSTRUCTIONS}")
        bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
        if bad:
            raise ValueError(
                f"modality.norm_num_groups={cfg.norm_num_groups} does not divide modality.block_out_channels "
                f"entries {bad}; use a common divisor such as {math.gcd(*cfg.block_out_channels)}"
            )

    def check(self, backbone):
        factor = 2 ** (len(self.cfg.block_out_channels) - 1)
        if self.cfg.size % factor:
            raise ValueError(
                f"modality.size={self.cfg.size} is not divisible by the VAE's {factor}x downsampling "
                f"({len(self.cfg.block_out_channels)} modality.block_out_channels); use a size divisible by {factor}"
            )

    def dataset(self, split: str):
        return image_dataset(self.cfg, split, self.data_path, self.channels, self.background)

    def resolve(self, train_set) -> dict:
        return {"channels": self.channels}

    def noise_process(self):
        return None  # trained by reconstruction, not denoising

    def build_model(self, cfg) -> Autoencoder:
        from diffusers import AutoencoderKL

        c = self.cfg
        n = len(c.block_out_channels)
        vae = AutoencoderKL(
            in_channels=self.channels,
            out_channels=self.channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            latent_channels=c.latent_channels,
            norm_num_groups=c.norm_num_groups,
            sample_size=c.size,
            scaling_factor=1.0,  # measured on the data at the end of training (finish)
        )
        return Autoencoder(vae)

    def loss(self, process, model, batch, cond, generator=None):
        """Reconstruction error per pixel value + kl_weight x KL(q(z | x) || N(0, I)) per pixel value."""
        x = batch["x"]
        reconstruction, posterior = model(x, generator)
        error = F.l1_loss if self.cfg.reconstruction == "l1" else F.mse_loss
        return error(reconstruction.float(), x.float()) + self.cfg.kl_weight * posterior.kl().mean() / x[0].numel()

    def save(self, samples, path, **request):
        """Originals (top half of the rows) above their reconstructions, as one PNG."""
        path = Path(path).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples, path, nrow=max(1, len(samples) // 2), padding=1)
        return str(path)

    @torch.no_grad()
    def reconstruct(self, model, x):
        """Pixels (B, C, H, W) in [-1, 1] -> their reconstructions through the posterior mean, clamped."""
        vae = model.vae
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)

    def preview(self, model, device, path):
        x = next(self._batches("test", 8, device))
        return self.save((torch.cat([x, self.reconstruct(model, x)]) + 1) / 2, path)

    def _batches(self, split: str, n: int, device):
        """The readable ones of the first n images of `split`, in batches of 64, on device."""
        data = self.dataset(split)
        loader = DataLoader(Tolerant(Subset(data, range(min(n, len(data))))), batch_size=64, collate_fn=collate)
        for batch in loader:
            if batch["n"]:
                yield batch["x"].to(device)

    @torch.no_grad()
    def finish(self, model, run_dir, device):
        """Measure the latent scaling factor and shift, the held-out PSNR, save the PNG and the folder."""
        model.eval()
        latents = torch.cat(
            [model.vae.encode(x).latent_dist.sample() for x in self._batches("train", self.cfg.scale_items, device)]
        )
        shift, scale = latents.mean().item(), 1 / latents.std().item()  # Rombach et al. 2022, Sec. 4.3.2
        psnr, shown = [], None
        for x in self._batches("test", self.cfg.holdout, device):
            reconstruction = self.reconstruct(model, x)
            mse = ((reconstruction - x) / 2).pow(2).flatten(1).mean(1)  # on [0, 1] pixels
            psnr.append(10 * torch.log10(1 / mse.clamp(min=1e-10)))  # per image, then averaged
            shown = shown if shown is not None else torch.cat([x[:8], reconstruction[:8]])
        psnr = torch.cat(psnr)
        n, psnr = len(psnr), psnr.mean().item()
        picture = self.save((shown + 1) / 2, run_dir / "reconstructions")
        report = {"heldout_psnr_db": psnr, "heldout_images": n, "scaling_factor": scale, "shift_factor": shift}
        (run_dir / "vae_eval.json").write_text(json.dumps(report, indent=2))
        print(
            f"held-out reconstruction PSNR {psnr:.2f} dB over {n} images; originals above reconstructions in {picture}"
        )
        last = run_dir / "checkpoints" / "last"
        if not last.exists():
            print("warning: no checkpoint was written, so no VAE folder either")
            return
        model.vae.register_to_config(scaling_factor=scale, shift_factor=shift)
        folder = last.resolve() / "vae"
        model.vae.save_pretrained(folder)
        print(
            f"latents: scaling_factor {scale:.4f}, shift_factor {shift:.4f}; VAE saved to {folder} (diffusers "
            f"format): train a latent DiT with modality=image (or video) modality.space=latent modality.vae={last}"
        )
