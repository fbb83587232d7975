"""A frozen KL autoencoder between pixels and the latents that a DiT is trained on (Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

The VAE is diffusers' AutoencoderKL, loaded from any local diffusers-format folder
(`config.json` + `diffusion_pytorch_model.safetensors`, as `save_pretrained` writes it): a VAE that
polydiff trained (`modality=image_vae`) or a copy of a Stable Diffusion VAE. Nothing is downloaded.
Images go through it as (B, C, H, W) batches; clips (B, C, T, H, W) frame by frame, as Latte and
Open-Sora put video through Stable Diffusion's image VAE.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from einops import rearrange
from omegaconf import OmegaConf

LATENT_MODES = ("mean", "sample")
SPACES = ("pixel", "latent")  # modality.space of the modalities that diffuse pixels or a VAE's latents
# Config entries that say who wrote the folder, not what the VAE computes: ignored when a
# checkpoint's recorded VAE config is compared with the folder's.
PROVENANCE = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def vae_folder(path) -> Path:
    """The diffusers folder that `path` (modality.vae) names: the folder itself when it holds
    config.json, else its `vae/` sub-folder (a polydiff VAE checkpoint, a diffusers pipeline)."""
    path = Path(path)
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    if not path.exists():
        raise FileNotFoundError(
            f"modality.vae={path}: the VAE folder does not exist (moved or deleted?). Give the folder of a "
            "diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors), e.g. a VAE run's "
            "runs/<run>/checkpoints/last"
        )
    raise FileNotFoundError(
        f"modality.vae={path}: no diffusers AutoencoderKL there (neither {path / 'config.json'} nor "
        f"{path / 'vae' / 'config.json'}); give the folder that save_pretrained wrote"
    )


def read_vae_config(path) -> dict:
    """The VAE's diffusers config (what computes, without PROVENANCE entries), read from its folder."""
    config = json.loads((vae_folder(path) / "config.json").read_text())
    return {k: v for k, v in config.items() if k not in PROVENANCE}


def frame_by_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """fn over the frames of clips (B, C, T, H, W), or over images (B, C, H, W) as they are."""
    if x.dim() != 5:
        return fn(x)
    out = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(out, "(b t) c h w -> b c t h w", b=x.shape[0])


def check_patch(size: int, patch: int, factor: int = 1):
    """Reject a backbone.patch that does not tile a modality.size side, through a VAE's `factor`x
    downsampling when there is one (images and video frames)."""
    side = factor * patch  # pixels per token side
    if size % side:
        ok = [p for p in (1, 2, 4, 8) if size % (factor * p) == 0]
        through = f" (through the VAE's {factor}x downsampling)" if factor > 1 else ""
        raise ValueError(
            f"backbone.patch={patch}{through} does not divide modality.size={size}; "
            f"use backbone.patch in {ok} or a modality.size divisible by {side}"
        )


def batch_x0(codec: LatentCodec | None, batch: dict, generator=None) -> torch.Tensor:
    """A batch's x0: its pixels "x" without a VAE; with one, the scaled latents of its "moments" (the
    latent cache's items) or of its pixels, encoded now."""
    if codec is None:
        return batch["x"]
    moments = batch["moments"] if "moments" in batch else codec.moments(batch["x"])
    return codec.latents(moments, generator)


def space_codec(cfg, data) -> tuple[LatentCodec | None, bool]:
    """modality.space, modality.latent and data.cache_latents checked together: the frozen VAE for
    space=latent (None for pixels), and whether the latents come from the latent cache."""
    for key, value, valid in [("space", cfg.space, SPACES), ("latent", cfg.latent, LATENT_MODES)]:
        if value not in valid:
            raise ValueError(f"modality.{key}={value!r}; choose one of {valid}")
    codec = load_codec(cfg) if cfg.space == "latent" else None
    cache = bool(data is not None and data.get("cache_latents", False))
    if cache and codec is None:
        raise ValueError("data.cache_latents=true caches VAE latents; it needs modality.space=latent")
    return codec, cache


