"""How the Moving-MNIST frame metrics stand up to what generated frames add around the digit.

Video evaluation (modalities/video_metrics.py) reads each frame through a window centred on the
digit and resized for the MNIST classifier. Real test clips are perturbed the ways samples differ
from data (an uneven faint haze, Gaussian noise, stray bright specks) and scored as samples are:
per-frame label agreement, identity consistency, motion per frame, and how far the window's centre
moved from where it is on the clean clip. With --vae, real clips also go through that VAE and back
(encode each frame to its latent mean, decode): what a latent video model's samples can score at
best. Two ways of finding the digit are compared:

- ink: `centroids`, what evaluation uses: pixels above a fifth of the frame's range, within the
  half-frame square that holds most of them;
- plain: the intensity centroid above the frame's darkest pixel, what evaluation used before
  2026-12-05 (kept here as the baseline).

    python bench/video_window.py --data data/mnist --clips 1000
    python bench/video_window.py --data data/mnist --clips 1000 --vae runs/mmvae/checkpoints/last
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from einops import rearrange
from omegaconf import OmegaConf

from modalities.image_metrics import get_classifier
from modalities.latents import LatentCodec
from modalities.video import Video, VideoConfig
from modalities.video_metrics import centroids, classify, displacements


def plain_centroids(frames: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """The intensity centroid above each frame's darkest pixel, (N, C, H, W) -> (N, 2) as (x, y)."""
    gray = frames.float().mean(1)
    weight = (gray - gray.amin(dim=(1, 2), keepdim=True)).clamp(min=0) + 1e-8
    ys, xs = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in gray.shape[1:]), indexing="ij")
    total = weight.sum(dim=(1, 2))
    return torch.stack([(weight * xs).sum(dim=(1, 2)) / total, (weight * ys).sum(dim=(1, 2)) / total], dim=-1)


WINDOWS = {"ink": centroids, "plain": plain_centroids}


def perturbations(seed: int, vae: str | None = None) -> dict:
    """name -> clips in [0, 1] -> perturbed clips in [0, 1], each with its own seeded noise; with
    `vae` (a diffusers AutoencoderKL folder) also the clips' round trip through it, frame by frame."""

    def noise(x):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))

    def specks(x, share):
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) < share

    table = {
        "clean": lambda x: x,
        "haze, abs N(0, 0.02)": lambda x: (x + noise(x).abs() * 0.02).clamp(0, 1),
        "haze, abs N(0, 0.05)": lambda x: (x + noise(x).abs() * 0.05).clamp(0, 1),
        "noise N(0, 0.1)": lambda x: (x + noise(x) * 0.1).clamp(0, 1),
        "specks, 1% of pixels white": lambda x: torch.maximum(x, specks(x, 0.01).float()),
    }
    if vae:
        codec = LatentCodec(vae)

        def round_trip(x):  # in batches: a thousand 8-frame clips at once would hold gigabytes of activations
            out = [codec.decode(codec.encode(part * 2 - 1)) for part in x.split(64)]
            return ((torch.cat(out) + 1) / 2).clamp(0, 1)

        table[f"VAE round trip ({Path(vae).name})"] = round_trip
    return table


def real_clips(data: str, clips: int, frames: int, size: int):
    """The Video modality on Moving MNIST and its first `clips` test clips in [0, 1] with labels."""
    keys = {"dataset": "moving_mnist", "frames": frames, "size": size}
    video = Video(
        OmegaConf.merge(OmegaConf.structured(VideoConfig), keys),
        2,
        OmegaConf.create({"path": data, "bad_threshold": 0.01}),
    )
    test = video.dataset("test")
    items = [test[i] for i in range(min(clips, len(test)))]
    x = torch.stack([(item["x"] + 1) / 2 for item in items])
    return video, x, torch.tensor([item["label"] for item in items])


@torch.no_grad()
def window_table(data: str, clips: int = 1000, frames: int = 8, size: int = 32, seed: int = 0, device="cpu", vae=None):
    """One row per (perturbation, window): agreement, identity, motion and centre shift."""
    video, x, labels = real_clips(data, clips, frames, size)
    classifier, accuracy = get_classifier(video.frame_modality(), device)
    rows = []
    for name, perturb in perturbations(seed, vae).items():
        noisy = perturb(x)
        for window, locate in WINDOWS.items():
            _, pred = classify(classifier, noisy, "moving_mnist", device, locate=locate)
            moves = displacements(noisy, locate)
            flat = [rearrange(c, "b c t h w -> (b t) c h w") for c in (x, noisy)]
            shift = (locate(flat[1]) - locate(flat[0])).norm(dim=-1)
            rows.append(
                {
                    "perturbation": name,
                    "window": window,
                    "label_agreement": (pred == labels[:, None]).float().mean().item(),
                    "identity_consistency": (pred == pred[:, :1]).all(dim=1).float().mean().item(),
                    "motion_mean": moves.mean().item(),
                    "motion_std": moves.std().item(),
                    "centre_shift": shift.mean().item(),
                }
            )
    return accuracy, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of the MNIST idx files")
    p.add_argument("--clips", type=int, default=1000, help="real test clips (the first of the split)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="also score the clips after a round trip through this VAE folder")
    args = p.parse_args(argv)
    accuracy, rows = window_table(args.data, args.clips, args.frames, args.size, args.seed, vae=args.vae)
    print(f"MNIST classifier: {accuracy:.2%} on the test digits; {args.clips} real test clips\n")
    print("| perturbation | window | per-frame agreement | identity consistency | motion px/frame | centre shift px |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['perturbation']} | {r['window']} | {r['label_agreement']:.1%} | {r['identity_consistency']:.1%} "
            f"| {r['motion_mean']:.2f} ± {r['motion_std']:.2f} | {r['centre_shift']:.2f} |"
        )


if __name__ == "__main__":
    main()
