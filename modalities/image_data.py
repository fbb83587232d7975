"""Image data sets: built-in coloured shapes (no download), MNIST-format idx files, image folders.

Every item is {"x": (C, H, W) float in [-1, 1], "label": int, "caption": str}.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from modalities.data import BadSample

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
PLACES = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "centre": (0.5, 0.5),
}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes for 16-bit grey PNG and TIFF
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def as_shown(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """A decoded file as the 8-bit picture a viewer shows: EXIF orientation applied (camera photos
    store it apart from the pixels), 16-bit grey scaled to the full 8-bit range (converting it to
    "L" directly clips everything above 255 to white), and transparency composited onto
    `background` (an RGB triple) instead of keeping whatever colour is stored under it.
    16-bit grey is taken as 0..65535, also in mode "I", where older Pillow puts 16-bit PNGs."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT:
        grey = np.asarray(image, dtype=np.float64) * (255 / 65535)
        return Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
    if image.mode in ALPHA or "transparency" in image.info:  # alpha channel, or a palette / key colour
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image


def to_pixels(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """PIL image -> (C, size, size) uint8 (centre crop to a square, then resize)."""
    image = image.convert("L" if channels == 1 else "RGB")
    return T.Compose([T.PILToTensor(), T.CenterCrop(min(image.size)), T.Resize(size, antialias=True)])(image)


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8 -> float32 in [-1, 1]."""
    channels = pixels.shape[0]
    return T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * channels, [0.5] * channels)])(pixels)


def to_tensor(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """PIL image -> (C, size, size) in [-1, 1] (centre crop to a square, then resize)."""
    return from_pixels(to_pixels(image, size, channels))


SHAPE_RADIUS = {True: 0.22, False: 0.13}  # big / small, as a share of the image side
BACKGROUND = (20, 20, 28)  # the shapes' dark background


def draw_shape(name: str, colour: str, centre, big: bool, size: int, channels: int = 3) -> torch.Tensor:
    """One shape of SHAPES in a colour of COLOURS on the dark background, as (C, size, size) in
    [-1, 1]. Image and video shapes are both drawn here, so a classifier of one recognises the other.

    Args:
        centre: (x, y) as shares of the image side; big: radius 0.22 rather than 0.13 of the side.
    """
    return from_pixels(shape_pixels(name, colour, centre, big, size, channels))


def shape_pixels(name: str, colour: str, centre, big: bool, size: int, channels: int = 3) -> torch.Tensor:
    """draw_shape's image as (C, size, size) uint8."""
    s = 4 * size  # draw large, then downsample for smooth edges
    image = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy = np.asarray(centre, dtype=float) * s
    r = SHAPE_RADIUS[big] * s
    fill = COLOURS[colour]
    box = [cx - r, cy - r, cx + r, cy + r]
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif name == "cross":
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:
        draw.ellipse(box, outline=fill, width=max(1, int(r / 3)))
    return to_pixels(image, size, channels)


class Shapes(Dataset):
    """Procedurally drawn coloured shapes on a dark background, labelled by shape kind and
    captioned like "a small red circle top left". Item i is the same on every machine.

    Drawing an item (Pillow at 4x the size, then an antialiased resize) costs about 0.4 ms at 32x32,
    some 7% of a CPU training step of a small DiT at batch 8; so each item is drawn once and kept, as
    uint8 pixels, while the whole split fits in KEEP_BYTES (the default 20,000 items at 32x32: 61 MB
    per process that reads them).

    Args:
        n: items in the split; seed: split seed (train and test differ by seed).
    """

    classes = SHAPES
    KEEP_BYTES = 256 * 2**20

    def __init__(self, n: int, size: int, channels: int = 3, seed: int = 0):
        self.n, self.size, self.channels, self.seed = n, size, channels, seed
        self.kept = {} if n * channels * size * size <= self.KEEP_BYTES else None

    def fingerprint(self) -> str:
        """What identifies the items (caches key on it): drawn from these numbers alone."""
        return f"shapes-v1-{self.n}-{self.size}-{self.channels}-{self.seed}"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.kept is not None and i in self.kept:
            pixels, kind, caption = self.kept[i]
            return {"x": from_pixels(pixels), "label": kind, "caption": caption}
        rng = np.random.default_rng([self.seed, i])
        kind = int(rng.integers(len(SHAPES)))
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        place = list(PLACES)[rng.integers(len(PLACES))]
        big = bool(rng.integers(2))
        centre = np.array(PLACES[place]) + rng.normal(0, 0.03, 2)
        caption = f"a {'large' if big else 'small'} {colour} {SHAPES[kind]} {place}"
        pixels = shape_pixels(SHAPES[kind], colour, centre, big, self.size, self.channels)
        if self.kept is not None:
            self.kept[i] = pixels, kind, caption
        return {"x": from_pixels(pixels), "label": kind, "caption": caption}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip or plain, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte idx file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise ValueError(f"{path}: cannot read as an idx file ({e})") from e


class MNIST(Dataset):
    """A set in MNIST's idx format in `root` (train-* and t10k-* files, gzip or not): MNIST itself or
    any other (Fashion-MNIST, KMNIST, ...).

    Args:
        classes: class names, label i named classes[i] (modality.classes). None: the lines of
            root/classes.txt if there is one, else the digits "0".."9". Captions name the class
            ("the digit 3" for the digits, the name itself otherwise).
    """

    DIGITS = tuple(str(d) for d in range(10))

    def __init__(self, root: str, split: str, size: int, channels: int = 1, classes: list[str] | None = None):
        prefix = "train" if split == "train" else "t10k"
        root = Path(root)
        found = {}
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            candidates = [root / f"{prefix}-{kind}.gz", root / f"{prefix}-{kind}"]
            path = next((p for p in candidates if p.exists()), None)
            if path is None:
                raise FileNotFoundError(f"MNIST file {candidates[0]} not found (set data.path to the folder)")
            found[kind] = (path, read_idx(path))
        (_, self.images), (labels_path, self.labels) = found["images-idx3-ubyte"], found["labels-idx1-ubyte"]
        if len(self.images) != len(self.labels):
            raise ValueError(f"{root}: {len(self.images)} images but {len(self.labels)} labels")
        self.size, self.channels = size, channels
        listing = root / "classes.txt"
        if classes is not None:
            self.classes, source = tuple(classes), "modality.classes"
        elif listing.exists():
            names = listing.read_text(encoding="utf-8-sig").splitlines()
            self.classes, source = tuple(n.strip() for n in names if n.strip()), str(listing)
        else:
            self.classes, source = self.DIGITS, "the default digit classes"
        top = int(self.labels.max()) if len(self.labels) else -1
        if top >= len(self.classes):
            raise ValueError(
                f"{labels_path} has labels up to {top} but {source} names {len(self.classes)} classes; "
                f"name one class per label 0..{top} (modality.classes=[...] or a classes.txt, one per line)"
            )
        self.caption = "the digit {}" if self.classes == self.DIGITS else "{}"

    def fingerprint(self) -> str:
        """A hash of the pixels, labels and class names (caches key on it)."""
        digest = hashlib.sha256(self.images.tobytes())
        digest.update(self.labels.tobytes())
        digest.update(json.dumps([self.classes, self.size, self.channels]).encode())
        return digest.hexdigest()[:16]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        label = int(self.labels[i])
        return {
            "x": to_tensor(Image.fromarray(self.images[i]), self.size, self.channels),
            "label": label,
            "caption": self.caption.format(self.classes[label]),
        }


class ImageFolder(Dataset):
    """Images in class sub-folders (root/<class>/*.png), or flat (one class), with optional
    captions in root/captions.jsonl ({"file": "<relative path>", "caption": "..."} per line).
    Files without an image extension are listed in `skipped`; files that fail to decode, or whose
    header claims more pixels than Pillow's decompression-bomb limit, raise BadSample when read.

    Args:
        background: RGB triple that transparent pixels are composited onto (see `as_shown`).
        classes: class names in the order of the labels (modality.classes), naming every sub-folder;
            None: the sorted sub-folder names.
        missing_caption: "empty" (an image without a line in captions.jsonl has the caption "") or
            "error" (such images are refused when listing, named, for models trained on captions).
    """

    def __init__(
        self, root: str, size: int, channels: int = 3, background=(255, 255, 255), classes=None, missing_caption="empty"
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist (data.path)")
        self.root, self.size, self.channels, self.background = root, size, channels, tuple(background)
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = tuple(p.name for p in subdirs) or ("all",)
        if classes is not None:  # the user's names and order; a split may lack some of the classes
            unnamed = sorted({p.name for p in subdirs} - set(classes))
            if unnamed:
                raise ValueError(f"{root}: class folders {unnamed} are not in modality.classes={list(classes)}")
            self.classes = tuple(classes)
        labels = [self.classes.index(p.name) for p in subdirs] or [0]
        self.items, self.skipped = [], []
        for label, folder in zip(labels, subdirs or [root]):
            for path in sorted(folder.rglob("*") if subdirs else folder.iterdir()):
                if not path.is_file() or path.name == "captions.jsonl":
                    continue
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.items.append((path, label))
                else:
                    self.skipped.append(f"{path}: not an image file extension")
        if not self.items:
            raise ValueError(f"image folder {root} holds no images ({sorted(IMAGE_EXTENSIONS)})")
        self.captions = {}
        captions = root / "captions.jsonl"
        if captions.exists():
            for n, line in enumerate(captions.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        self.captions[str(root / row["file"])] = str(row["caption"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{captions}:{n}: expected {{'file': ..., 'caption': ...}} ({e})") from e
        uncaptioned = [str(path) for path, _ in self.items if str(path) not in self.captions]
        if missing_caption == "error" and uncaptioned:
            raise ValueError(
                f"{len(uncaptioned)} of {len(self.items)} images in {root} have no caption in {captions} "
                f"(first: {uncaptioned[:3]}); add them, or set modality.missing_caption=empty to train them "
                "with the empty caption"
            )

    def fingerprint(self) -> str:
        """A hash of every file's path, size and modification time, and of the captions (caches key on it)."""
        files = [self.root / "captions.jsonl", *(path for path, _ in self.items)]
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists()]
        return hashlib.sha256(json.dumps([stats, self.classes, self.size, self.channels]).encode()).hexdigest()[:16]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as image:
                image.load()
                x = to_tensor(as_shown(image, self.background), self.size, self.channels)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            raise BadSample(path, f"cannot decode image ({type(e).__name__}: {e})") from e
        return {"x": x, "label": label, "caption": self.captions.get(str(path), "")}


def image_dataset(cfg, split: str, data_path, channels: int, background, missing_caption: str = "empty"):
    """The pixel data set that an image modality's config names (modality.dataset: shapes, mnist,
    moving_mnist (single frames of it) or folder, at modality.size) for `split` ("train" or "test")."""
    if cfg.dataset == "shapes":
        n = cfg.shapes_items if split == "train" else max(1, cfg.shapes_items // 10)
        return Shapes(n, cfg.size, channels, seed=0 if split == "train" else 1)
    if cfg.dataset == "mnist":
        return MNIST(data_path, split, cfg.size, channels, cfg.classes)
    if cfg.dataset == "moving_mnist":
        # imported here: video_data builds on this module (MNIST, the shapes)
        from modalities.video_data import MovingMNISTFrames

        return MovingMNISTFrames(data_path, split, cfg.size, channels, cfg.classes)
    root = Path(data_path)
    folder = root / split if (root / split).is_dir() else root
    return ImageFolder(folder, cfg.size, channels, background, cfg.classes, missing_caption)


DATASETS = ("shapes", "mnist", "moving_mnist", "folder")


def image_source(cfg, data_path) -> tuple[int, tuple[int, int, int]]:
    """Check the image data keys of a modality config (dataset, data.path, background) and return
    (channels, background RGB): channels is modality.channels, else 1 for the MNIST sets and 3 otherwise."""
    if cfg.dataset not in DATASETS:
        raise ValueError(f"modality.dataset={cfg.dataset!r}; choose one of {DATASETS}")
    if cfg.dataset != "shapes" and not data_path:
        raise ValueError(f"modality.dataset={cfg.dataset} needs data.path=<folder>")
    try:
        background = ImageColor.getrgb(cfg.background)[:3]
    except ValueError:
        raise ValueError(
            f"modality.background={cfg.background!r} is not a colour; use a name (white, black) or #rrggbb"
        ) from None
    return cfg.channels or (1 if cfg.dataset in ("mnist", "moving_mnist") else 3), background
