"""Images: 2-D patch tokens of pixels or of VAE latents (modality.space), conditioned on class
labels, captions or both (modality.condition), saved as PNG grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from torchvision.utils import save_image

from diffusion import PROCESSES
from diffusion.continuous import ContinuousProcess
from modalities.base import DiffusionConfig, Modality, ModalityConfig, label_cond
from modalities.image_adherence import evaluate_adherence
from modalities.image_data import image_dataset, image_source
from modalities.image_metrics import evaluate_images
from modalities.latent_cache import LatentCache
from modalities.latents import batch_x0, check_patch, space_codec
from modalities.prompts import TextEncoder


@dataclass
class ImageConfig(ModalityConfig):
    name: str = "image"
    process: str = "gaussian"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: str = "shapes"  # shapes (built in) | mnist | moving_mnist (its frames) (idx files in data.path) | folder
    size: int = 32  # images are centre-cropped and resized to size x size
    channels: int | None = None  # None: 1 for mnist, 3 otherwise
    conditional: bool = True  # train and sample with a condition (modality.condition), for classifier-free guidance
    shapes_items: int = 20000  # size of the built-in shapes training split (test: a tenth)
    background: str = "white"  # folder: colour that transparent pixels are composited onto (name or #rrggbb)
    # class names; kept when given (mnist: label i is classes[i]; folder: the sub-folder names), else
    # filled from the data at the start of training (mnist: classes.txt beside the files, else 0..9)
    classes: list[str] | None = None
    space: str = "pixel"  # pixel | latent (the DiT models the latents of the VAE in modality.vae)
    vae: str | None = None  # space=latent: a diffusers AutoencoderKL folder (e.g. a VAE run's checkpoints/last)
    latent: str = "mean"  # space=latent: encode to the posterior mean | a posterior sample
    vae_config: dict[str, Any] | None = None  # filled at the start of training; checked when the VAE is loaded
    condition: str = "label"  # conditional models: label | caption | both
    text_encoder: str | None = None  # captions: a local transformers folder; null: MiniLM (the prompts extra)
    caption_tokens: int = 16  # captions are padded or cut to this many tokens
    missing_caption: str = "error"  # folder data with captions: an image without one is an error | empty
    prompts: list[str] | None = None  # filled from the training captions: what preview grids ask for
    # 0: the DiT's tokens are read out to pixels by its linear layer; F > 0: they carry F values per
    # pixel and a small convolutional head draws the pixels from them (backbones/heads.py)
    head_channels: int = 0
    self_condition: bool = False  # the network also sees its previous x0 estimate (Chen et al. 2023)


def grid_columns(n: int) -> int:
    """Images per row of a saved grid of n (a square grid); prompts= gives one prompt per row."""
    return max(1, int(n**0.5))


def caption_rows(path: Path, captions: list[str], pitch: int) -> None:
    """Write captions[i] in a white margin left of row i of the PNG grid at `path` (rows `pitch`
    pixels apart). PIL draws into the file as it is; a plotting library would resample the images."""
    grid = PILImage.open(path).convert("RGB")
    font = ImageFont.load_default()
    captions = [c or "(empty prompt)" for c in captions]
    margin = 8 + int(max(ImageDraw.Draw(grid).textlength(c, font=font) for c in captions))
    page = PILImage.new("RGB", (grid.width + margin, grid.height), "white")
    page.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(page)
    for i, caption in enumerate(captions):
        draw.text((4, 1 + i * pitch + pitch // 2), caption, fill="black", font=font, anchor="lm")
    page.save(path)


class Image(Modality):
    Config = ImageConfig
    grid_axes = 2
    positions = "sincos"  # objects at set places: absolute positions learn them faster (Modality.positions)
    requests = ("label", "prompt")  # narrowed per model in __init__
    CONDITIONS = ("label", "caption", "both")

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        continuous = sorted(name for name, cls in PROCESSES.items() if issubclass(cls, ContinuousProcess))
        if cfg.process not in continuous:
            raise ValueError(f"modality.process={cfg.process!r} does not model pixels; choose one of {continuous}")
        for key, value, valid in [
            ("condition", cfg.condition, self.CONDITIONS),
            ("missing_caption", cfg.missing_caption, ("error", "empty")),
        ]:
            if value not in valid:
                raise ValueError(f"modality.{key}={value!r}; choose one of {valid}")
        self.codec, self.cache_latents = space_codec(cfg, data)
        self.channels, self.background = image_source(cfg, self.data_path)
        # x0: pixels, or latents of 1/factor the size with the VAE's channels
        self.x_channels = self.codec.channels if self.codec else self.channels
        self.factor = self.codec.factor if self.codec else 1
        self.labels = cfg.conditional and cfg.condition in ("label", "both")
        captions = cfg.conditional and cfg.condition in ("caption", "both")
        self.text = TextEncoder(cfg.text_encoder, cfg.caption_tokens) if captions else None
        # what this model takes at sampling: label= (label models, refused with a reason by unconditional
        # ones) and prompt= (caption models); infer/ refuses the other naming these
        self.requests = (("label",) if self.labels or not captions else ()) + (("prompt",) if captions else ())

    def check(self, backbone):
        check_patch(self.cfg.size, backbone.patch, self.factor)

    def pixels(self, split: str):
        """The pixel data set of `split`, as the data config names it."""
        missing = self.cfg.missing_caption if self.text else "empty"  # captions matter only to caption models
        return image_dataset(self.cfg, split, self.data_path, self.channels, self.background, missing)

    def dataset(self, split: str):
        """The pixel data set, or with data.cache_latents its latents encoded once (LatentCache)."""
        pixels = self.pixels(split)
        if not self.cache_latents:
            return pixels
        identity = {**self.classifier_key(), "split": split}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return LatentCache(pixels, self.codec, identity, device)

    def classifier_data(self, split: str):
        return self.pixels(split)  # the classifier reads pixels, never the latent cache

    def classifier_key(self) -> dict:
        path = self.data_path and str(Path(self.data_path).resolve())
        return {"dataset": self.cfg.dataset, "size": self.cfg.size, "channels": self.channels, "path": path}

    def resolve(self, train_set) -> dict:
        """The class names (the user's, when given: the data sets take them) and the channels; for
        latents the VAE's resolved folder and config; for captions a few training captions that
        preview grids and prompt-less sampling ask for."""
        given = self.cfg.classes
        if given is not None and list(given) != list(train_set.classes):
            raise ValueError(
                f"modality.classes={list(given)} does not match the {self.cfg.dataset} data set's classes "
                f"{list(train_set.classes)}; drop modality.classes or name those"
            )
        facts = {"classes": list(train_set.classes), "channels": self.channels}
        if self.codec:  # where the VAE is and what it is, so that sampling finds and checks it
            facts.update(self.codec.record())
        if self.text:
            seen = [train_set[i]["caption"] for i in range(min(len(train_set), 64))]
            facts["prompts"] = list(dict.fromkeys(c for c in seen if c))[:4] or [""]
        return facts

    def cond(self, batch):
        cond = {"label": batch["label"]} if self.labels else {}
        if self.text:
            cond.update(self.text(list(batch["caption"]), batch["label"].device))
        return cond

    def encode(self, batch, generator=None):
        """Pixels, or their scaled VAE latents (from the latent cache's moments when it is on)."""
        return batch_x0(self.codec, batch, generator)

    def decode(self, x0, model=None, **request):
        x = self.codec.decode(x0) if self.codec else x0
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()  # (B, C, H, W) in [0, 1]

    def save(self, samples, path, prompt=None, **request):
        """A PNG grid; asked with prompt=, it names each row's prompt at its left."""
        path = Path(path).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = grid_columns(len(samples))
        save_image(samples, path, nrow=columns, padding=1)
        if self.text and prompt is not None:
            caption_rows(path, self.captions(len(samples), prompt)[::columns], pitch=samples.shape[-2] + 1)
        return str(path)

    def conv_head(self):
        return (self.cfg.head_channels, self.x_channels) if self.cfg.head_channels else None

    def backbone_kwargs(self):
        dim = self.patch * self.patch * self.x_channels
        text_dim = self.text.dim if self.text else 0
        num_classes = len(self.classes) if self.labels else 0
        return {
            "in_dim": dim * (2 if self.cfg.self_condition else 1),  # x_t [, the previous x0 estimate]
            "out_dim": self.patch * self.patch * (self.cfg.head_channels or self.x_channels),
            "num_classes": num_classes,
            "cond_dim": text_dim,
            "context_dim": text_dim,
        }

    def coarsen(self, x0):
        """Each 2x2 block of pixels (or latent cells) averaged into one: a quarter of the tokens."""
        side = x0.shape[-1] // 2
        if x0.shape[-1] % 2 or side % self.patch:
            raise ValueError(
                f"coarse_share: the coarse images are {x0.shape[-1]}/2 cells a side, which "
                f"backbone.patch={self.patch} does not divide; choose modality.size or backbone.patch to fit, "
                "or coarse_share=0"
            )
        return F.avg_pool2d(x0, 2)

    def to_tokens(self, x):
        tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch, p2=self.patch)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        stride = self.sample_shape(1)[-1] // x.shape[-1]  # 2 for coarsened images: the full grid's places
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        return tokens, torch.stack([ys, xs], dim=-1).reshape(-1, 2) * stride  # (B, N, p*p*C), (N, 2)

    def from_tokens(self, tokens, shape):
        h, w = shape[-2] // self.patch, shape[-1] // self.patch
        return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=self.patch, p2=self.patch)

    def sample_shape(self, n):
        side = self.cfg.size // self.factor
        return (n, self.x_channels, side, side)

    def sample_cond(self, n, device, label=None, prompt=None, **request):
        """Labels (label_cond) and/or captions: `prompt` is one caption, or several separated by "|",
        one per row of the saved grid (cycling when there are more rows); without it, the training
        captions recorded in modality.prompts."""
        if label is not None and self.text and not self.labels:
            raise ValueError(
                f"this model was trained on captions (modality.condition={self.cfg.condition}); use prompt="
            )
        if prompt is not None and self.text is None:
            raise ValueError("prompt= needs a model trained on captions (modality.condition=caption or both)")
        if not self.text:
            return label_cond(self.cfg, self.classes if self.labels else [], n, device, label)
        cond = label_cond(self.cfg, self.classes, n, device, label) if self.labels else {}
        return {**cond, **self.text(self.captions(n, prompt), device)}

    def captions(self, n, prompt=None) -> list[str]:
        """The caption of each of n samples: `prompt` split at "|", one part per grid row (cycling),
        or without it the training captions recorded in modality.prompts."""
        prompts = prompt.split("|") if prompt is not None else list(self.cfg.prompts or [""])
        return [prompts[(i // grid_columns(n)) % len(prompts)] for i in range(n)]

    def evaluate(self, model, process, args, device, reference=None):
        """Classifier label agreement and Fréchet distance (see modalities/image_metrics.py), and for
        captioned shapes the prompt adherence (modalities/image_adherence.py)."""
        metrics = evaluate_images(self, model, process, args, device)
        if self.text and self.cfg.dataset == "shapes":
            metrics.update(evaluate_adherence(self, model, process, args, device))
        return metrics
