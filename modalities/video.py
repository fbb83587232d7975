"""Video: a whole clip is one spatiotemporal tensor (B, C, T, H, W), pixels in [-1, 1] or the
latents of a frozen image VAE taken frame by frame (modality.space, as Latte and Open-Sora put clips
through Stable Diffusion's VAE), cut into tubelet tokens with (t, h, w) grid positions, so the DiT
denoises every frame together; saved as H.264 MP4s plus a PNG strip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from omegaconf import OmegaConf
from PIL import Image as PILImage
from torchvision.utils import save_image

from modalities.base import DiffusionConfig, Modality, ModalityConfig, label_cond
from modalities.image import Image
from modalities.image_data import to_tensor
from modalities.latent_cache import LatentCache
from modalities.latents import batch_x0, check_patch, space_codec
from modalities.media import write_video
from modalities.video_data import MovingMNIST, MovingShapes, VideoFolder
from modalities.video_metrics import evaluate_videos


@dataclass
class VideoConfig(ModalityConfig):
    name: str = "video"
    process: str = "gaussian"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: str = "shapes"  # shapes (built in) | moving_mnist (idx files in data.path) | folder (data.path)
    frames: int = 8  # frames per clip
    size: int = 32  # frames are centre-cropped and resized to size x size
    channels: int | None = None  # None: 1 for moving_mnist, 3 otherwise
    tubelet: int = 1  # frames per token; a token is tubelet x backbone.patch x backbone.patch pixels
    stride: int = 1  # folder: keep every stride-th decoded frame
    digits: int = 1  # moving_mnist: digits per clip (the label is the first one's)
    speed: float = 2.0  # shapes and moving_mnist: pixels per frame at modality.size (random directions)
    fps: int = 8  # frame rate of the MP4s written
    conditional: bool = True  # train and sample with class labels (classifier-free guidance)
    shapes_items: int = 20000  # size of the built-in shapes training split (test: a tenth)
    classes: list[str] | None = None  # filled from the data at the start of training
    head_channels: int = 0  # 0: linear read-out; F > 0: F values per pixel, then a convolutional head
    self_condition: bool = False  # the network also sees its previous x0 estimate (Chen et al. 2023)
    space: str = "pixel"  # pixel | latent (the DiT models the frames' latents of the VAE in modality.vae)
    vae: str | None = None  # space=latent: a diffusers AutoencoderKL folder (e.g. a VAE run's checkpoints/last)
    latent: str = "mean"  # space=latent: encode to the posterior mean | a posterior sample
    vae_config: dict[str, Any] | None = None  # filled at the start of training; checked when the VAE is loaded


class Video(Modality):
    """Clips (B, C, T, H, W) in [-1, 1], channels 1 or 3. Sampling takes label= and
    first_frame=<image file> (image-to-video: frame 0 held fixed at every step)."""

    Config = VideoConfig
    grid_axes = 3
    requests = ("label", "first_frame")
    DATASETS = ("shapes", "moving_mnist", "folder")
    STRIP_COLUMNS = 16  # a strip shows at most this many frames per clip (every k-th of longer clips)

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        if cfg.dataset not in self.DATASETS:
            raise ValueError(f"modality.dataset={cfg.dataset!r}; choose one of {self.DATASETS}")
        if cfg.dataset != "shapes" and not self.data_path:
            raise ValueError(f"modality.dataset={cfg.dataset} needs data.path=<folder>")
        if cfg.digits not in (1, 2):
            raise ValueError(f"modality.digits={cfg.digits}; choose 1 or 2")
        self.codec, self.cache_latents = space_codec(cfg, data)
        self.channels = cfg.channels or (1 if cfg.dataset == "moving_mnist" else 3)
        self.tubelet = cfg.tubelet
        # x0: pixels, or per frame latents of 1/factor the side with the VAE's channels
        self.x_channels = self.codec.channels if self.codec else self.channels
        self.factor = self.codec.factor if self.codec else 1

    def check(self, backbone):
        cfg = self.cfg
        if cfg.frames % cfg.tubelet:
            ok = [k for k in range(1, cfg.frames + 1) if cfg.frames % k == 0]
            raise ValueError(
                f"modality.tubelet={cfg.tubelet} does not divide modality.frames={cfg.frames}; "
                f"use modality.tubelet in {ok} or modality.frames={max(1, cfg.frames // cfg.tubelet) * cfg.tubelet}"
            )
        check_patch(cfg.size, backbone.patch, self.factor)

    def dataset(self, split: str):
        """The clips, or with data.cache_latents their frames' latents encoded once (LatentCache)."""
        clips = self.pixels(split)
        if not self.cache_latents:
            return clips
        identity = {"dataset": self.cfg.dataset, "frames": self.cfg.frames, "size": self.cfg.size, "split": split}
        identity["path"] = self.data_path and str(Path(self.data_path).resolve())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return LatentCache(clips, self.codec, identity, device)

    def pixels(self, split: str):
        """The pixel clips of `split`, as the data config names them."""
        cfg = self.cfg
        if cfg.dataset == "shapes":
            n = cfg.shapes_items if split == "train" else max(1, cfg.shapes_items // 10)
            seed = 0 if split == "train" else 1
            return MovingShapes(n, cfg.frames, cfg.size, self.channels, seed, speed=cfg.speed / cfg.size)
        if cfg.dataset == "moving_mnist":
            return MovingMNIST(
                self.data_path, split, cfg.frames, cfg.size, self.channels, cfg.digits, cfg.speed, cfg.classes
            )
        root = Path(self.data_path)
        root = root / split if (root / split).is_dir() else root
        return VideoFolder(root, cfg.frames, cfg.size, self.channels, cfg.stride)

    def frame_modality(self) -> Image:
        """The image modality whose data looks like this one's frames (same data, size and
        channels): its classifier scores generated frames (modalities/video_metrics.py)."""
        dataset = {"shapes": "shapes", "moving_mnist": "mnist", "folder": "folder"}[self.cfg.dataset]
        cfg = Image.Config(
            dataset=dataset, size=self.cfg.size, channels=self.channels, shapes_items=self.cfg.shapes_items
        )
        data = OmegaConf.create({"path": self.data_path, "bad_threshold": self.bad_threshold})
        return Image(OmegaConf.structured(cfg), self.patch, data)

    def resolve(self, train_set) -> dict:
        facts = {"classes": list(train_set.classes), "channels": self.channels}
        if self.codec:  # where the VAE is and what it is, so that sampling finds and checks it
            facts.update(self.codec.record())
        return facts

    def cond(self, batch):
        return {"label": batch["label"]} if self.cfg.conditional else {}

    def encode(self, batch, generator=None):
        """Pixel clips, or their frames' scaled VAE latents (B, c, T, H/f, W/f), from the latent cache's
        moments when it is on."""
        return batch_x0(self.codec, batch, generator)

    def decode(self, x0, model=None, **request):
        x = self.codec.decode(x0) if self.codec else x0
        return ((x.float().clamp(-1, 1) + 1) / 2).cpu()  # (B, C, T, H, W) in [0, 1]

    def save(self, samples, path, **request):
        """Each clip as `<path>-<i>.mp4` at modality.fps, and `<path>.png`: one row per clip,
        every frame (every k-th when a clip has more than STRIP_COLUMNS). Returns the PNG's path."""
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (samples * 255).round().to(torch.uint8)
        for i, clip in enumerate(pixels):
            frames = rearrange(clip, "c t h w -> t h w c").numpy()
            write_video(frames if clip.shape[0] == 3 else frames[..., 0], f"{path}-{i:03d}.mp4", self.cfg.fps)
        k = -(-samples.shape[2] // self.STRIP_COLUMNS)  # ceil(T / columns)
        shown = samples[:, :, ::k]
        strip = rearrange(shown, "b c t h w -> (b t) c h w")
        save_image(strip, path.with_suffix(".png"), nrow=shown.shape[2], padding=1)
        return str(path.with_suffix(".png"))

    def conv_head(self):
        return (self.cfg.head_channels, self.x_channels) if self.cfg.head_channels else None

    def backbone_kwargs(self):
        dim = self.tubelet * self.patch * self.patch * self.x_channels
        out = self.tubelet * self.patch * self.patch * (self.cfg.head_channels or self.x_channels)
        inputs = dim * (2 if self.cfg.self_condition else 1)  # x_t [, the previous x0 estimate]
        return {"in_dim": inputs, "out_dim": out, "num_classes": len(self.classes) if self.cfg.conditional else 0}

    def to_tokens(self, x):
        pt, p = self.tubelet, self.patch
        tokens = rearrange(x, "b c (t pt) (h p1) (w p2) -> b (t h w) (pt p1 p2 c)", pt=pt, p1=p, p2=p)
        t, h, w = x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p
        grid = torch.meshgrid(*(torch.arange(n, device=x.device) for n in (t, h, w)), indexing="ij")
        return tokens, torch.stack(grid, dim=-1).reshape(-1, 3)  # (B, N, pt*p*p*C), (N, 3) row-major (t, h, w)

    def from_tokens(self, tokens, shape):
        pt, p = self.tubelet, self.patch
        t, h, w = shape[2] // pt, shape[3] // p, shape[4] // p
        return rearrange(tokens, "b (t h w) (pt p1 p2 c) -> b c (t pt) (h p1) (w p2)", t=t, h=h, w=w, pt=pt, p1=p, p2=p)

    def sample_shape(self, n):
        side = self.cfg.size // self.factor
        return (n, self.x_channels, self.cfg.frames, side, side)

    def sample_cond(self, n, device, label=None, **request):
        return label_cond(self.cfg, self.classes if self.cfg.conditional else [], n, device, label)

    def sample_options(self, model=None, first_frame=None, **request):
        """first_frame=<image file>: image-to-video. The image, centre-cropped and resized like the
        training frames, replaces frame 0 of the x0 estimate at every step (the replacement
        method of inpainting, Lugmayr et al. 2022 without resampling), so the clip is generated
        around it and its frame 0 is exactly the given image (in latent space: the VAE's latent of
        it, so frame 0 is the VAE's reconstruction of the image)."""
        options = super().sample_options(model)
        if first_frame is None:
            return options
        try:
            with PILImage.open(first_frame) as image:
                image.load()
                frame = to_tensor(image, self.cfg.size, self.channels)  # (C, H, W) in [-1, 1]
        except OSError as e:
            raise ValueError(f"first_frame={first_frame}: cannot read as an image ({e})") from e
        if self.codec:
            frame = self.codec.encode(frame[None])[0]  # (c, H/f, W/f)

        def hold_first_frame(x0_hat, progress):
            x0_hat = x0_hat.clone()
            x0_hat[:, :, 0] = frame.to(x0_hat)
            return x0_hat

        return {**options, "x0_hook": hold_first_frame}

    def evaluate(self, model, process, args, device, reference=None):
        """Per-frame label agreement, identity consistency, motion and Fréchet distance of the
        frame classifier's features (see modalities/video_metrics.py)."""
        return evaluate_videos(self, model, process, args, device)
