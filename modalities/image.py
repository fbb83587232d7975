"""Images in pixel space: 2-D patch tokens, class-conditional, saved as PNG grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from PIL import ImageColor
from torchvision.utils import save_image

from diffusion import PROCESSES
from diffusion.continuous import ContinuousProcess
from modalities.base import DiffusionConfig, Modality, ModalityConfig, label_cond
from modalities.image_data import MNIST, ImageFolder, Shapes
from modalities.image_metrics import evaluate_images


@dataclass
class ImageConfig(ModalityConfig):
    name: str = "image"
    process: str = "gaussian"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: str = "shapes"  # shapes (built in) | mnist (idx files in data.path) | folder (data.path)
    size: int = 32  # images are centre-cropped and resized to size x size
    channels: int | None = None  # None: 1 for mnist, 3 otherwise
    conditional: bool = True  # train and sample with class labels (classifier-free guidance)
    shapes_items: int = 20000  # size of the built-in shapes training split (test: a tenth)
    background: str = "white"  # folder: colour that transparent pixels are composited onto (name or #rrggbb)
    # class names; kept when given (mnist: label i is classes[i]; folder: the sub-folder names), else
    # filled from the data at the start of training (mnist: classes.txt beside the files, else 0..9)
    classes: list[str] | None = None


class Image(Modality):
    Config = ImageConfig
    grid_axes = 2
    requests = ("label",)
    DATASETS = ("shapes", "mnist", "folder")

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        continuous = sorted(name for name, cls in PROCESSES.items() if issubclass(cls, ContinuousProcess))
        if cfg.process not in continuous:
            raise ValueError(f"modality.process={cfg.process!r} does not model pixels; choose one of {continuous}")
        if cfg.dataset not in self.DATASETS:
            raise ValueError(f"modality.dataset={cfg.dataset!r}; choose one of {self.DATASETS}")
        if cfg.dataset != "shapes" and not self.data_path:
            raise ValueError(f"modality.dataset={cfg.dataset} needs data.path=<folder>")
        self.channels = cfg.channels or (1 if cfg.dataset == "mnist" else 3)
        self.grid = (cfg.size // patch, cfg.size // patch)
        try:
            self.background = ImageColor.getrgb(cfg.background)[:3]
        except ValueError:
            raise ValueError(
                f"modality.background={cfg.background!r} is not a colour; use a name (white, black) or #rrggbb"
            ) from None

    def check(self, backbone):
        if self.cfg.size % backbone.patch:
            ok = [p for p in (1, 2, 4, 8) if self.cfg.size % p == 0]
            raise ValueError(
                f"backbone.patch={backbone.patch} does not divide modality.size={self.cfg.size}; "
                f"use backbone.patch in {ok} or a modality.size divisible by {backbone.patch}"
            )

    def dataset(self, split: str):
        cfg = self.cfg
        if cfg.dataset == "shapes":
            n = cfg.shapes_items if split == "train" else max(1, cfg.shapes_items // 10)
            return Shapes(n, cfg.size, self.channels, seed=0 if split == "train" else 1)
        if cfg.dataset == "mnist":
            return MNIST(self.data_path, split, cfg.size, self.channels, cfg.classes)
        root = Path(self.data_path)
        folder = root / split if (root / split).is_dir() else root
        return ImageFolder(folder, cfg.size, self.channels, self.background, cfg.classes)

    def classifier_key(self) -> dict:
        path = self.data_path and str(Path(self.data_path).resolve())
        return {"dataset": self.cfg.dataset, "size": self.cfg.size, "channels": self.channels, "path": path}

    def resolve(self, train_set) -> dict:
        """The class names (the user's, when given: the data sets take them) and the channels."""
        given = self.cfg.classes
        if given is not None and list(given) != list(train_set.classes):
            raise ValueError(
                f"modality.classes={list(given)} does not match the {self.cfg.dataset} data set's classes "
                f"{list(train_set.classes)}; drop modality.classes or name those"
            )
        return {"classes": list(train_set.classes), "channels": self.channels}

    def cond(self, batch):
        return {"label": batch["label"]} if self.cfg.conditional else {}

    def decode(self, x0, model=None, **request):
        return ((x0.float().clamp(-1, 1) + 1) / 2).cpu()  # (B, C, H, W) in [0, 1]

    def save(self, samples, path):
        path = Path(path).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(samples, path, nrow=max(1, int(len(samples) ** 0.5)), padding=1)
        return str(path)

    def backbone_kwargs(self):
        dim = self.patch * self.patch * self.channels
        return {"in_dim": dim, "out_dim": dim, "num_classes": len(self.classes) if self.cfg.conditional else 0}

    def to_tokens(self, x):
        tokens = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch, p2=self.patch)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
        return tokens, torch.stack([ys, xs], dim=-1).reshape(-1, 2)  # (B, N, p*p*C), (N, 2)

    def from_tokens(self, tokens, shape):
        h, w = shape[-2] // self.patch, shape[-1] // self.patch
        return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=self.patch, p2=self.patch)

    def sample_shape(self, n):
        return (n, self.channels, self.cfg.size, self.cfg.size)

    def sample_cond(self, n, device, label=None, **request):
        return label_cond(self.cfg, self.classes if self.cfg.conditional else [], n, device, label)

    def evaluate(self, model, process, args, device, reference=None):
        """Classifier label agreement and Fréchet distance (see modalities/image_metrics.py)."""
        return evaluate_images(self, model, process, args, device)
