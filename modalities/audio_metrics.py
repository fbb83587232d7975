"""Audio quality metrics: Griffin-Lim round-trip distances on real clips, and sample quality through
the shared spectrogram classifier (label agreement and a Fréchet distance of its features, an
FAD-like figure that needs no download; see modalities/image_metrics.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from modalities.data import BadSample
from modalities.image_metrics import evaluate_with_classifier

CLASSIFIER_EPOCHS = 5  # a few thousand short clips: more passes than MNIST's one are cheap and needed
RESOLUTIONS = ((512, 128), (256, 64), (128, 32))  # (n_fft, hop) of the multi-resolution STFT distance


class Spectrograms(Dataset):
    """An audio data set seen as the classifier's images: {"x": (1, n_mels, frames) normalised
    log-mel, "label": int}, with the same `classes` and `skipped`."""

    def __init__(self, modality, dataset):
        self.modality, self.dataset = modality, dataset
        self.classes, self.skipped = dataset.classes, list(getattr(dataset, "skipped", []))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return {"x": self.modality.encode({"x": item["x"][None]})[0], "label": item["label"]}


def _stft_magnitude(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    window = torch.hann_window(n_fft, device=x.device)
    return torch.stft(x, n_fft, hop, window=window, return_complex=True).abs()  # (B, n_fft/2 + 1, frames)


def _floored_log10(power: torch.Tensor, top_db: float) -> torch.Tensor:
    """log10 of (B, F, frames) powers floored `top_db` below each clip's peak (librosa's top_db):
    without a floor the exact zeros of padded silence would dominate any log distance."""
    return power.clamp(min=1e-20).maximum(power.amax(dim=(1, 2), keepdim=True) * 10 ** (-top_db / 10)).log10()


def log_spectral_distance(x: torch.Tensor, y: torch.Tensor, n_fft: int = 256, hop: int = 64, top_db: float = 80):
    """Log-spectral distance in dB: per frame, the RMS over frequencies of 10 log10 of the power
    ratio, averaged over frames (Gray & Markel 1976); powers floored `top_db` below each clip's peak.

    Args:
        x, y: (B, samples) waveforms (reference and reconstruction).
    Returns:
        (B,) distances in dB.
    """
    px, py = _stft_magnitude(x, n_fft, hop) ** 2, _stft_magnitude(y, n_fft, hop) ** 2
    diff = 10 * (_floored_log10(px, top_db) - _floored_log10(py, top_db))
    return diff.pow(2).mean(dim=1).sqrt().mean(dim=1)


def multi_resolution_stft_distance(x, y, resolutions=RESOLUTIONS, top_db: float = 80) -> torch.Tensor:
    """Multi-resolution STFT distance (Yamamoto et al. 2020, Parallel WaveGAN, eq. 4-6): spectral
    convergence plus the L1 distance of log magnitudes (floored `top_db` below each clip's peak),
    averaged over STFT resolutions.

    Args:
        x, y: (B, samples) waveforms (reference and reconstruction).
    Returns:
        (B,) distances.
    """
    total = 0
    for n_fft, hop in resolutions:
        mx, my = _stft_magnitude(x, n_fft, hop), _stft_magnitude(y, n_fft, hop)
        convergence = (mx - my).flatten(1).norm(dim=1) / mx.flatten(1).norm(dim=1).clamp(min=1e-8)
        # log10 of powers / 2 = log10 of magnitudes; natural log as in the paper
        log_mx, log_my = (_floored_log10(m**2, top_db) * (np.log(10) / 2) for m in (mx, my))
        total = total + convergence + (log_mx - log_my).abs().flatten(1).mean(dim=1)
    return total / len(resolutions)


@torch.no_grad()
def griffin_lim_roundtrip(modality, waveforms: torch.Tensor) -> dict:
    """Encode real clips to the model's normalised log-mel and decode them back (mel inversion and
    Griffin-Lim): how far the vocoder alone is from the original, a floor for every sample.

    Args:
        modality: an Audio modality with its statistics resolved.
        waveforms: (B, samples) real clips at the modality's rate and length.
    Returns:
        {"log_spectral_distance_db", "mr_stft_distance"} means over the clips, and "clips".
    """
    reconstruction = modality.decode(modality.encode({"x": waveforms}))
    return {
        "log_spectral_distance_db": log_spectral_distance(waveforms, reconstruction).mean().item(),
        "mr_stft_distance": multi_resolution_stft_distance(waveforms, reconstruction).mean().item(),
        "clips": len(waveforms),
    }


def readable_clips(dataset, n: int) -> torch.Tensor:
    """The first n readable clips of an audio data set (unreadable ones skipped): (n', samples)."""
    clips = []
    for i in range(len(dataset)):
        if len(clips) == n:
            break
        try:
            clips.append(dataset[i]["x"])
        except BadSample:
            continue
    return torch.stack(clips)


@torch.no_grad()
def evaluate_audio(modality, model, process, args, device) -> dict:
    """Sample `args.n` clips (labels cycling through the classes), decode them to waveforms and
    score their log-mels with the spectrogram classifier (modalities/image_metrics.py): returns
    {"classifier_test_accuracy", "frechet_distance", "n_samples"}, "label_agreement" for
    class-conditional models, and the Griffin-Lim round-trip distances of held-out clips."""

    def as_heard(x0):  # the decoded waveform's log-mel, Griffin-Lim artefacts included
        return modality.encode({"x": modality.decode(x0).to(device)})

    result = evaluate_with_classifier(modality, model, process, args, device, as_heard, epochs=CLASSIFIER_EPOCHS)
    roundtrip = griffin_lim_roundtrip(modality, readable_clips(modality.dataset("test"), 64).to(device))
    result.update({f"roundtrip_{k}": v for k, v in roundtrip.items() if k != "clips"})
    return result
