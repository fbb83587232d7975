"""Video data sets: built-in moving shapes (no download), Moving MNIST made on the fly from the
MNIST idx files, and folders of video files decoded with PyAV.

Every item is {"x": (C, T, H, W) float in [-1, 1], "label": int}.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from modalities.data import BadSample
from modalities.image_data import COLOURS, MNIST, SHAPE_RADIUS, SHAPES, draw_shape, to_tensor
from modalities.media import VIDEO_EXTENSIONS, decode_frames, probe_video


def bounce(start: np.ndarray, velocity: np.ndarray, lo: float, hi: float, frames: int) -> np.ndarray:
    """Positions of a point moving at constant velocity between two walls that reflect it.

    Args:
        start: (A,) position in [lo, hi]; velocity: (A,) per frame.
    Returns:
        (frames, A) positions: the unfolded path p0 + v t folded back into [lo, hi] (a triangle wave).
    """
    span = hi - lo
    unfolded = start - lo + np.arange(frames)[:, None] * velocity[None]  # (T, A)
    if span <= 0:
        return np.full_like(unfolded, lo)
    return lo + span - np.abs(np.mod(unfolded, 2 * span) - span)


class MovingShapes(Dataset):
    """One coloured shape per clip that keeps its kind, colour and velocity and bounces off the
    borders; labelled by shape kind. Frames are drawn by image_data.draw_shape, so the image
    shapes classifier recognises them. Item i is the same on every machine.

    Args:
        n: clips in the split; frames, size, channels: clip shape; seed: split seed.
        speed: distance per frame as a share of the side (directions are random).
    """

    classes = SHAPES

    def __init__(self, n: int, frames: int, size: int, channels: int = 3, seed: int = 0, speed: float = 0.06):
        self.n, self.frames, self.size, self.channels, self.seed, self.speed = n, frames, size, channels, seed, speed

    def fingerprint(self) -> str:
        """What identifies the clips (caches key on it): drawn from these numbers alone."""
        return f"moving-shapes-v1-{self.n}-{self.frames}-{self.size}-{self.channels}-{self.seed}-{self.speed}"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        kind = int(rng.integers(len(SHAPES)))
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        big = bool(rng.integers(2))
        r = SHAPE_RADIUS[big]
        start = rng.uniform(r, 1 - r, 2)
        angle = rng.uniform(0, 2 * np.pi)
        velocity = self.speed * np.array([np.cos(angle), np.sin(angle)])
        path = bounce(start, velocity, r, 1 - r, self.frames)  # (T, 2) centres
        x = torch.stack([draw_shape(SHAPES[kind], colour, c, big, self.size, self.channels) for c in path], dim=1)
        return {"x": x, "label": kind}  # (C, T, H, W)


class MovingMNIST(Dataset):
    """Moving MNIST (Srivastava et al. 2015) made on the fly: `digits` MNIST digits of side size/2
    start at random places with random directions at `speed` pixels per frame and bounce off the
    borders; overlapping digits combine by maximum. Labelled by the first digit's class. Clip i
    uses MNIST image i of the split (train or t10k) as its first digit; the rest is drawn from a
    generator seeded by (split, i), so clip i is the same on every machine.
    """

    def __init__(
        self, root, split: str, frames: int, size: int, channels: int = 1, digits: int = 1, speed=2.0, classes=None
    ):
        self.mnist = MNIST(root, split, size=28, classes=classes)  # classes: as the image mnist data set takes them
        self.classes = self.mnist.classes
        self.frames, self.size, self.channels, self.digits, self.speed = frames, size, channels, digits, speed
        self.seed = 0 if split == "train" else 1
        self.side = size // 2

    def fingerprint(self) -> str:
        """The digits' fingerprint and the numbers that place and move them (caches key on it)."""
        shape = [self.frames, self.size, self.channels, self.digits, self.speed, self.seed]
        return f"moving-mnist-v1-{self.mnist.fingerprint()}-" + "-".join(map(str, shape))

    def __len__(self):
        return len(self.mnist)

    def digit(self, index: int) -> np.ndarray:
        """MNIST image `index` resized to (side, side), float in [0, 1]."""
        image = Image.fromarray(self.mnist.images[index]).resize((self.side, self.side), Image.BILINEAR)
        return np.asarray(image, dtype=np.float32) / 255

    def paths(self, i: int) -> list[np.ndarray]:
        """Top-left corners (T, 2) as (x, y) in pixels of each digit of clip i."""
        rng = np.random.default_rng([self.seed, i])
        out = []
        for _ in range(self.digits):
            angle = rng.uniform(0, 2 * np.pi)
            velocity = self.speed * np.array([np.cos(angle), np.sin(angle)])
            start = rng.uniform(0, self.size - self.side, 2)
            out.append(bounce(start, velocity, 0, self.size - self.side, self.frames))
        return out

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i, 1])
        indices = [i, *rng.integers(len(self.mnist), size=self.digits - 1)]
        canvas = np.zeros((self.frames, self.size, self.size), dtype=np.float32)
        for index, path in zip(indices, self.paths(i)):
            glyph = self.digit(int(index))
            for t, (x, y) in enumerate(np.rint(path).astype(int)):
                window = canvas[t, y : y + self.side, x : x + self.side]
                np.maximum(window, glyph, out=window)
        x = torch.from_numpy(canvas * 2 - 1)[None].expand(self.channels, -1, -1, -1).contiguous()
        return {"x": x, "label": int(self.mnist.labels[i])}  # (C, T, H, W)


