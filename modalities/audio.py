"""Audio as log-mel spectrograms: fixed-length clips, 2-D (mel, time) patch tokens, class-conditional,
turned back into waveforms by Griffin-Lim and saved as WAV files plus a spectrogram PNG."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchaudio.transforms as T
from einops import rearrange

from modalities.audio_data import AudioFolder, Tones
from modalities.audio_metrics import Spectrograms, evaluate_audio
from modalities.audio_plot import save_spectrograms
from modalities.base import DiffusionConfig, Modality, ModalityConfig, label_cond
from modalities.data import BadSample
from modalities.media import write_wav

STATS_ITEMS = 512  # training clips the per-mel-bin statistics are estimated from


@dataclass
class AudioConfig(ModalityConfig):
    name: str = "audio"
    process: str = "gaussian"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dataset: str = "tones"  # tones (built in) | folder (audio files under data.path)
    sample_rate: int = 8000  # Hz; files at other rates are resampled
    seconds: float = 1.0  # clip length: longer recordings are cropped, shorter ones padded with silence
    n_fft: int = 256
    hop: int = 125  # 8000 Hz / 125 = 64 frames a second, a multiple of every patch size
    n_mels: int = 32
    log_floor: float = 1e-5  # log(max(mel, floor)): silence ends at log(floor), not -inf
    griffin_lim_iters: int = 32
    conditional: bool = True  # train and sample with class labels (classifier-free guidance)
    labels: str = "prefix"  # folder: prefix (FSDD's 7_jackson_12.wav is class 7) | folder (class sub-folders)
    test_speakers: list[str] = field(default_factory=list)  # held-out speakers; empty: the last one in sorted order
    test_share: float = 0.1  # held-out share of files when the file names name no speakers
    tones_items: int = 4000  # size of the built-in tones training split (test: a tenth)
    classes: list[str] | None = None  # filled from the data at the start of training
    mel_mean: list[float] | None = None  # filled: per-mel-bin mean of the training log-mels
    mel_std: list[float] | None = None  # filled: per-mel-bin standard deviation


class Audio(Modality):
    Config = AudioConfig
    grid_axes = 2
    requests = ("label",)
    DATASETS = ("tones", "folder")

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        if cfg.dataset not in self.DATASETS:
            raise ValueError(f"modality.dataset={cfg.dataset!r}; choose one of {self.DATASETS}")
        if cfg.dataset == "folder" and not self.data_path:
            raise ValueError("modality.dataset=folder needs data.path=<folder of audio files>")
        self.length = round(cfg.seconds * cfg.sample_rate)  # samples per clip
        self.frames = self.length // cfg.hop  # the centred STFT's last frame is dropped: frames = length / hop
        self.mel = T.MelSpectrogram(
            cfg.sample_rate,
            cfg.n_fft,
            hop_length=cfg.hop,
            n_mels=cfg.n_mels,
            power=1.0,
            norm="slaney",
            mel_scale="slaney",
        )
        self.inverse_mel = T.InverseMelScale(
            cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate, norm="slaney", mel_scale="slaney"
        )
        # rand_init=False starts from zero phase, so a decoded sample is a function of x0 alone
        self.griffin_lim = T.GriffinLim(
            cfg.n_fft, cfg.griffin_lim_iters, hop_length=cfg.hop, power=1.0, length=self.length, rand_init=False
        )

    def check(self, backbone):
        cfg, p = self.cfg, backbone.patch
        fixes = []
        if self.frames % p:
            seconds = math.ceil(self.frames / p) * p * cfg.hop / cfg.sample_rate
            fixes.append(f"modality.seconds={seconds:g}")
        if cfg.n_mels % p:
            fixes.append(f"modality.n_mels={math.ceil(cfg.n_mels / p) * p}")
        if fixes:
            ok = [q for q in (1, 2, 4, 8) if cfg.n_mels % q == 0 and self.frames % q == 0]
            raise ValueError(
                f"backbone.patch={p} must divide modality.n_mels={cfg.n_mels} and the {self.frames} frames of "
                f"modality.seconds={cfg.seconds} (sample_rate={cfg.sample_rate}, hop={cfg.hop}); use backbone.patch "
                f"in {ok}, or {' and '.join(fixes)}"
            )

    # --- data ---------------------------------------------------------------------------
    def dataset(self, split: str):
        cfg = self.cfg
        if cfg.dataset == "tones":
            n = cfg.tones_items if split == "train" else max(1, cfg.tones_items // 10)
            return Tones(n, cfg.sample_rate, self.length, seed=0 if split == "train" else 1)
        return AudioFolder(
            self.data_path,
            split,
            cfg.sample_rate,
            self.length,
            cfg.labels,
            list(cfg.test_speakers),
            cfg.test_share,
        )

    def classifier_data(self, split: str):
        return Spectrograms(self, self.dataset(split))

    def classifier_key(self) -> dict:
        keys = ("sample_rate", "seconds", "n_fft", "hop", "n_mels", "log_floor", "labels", "test_share")
        # lists as plain lists for JSON; the classifier reads normalised log-mels, so the statistics count
        lists = {k: list(self.cfg[k]) for k in ("test_speakers", "mel_mean", "mel_std")}
        return {**super().classifier_key(), **{k: self.cfg[k] for k in keys}, **lists}

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) waveforms -> (B, n_mels, frames) log-mel magnitudes (natural log, floored)."""
        mel = self.mel.to(waveform.device)(waveform.float())[..., : self.frames]
        return mel.clamp(min=self.cfg.log_floor).log()

    def resolve(self, train_set) -> dict:
        """The classes and per-mel-bin mean and standard deviation of the training log-mels,
        estimated from up to STATS_ITEMS clips spread evenly over the training set."""
        step = max(1, len(train_set) // STATS_ITEMS)
        clips = []
        for i in range(0, len(train_set), step):
            try:
                clips.append(train_set[i]["x"])
            except BadSample:  # counted when the trainer reads it; the statistics just do without it
                continue
        if not clips:
            raise ValueError("no readable training clip to estimate the spectrogram statistics from")
        log_mel = self.log_mel(torch.stack(clips))  # (N, n_mels, frames)
        return {
            "classes": list(train_set.classes),
            "mel_mean": log_mel.mean(dim=(0, 2)).tolist(),
            "mel_std": log_mel.std(dim=(0, 2)).clamp(min=1e-3).tolist(),
        }

    def _stats(self, device):
        if self.cfg.mel_mean is None or self.cfg.mel_std is None:
            raise ValueError("modality.mel_mean/mel_std are unset: they come from the training data (resolve)")
        mean = torch.tensor(list(self.cfg.mel_mean), device=device)[:, None]
        std = torch.tensor(list(self.cfg.mel_std), device=device)[:, None]
        return mean, std  # (n_mels, 1) each

    def encode(self, batch, generator=None):
        """{"x": (B, samples) waveforms} -> x0 (B, 1, n_mels, frames), the log-mel normalised per mel bin."""
        mean, std = self._stats(batch["x"].device)
        return ((self.log_mel(batch["x"]) - mean) / std).unsqueeze(1)

    def cond(self, batch):
        return {"label": batch["label"]} if self.cfg.conditional else {}

    def decode(self, x0, model=None, **request):
        """x0 (B, 1, n_mels, frames) -> (B, samples) waveforms in [-1, 1], by least-squares inversion
        of the mel filters and Griffin-Lim phase recovery (Griffin & Lim 1984)."""
        mean, std = self._stats(x0.device)
        log_mel = x0.float().squeeze(1) * std + mean
        mel = log_mel.clamp(max=math.log(1e3)).exp()  # a wild sample must not overflow the inversion
        mel = torch.cat([mel, mel[..., -1:]], dim=-1)  # restore the dropped last frame of the centred STFT
        magnitude = self.inverse_mel.to(x0.device)(mel)  # (B, n_fft/2 + 1, frames + 1)
        waveform = self.griffin_lim.to(x0.device)(magnitude)
        return waveform.clamp(-1, 1).cpu()

    def save(self, samples, path, **request):
        """One 16-bit WAV per clip and spectrograms.png (their log-mels in a labelled grid) in the
        folder `path`; returns the folder."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, waveform in enumerate(samples):
            names.append(f"{i:03d}.wav")
            write_wav(folder / names[-1], waveform, self.cfg.sample_rate)
        save_spectrograms(self.log_mel(samples.float()), names, self.cfg, folder / "spectrograms.png")
        return str(folder)

    # --- tokens -------------------------------------------------------------------------
    def backbone_kwargs(self):
        dim = self.patch * self.patch
        return {"in_dim": dim, "out_dim": dim, "num_classes": len(self.classes) if self.cfg.conditional else 0}

    def to_tokens(self, x):
        """(B, 1, n_mels, frames) -> tokens (B, N, p*p) and (mel, time) patch positions (N, 2)."""
        tokens = rearrange(x, "b c (m p1) (f p2) -> b (m f) (p1 p2 c)", p1=self.patch, p2=self.patch)
        m, f = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        ms, fs = torch.meshgrid(torch.arange(m, device=x.device), torch.arange(f, device=x.device), indexing="ij")
        return tokens, torch.stack([ms, fs], dim=-1).reshape(-1, 2)

    def from_tokens(self, tokens, shape):
        m, f = shape[-2] // self.patch, shape[-1] // self.patch
        return rearrange(tokens, "b (m f) (p1 p2 c) -> b c (m p1) (f p2)", m=m, f=f, p1=self.patch, p2=self.patch)

    # --- sampling -----------------------------------------------------------------------
    def sample_shape(self, n):
        return (n, 1, self.cfg.n_mels, self.frames)

    def sample_cond(self, n, device, label=None, **request):
        return label_cond(self.cfg, self.classes if self.cfg.conditional else [], n, device, label)

    def evaluate(self, model, process, args, device, reference=None):
        """Classifier label agreement, Fréchet distance and Griffin-Lim round trip (modalities/audio_metrics.py)."""
        return evaluate_audio(self, model, process, args, device)
