"""The spectrogram grid that audio sampling writes beside its WAV files."""

from __future__ import annotations

import math


def save_spectrograms(log_mel, names: list[str], cfg, path) -> None:
    """Draw log-mel spectrograms in a grid, each titled with its WAV file's name.

    Args:
        log_mel: (B, n_mels, frames) natural-log mel magnitudes.
        names: B titles (the clips' file names).
        cfg: the audio modality config (sample_rate and hop give the time axis in seconds).
        path: the PNG to write.
    """
    import matplotlib  # here, as in train/plots.py: matplotlib costs every start-up, and only sampling draws

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    n = len(log_mel)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    seconds = log_mel.shape[-1] * cfg.hop / cfg.sample_rate
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.8 * rows), squeeze=False, constrained_layout=True)
    low, high = float(log_mel.min()), float(log_mel.max())  # one colour scale, so loudness compares across clips
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(
            log_mel[i].cpu().numpy(),
            origin="lower",
            aspect="auto",
            vmin=low,
            vmax=high,
            extent=(0, seconds, 0, cfg.n_mels),
        )
        ax.set_title(names[i], fontsize=8)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("mel bin", fontsize=7)
        if i >= (rows - 1) * cols:
            ax.set_xlabel("seconds", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