class MovingMNISTFrames(Dataset):
    """Single frames of Moving MNIST as images (C, H, W): digit i of the split at the random place
    where clip i starts. The frames a video VAE learns to encode (modality=image_vae
    modality.dataset=moving_mnist): every place on the canvas, as frames of moving clips cover it."""

    def __init__(self, root, split: str, size: int, channels: int = 1, classes=None):
        self.clips = MovingMNIST(root, split, 1, size, channels, classes=classes)
        self.classes = self.clips.classes

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        item = self.clips[i]
        return {"x": item["x"][:, 0], "label": item["label"]}  # (C, H, W)


def cache_dir() -> Path:
    """Where indexes and trained classifiers are kept: $POLYDIFF_CACHE, else ~/.cache/polydiff."""
    return Path(os.environ.get("POLYDIFF_CACHE") or Path.home() / ".cache" / "polydiff")


class VideoFolder(Dataset):
    """Video files in class sub-folders (root/<class>/*.mp4), or flat (one class), cut into clips
    of `frames` decoded frames taken every `stride`-th, resized and centre-cropped to size x size.

    Each file is decoded once to index its decodable frames and their timestamps (containers'
    frame counts and rates are not trusted); the index is cached as JSON under the cache folder
    and redone only for files whose size or modification time changed. A file gives
    floor(decodable / span) non-overlapping clips, span = (frames - 1) * stride + 1 frames;
    reading a clip seeks to the key frame before its first frame's timestamp and decodes
    forward. Files that cannot be opened or are shorter than one clip are listed in `skipped`.
    """

    def __init__(self, root: str, frames: int, size: int, channels: int = 3, stride: int = 1):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"video folder {root} does not exist (data.path)")
        self.frames, self.size, self.channels, self.stride = frames, size, channels, stride
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        self.classes = tuple(p.name for p in subdirs) or ("all",)
        files, self.skipped = [], []
        for label, folder in enumerate(subdirs or [root]):
            for path in sorted(folder.rglob("*") if subdirs else folder.iterdir()):
                if not path.is_file():
                    continue
                if path.suffix.lower() in VIDEO_EXTENSIONS:
                    files.append((path, label))
                else:
                    self.skipped.append(f"{path}: not a video file extension")
        index = self.index(root, [p for p, _ in files])
        span = (frames - 1) * stride + 1
        self.items = []  # (path, label, start time in seconds of the clip's first frame)
        for path, label in files:
            entry = index[str(path.resolve())]
            if "error" in entry:
                self.skipped.append(f"{path}: {entry['error']}")
            elif len(entry["times"]) < span:
                self.skipped.append(
                    f"{path}: {len(entry['times'])} decodable frames, a clip needs {span} "
                    f"(modality.frames={frames}, modality.stride={stride})"
                )
            else:
                times = sorted(entry["times"])  # presentation order; decode order may differ (B-frames)
                self.items += [(path, label, times[s]) for s in range(0, len(times) - span + 1, span)]
        if not self.items:
            raise ValueError(f"video folder {root} holds no usable clips; skipped: {self.skipped[:5]}")
        entries = [(str(path), index[str(path.resolve())]) for path, _ in files]
        self.stamps = [(path, entry.get("size"), entry.get("mtime")) for path, entry in entries]

    def fingerprint(self) -> str:
        """A hash of every file's path, size and modification time and of the clip shape (caches key on it)."""
        shape = [self.classes, self.frames, self.size, self.channels, self.stride]
        return hashlib.sha256(json.dumps([self.stamps, shape]).encode()).hexdigest()[:16]

    @staticmethod
    def index(root: Path, paths: list[Path]) -> dict:
        """{resolved path: probe_video's dict, or {"error": reason}} for every file, from the cache
        where the file's size and mtime are unchanged."""
        cache = cache_dir() / f"video-index-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        index, changed = {}, False
        for path in tqdm(paths, desc=f"indexing {root}", disable=len(paths) < 20):
            stat = path.stat()
            key, stamp = str(path.resolve()), {"size": stat.st_size, "mtime": stat.st_mtime}
            entry = known.get(key)
            if entry is None or {k: entry.get(k) for k in stamp} != stamp:
                try:
                    entry = {**stamp, **probe_video(path)}
                except BadSample as e:
                    entry = {**stamp, "error": e.reason}
                changed = True
            index[key] = entry
        if changed:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")  # renamed into place: never a half-written index
            tmp.write_text(json.dumps(index))
            os.replace(tmp, cache)
        return index

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label, start = self.items[i]
        images = decode_frames(path, start, self.frames, self.stride)
        try:
            x = torch.stack([to_tensor(image, self.size, self.channels) for image in images], dim=1)
        except (OSError, ValueError) as e:
            raise BadSample(path, f"cannot convert frames ({type(e).__name__}: {e})") from e
        return {"x": x, "label": label}  # (C, T, H, W)