def load_codec(cfg) -> LatentCodec:
    """The frozen VAE that a latent modality's config names (modality.vae, modality.latent), checked
    against the config of it that a checkpoint recorded (modality.vae_config) when there is one."""
    if not cfg.vae:
        raise ValueError(
            "modality.space=latent needs modality.vae=<a diffusers AutoencoderKL folder> (a VAE run's "
            "runs/<run>/checkpoints/last, or any local copy such as sd-vae-ft-mse)"
        )
    codec = LatentCodec(cfg.vae, cfg.latent)
    if cfg.vae_config is not None:
        recorded = json.dumps(OmegaConf.to_container(cfg.vae_config), sort_keys=True)
        if json.dumps(read_vae_config(codec.folder), sort_keys=True) != recorded:
            raise ValueError(
                f"the VAE in {codec.folder} is not the one this model was trained with (its config.json "
                "differs from modality.vae_config in the checkpoint's config.yaml); give the original VAE folder"
            )
    return codec


class LatentCodec:
    """Pixels in [-1, 1] <-> scaled latents with (about) unit variance, through a frozen AutoencoderKL.

    z = (E(x) - shift) * scale, with `scaling_factor` and `shift_factor` (0 when absent) read from the
    VAE's config (the convention of Stable Diffusion 3 and of diffusers' pipelines).

    Args:
        path: modality.vae, a diffusers folder (or one with a `vae/` sub-folder).
        mode: "mean" encodes to the posterior mean; "sample" draws from the posterior (a little
            noise that keeps the DiT from fitting the encoder's exact outputs).
    """

    def __init__(self, path, mode: str = "mean"):
        if mode not in LATENT_MODES:
            raise ValueError(f"modality.latent={mode!r}; choose one of {LATENT_MODES}")
        self.folder, self.mode = vae_folder(path), mode
        from diffusers import AutoencoderKL  # here, not at the top: importing diffusers costs every start-up a second

        self.vae = AutoencoderKL.from_pretrained(self.folder, local_files_only=True).eval().requires_grad_(False)
        config = self.vae.config
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)
        self.channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)  # each encoder block but the last halves H and W

    def to(self, device) -> LatentCodec:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [-1, 1] -> (B, 2 c, H/f, W/f) posterior mean and log-variance,
        unscaled: what the latent cache stores, so that mode=sample still draws fresh noise. Clips
        (B, C, T, H, W) -> (B, 2 c, T, H/f, W/f), frame by frame."""
        self.to(x.device)
        return frame_by_frame(lambda f: self.vae.encode(f.to(self.vae.dtype)).latent_dist.parameters.float(), x)

    def latents(self, moments: torch.Tensor, generator=None) -> torch.Tensor:
        """Posterior moments (from `moments`) -> scaled latents z (B, c, [T,] H/f, W/f)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments)
        z = posterior.mean if self.mode == "mean" else posterior.sample(generator)
        return (z - self.shift) * self.scale

    def encode(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """(B, C, H, W) pixels in [-1, 1] -> scaled latents (B, c, H/f, W/f)."""
        return self.latents(self.moments(x), generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, c, h, w) -> pixels (B, C, h f, w f), about [-1, 1] (not clamped); clips
        (B, c, T, h, w) -> (B, C, T, h f, w f), frame by frame."""
        self.to(z.device)
        unscaled = z / self.scale + self.shift
        return frame_by_frame(lambda f: self.vae.decode(f.to(self.vae.dtype)).sample.float(), unscaled)

    def record(self) -> dict:
        """What a checkpoint's config keeps of the VAE: its resolved folder and its config."""
        return {"vae": str(self.folder.resolve()), "vae_config": read_vae_config(self.folder)}

    def fingerprint(self) -> str:
        """A hash of the VAE's weights and config: what a latent cache is keyed on."""
        digest = hashlib.sha256(json.dumps(read_vae_config(self.folder), sort_keys=True).encode())
        for path in sorted(self.folder.glob("*.safetensors")) + sorted(self.folder.glob("*.bin")):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]
