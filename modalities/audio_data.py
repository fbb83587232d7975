"""Audio data sets: built-in synthetic tones (no download) and folders of audio files.

Every item is {"x": (samples,) float waveform in [-1, 1] at the model's rate and clip length,
"label": int}. Longer recordings are cropped (at random in training, centred in the test split),
shorter ones padded with silence at the end.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from modalities.media import AUDIO_EXTENSIONS, read_audio

TONES = ("sine", "square", "chirp", "plucked")


def fit_length(waveform: torch.Tensor, length: int, random_crop: bool) -> torch.Tensor:
    """Crop or pad a (samples,) waveform to `length` samples.

    Args:
        waveform: (samples,) float.
        length: samples of the result.
        random_crop: crop at a random offset (training) rather than the centre (test).
    Returns:
        (length,) float; shorter recordings end in silence.
    """
    extra = waveform.shape[0] - length
    if extra <= 0:
        return torch.nn.functional.pad(waveform, (0, -extra))
    start = int(torch.randint(extra + 1, ())) if random_crop else extra // 2
    return waveform[start : start + length]


class Tones(Dataset):
    """Synthetic one-note clips a listener tells apart by timbre: a sine, a square wave, a rising
    chirp and a plucked string (decaying harmonics), at a random pitch (110..880 Hz) under a random
    attack/decay envelope. Item i is the same on every machine.

    Args:
        n: items in the split; sample_rate: Hz; length: samples per clip; seed: split seed.
    """

    classes = TONES

    def __init__(self, n: int, sample_rate: int, length: int, seed: int = 0):
        self.n, self.sample_rate, self.length, self.seed = n, sample_rate, length, seed
        self.skipped: list[str] = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        kind = int(rng.integers(len(TONES)))
        t = np.arange(self.length) / self.sample_rate
        f0 = 110 * 2 ** rng.uniform(0, 3)  # three octaves above A2
        phase = 2 * np.pi * f0 * t
        name = TONES[kind]
        if name == "sine":
            wave = np.sin(phase)
        elif name == "square":
            wave = 0.6 * np.sign(np.sin(phase))
        elif name == "chirp":  # the frequency doubles over the clip: phase = 2 pi f0 T (2^(t/T) - 1) / ln 2
            duration = t[-1] + 1 / self.sample_rate
            wave = np.sin(2 * np.pi * f0 * duration * (2 ** (t / duration) - 1) / np.log(2))
        else:  # plucked: harmonics whose amplitude falls with their number and decays faster when higher
            wave = sum(np.sin(k * phase) * np.exp(-k * t * 6) / k for k in range(1, 8 + 1))
        start = rng.uniform(0, 0.3) * t[-1]
        attack, decay = rng.uniform(0.005, 0.1), rng.uniform(0.2, 2.0)
        since = np.clip(t - start, 0, None)
        envelope = np.where(t < start, 0.0, np.minimum(since / attack, 1.0) * np.exp(-since / decay))
        amplitude = rng.uniform(0.3, 0.9)
        x = amplitude * envelope * wave / max(np.abs(wave).max(), 1e-8)
        return {"x": torch.from_numpy(x.astype(np.float32)), "label": kind}


def speaker(path: Path) -> str | None:
    """The speaker of a Free Spoken Digit Dataset style name `<label>_<speaker>_<take>`, else None."""
    parts = path.stem.split("_")
    return parts[1] if len(parts) == 3 else None


class AudioFolder(Dataset):
    """Audio files (wav, flac, mp3, ogg, m4a) under `root`, labelled by class sub-folder
    (labels="folder": root/<class>/*.wav) or by the file-name prefix before the first "_"
    (labels="prefix": FSDD's `7_jackson_12.wav` is class 7).

    The test split holds out whole speakers when every file names one (`<label>_<speaker>_<take>`):
    `test_speakers`, or the last speaker in sorted order when empty. Otherwise a fixed `test_share`
    of files, chosen by a hash of their relative path so that the split never changes.

    Empty files and files without an audio extension are listed in `skipped`; files that fail to
    decode raise BadSample when read.
    """

    LABELS = ("folder", "prefix")

    def __init__(
        self,
        root: str,
        split: str,
        sample_rate: int,
        length: int,
        labels: str = "prefix",
        test_speakers: list[str] | None = None,
        test_share: float = 0.1,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"audio folder {root} does not exist (data.path)")
        if labels not in self.LABELS:
            raise ValueError(f"modality.labels={labels!r}; choose one of {self.LABELS}")
        self.sample_rate, self.length, self.random_crop = sample_rate, length, split == "train"
        found, self.skipped = [], []
        for path in sorted(root.rglob("*")):
            if not path.is_file():
                continue
            if path.suffix.lower() not in AUDIO_EXTENSIONS:
                self.skipped.append(f"{path}: not an audio file extension ({sorted(AUDIO_EXTENSIONS)})")
            elif path.stat().st_size == 0:
                self.skipped.append(f"{path}: empty file")
            elif labels == "folder" and path.parent == root:
                self.skipped.append(f"{path}: not in a class sub-folder (modality.labels=folder)")
            else:
                found.append((path, path.parent.name if labels == "folder" else path.stem.split("_")[0]))
        if not found:
            raise ValueError(f"audio folder {root} holds no audio files ({sorted(AUDIO_EXTENSIONS)})")
        names = {name for _, name in found}
        # numeric prefixes sort as numbers, so FSDD's class i is the digit i
        self.classes = tuple(sorted(names, key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s)))
        speakers = [speaker(path) for path, _ in found]
        if all(speakers):
            held_out = set(test_speakers or [sorted(set(speakers))[-1]])
            unknown = held_out - set(speakers)
            if unknown:
                raise ValueError(
                    f"modality.test_speakers={sorted(unknown)} not in {root}; speakers: {sorted(set(speakers))}"
                )
            in_test = [s in held_out for s in speakers]
        else:
            in_test = [_unit_hash(path.relative_to(root)) < test_share for path, _ in found]
        self.items = [
            (path, self.classes.index(name)) for (path, name), test in zip(found, in_test) if test == (split == "test")
        ]
        if not self.items:
            raise ValueError(f"audio folder {root}: the {split} split is empty (modality.test_speakers / test_share)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        waveform = read_audio(path, self.sample_rate)
        return {"x": fit_length(waveform, self.length, self.random_crop), "label": label}


def _unit_hash(name) -> float:
    """A stable number in [0, 1) for a file name (the same split on every machine and run)."""
    return int(hashlib.sha256(str(name).encode()).hexdigest()[:8], 16) / 16**8
