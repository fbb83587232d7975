"""Pictures of a run: the loss curve."""

from __future__ import annotations

from pathlib import Path


def plot_losses(losses: list[tuple[int, float]], path: Path):
    """Save a loss-against-step plot (log scale) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import csv

    import matplotlib.pyplot as plt

    if (path.parent / "loss.csv").exists():  # the whole run, across resumes
        with open(path.parent / "loss.csv") as f:
            rows = {int(step): float(value) for step, value in csv.reader(f)}  # a resumed step: last value
        losses = sorted(rows.items())
    steps, values = zip(*losses)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, values, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
