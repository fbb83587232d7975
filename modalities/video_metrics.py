"""Sample-quality metrics for video, offline: the image classifier of the frames' data set
(modalities/image_metrics.py, trained once and cached) applied to every frame of every clip.

- label_agreement: share of generated frames classified as the clip's requested label;
- identity_consistency: share of clips whose frames all get the same predicted class (an object
  that changes kind mid-clip fails it);
- motion: mean and spread of the frame-to-frame displacement of the object's centre (`centroids`,
  pixels), generated and real test clips, so a frozen or jittering model shows;
- frechet_distance: Fréchet distance between the classifier's per-frame features of generated
  and real test frames (FID's formula on a small in-domain classifier, as for images).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from modalities.image_metrics import frechet_distance, generated, get_classifier

EVALUATED = ("shapes", "moving_mnist")  # data sets with a frame classifier
MAX_REFERENCE = 1000  # real test clips the samples are compared with


INK = 0.2  # share of a frame's intensity range below which a pixel counts as background


def centroids(frames: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """Centres (x, y) in pixels of the object in (N, C, H, W) frames in [0, 1]: the intensity
    centroid of its pixels, robust to what a generated frame adds around it.

    A plain intensity centroid weighs every pixel, so a faint haze over the background drags it
    towards the middle of the frame: real Moving-MNIST test clips with |N(0, 0.02)| added (about 4 of
    255 grey levels, invisible to a person) had their digit read right in 53% of frames instead of
    95% (bench/RESULTS.md, Video). So pixels below INK of the frame's range (darkest to brightest)
    weigh nothing, and only the side x side window holding the most weight counts (isolated specks
    elsewhere do not pull the centre); side defaults to half the frame, a Moving-MNIST digit's size.
    On clean real clips both read the same share of frames right (bench/video_window.py)."""
    gray = frames.float().mean(1)  # (N, H, W)
    side = side or gray.shape[-1] // 2
    low, high = gray.amin(dim=(1, 2), keepdim=True), gray.amax(dim=(1, 2), keepdim=True)
    weight = (gray - low - INK * (high - low)).clamp(min=0)
    mass = F.avg_pool2d(weight[:, None], side, stride=1).flatten(1)  # every side x side window
    cols = gray.shape[-1] - side + 1
    top, left = mass.argmax(1).div(cols, rounding_mode="floor"), mass.argmax(1) % cols
    ys, xs = (torch.arange(n, device=gray.device)[None, :] for n in gray.shape[1:])
    rows_in = (ys >= top[:, None]) & (ys < top[:, None] + side)  # (N, H)
    cols_in = (xs >= left[:, None]) & (xs < left[:, None] + side)  # (N, W)
    weight = weight * rows_in[:, :, None] * cols_in[:, None, :] + 1e-8
    total = weight.sum(dim=(1, 2))
    x = (weight.sum(1) * xs).sum(1) / total
    y = (weight.sum(2) * ys).sum(1) / total
    return torch.stack([x, y], dim=-1)


def displacements(clips: torch.Tensor, locate=centroids) -> torch.Tensor:
    """(B, C, T, H, W) clips in [0, 1] -> (B, T - 1) displacement of the object between frames, pixels.
    locate: (N, C, H, W) frames -> (N, 2) centres (bench/video_window.py passes others)."""
    b = clips.shape[0]
    c = locate(rearrange(clips, "b c t h w -> (b t) c h w")).view(b, -1, 2)
    return (c[:, 1:] - c[:, :-1]).norm(dim=-1)


def glimpse(frames: torch.Tensor, side: int, locate=centroids) -> torch.Tensor:
    """Crop a side x side window centred on each frame's object (`centroids`) and resize it to the
    frame size: a Moving-MNIST frame (a digit of side size/2 somewhere) becomes an MNIST-like centred
    digit (MNIST centres digits by their centre of mass), which the MNIST classifier reads.
    frames: (N, C, H, W) in [0, 1]; locate: (frames, side) -> (N, 2) centres."""
    size = frames.shape[-1]
    corner = (locate(frames, side) - side / 2).round().long().clamp(0, size - side)  # (N, 2) as (x, y)
    crops = torch.stack([f[:, y : y + side, x : x + side] for f, (x, y) in zip(frames, corner.tolist())])
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def classify(classifier, clips: torch.Tensor, dataset: str, device, batch: int = 512, locate=centroids):
    """Per-frame features (B*T, F) and predicted classes (B, T) of (B, C, T, H, W) clips in [0, 1];
    Moving-MNIST frames through `glimpse` with `locate`."""
    b = clips.shape[0]
    frames = rearrange(clips, "b c t h w -> (b t) c h w")
    if dataset == "moving_mnist":
        frames = glimpse(frames, frames.shape[-1] // 2, locate)
    feats, preds = [], []
    for chunk in frames.split(batch):
        f = classifier.features(chunk.to(device) * 2 - 1)  # the classifier reads [-1, 1]
        feats.append(f.double().cpu())
        preds.append(classifier.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).view(b, -1)


@torch.no_grad()
def evaluate_videos(modality, model, process, args, device) -> dict:
    """Sample `args.n` clips (labels cycling through the classes) and score them as the module
    docstring says. Returns a flat dict of numbers."""
    dataset = modality.cfg.dataset
    if dataset not in EVALUATED:
        raise ValueError(f"video evaluation needs a frame classifier: modality.dataset in {EVALUATED}, not {dataset}")
    if args.n < 2:
        raise ValueError(f"n={args.n}: the Fréchet distance needs at least 2 samples")
    classifier, accuracy = get_classifier(modality.frame_modality(), device)
    feats, preds, labels, moves = [], [], [], []
    for label, x0 in generated(modality, model, process, args, device):
        clips = modality.decode(x0)  # (B, C, T, H, W) in [0, 1]
        f, p = classify(classifier, clips, dataset, device)
        feats.append(f)
        preds.append(p)
        moves.append(displacements(clips))
        if label is not None:
            labels.append(label.cpu())
    preds, moves = torch.cat(preds), torch.cat(moves)

    test = modality.pixels("test")  # pixels, never the latent cache
    items = [test[i] for i in range(min(len(test), MAX_REFERENCE))]
    real = torch.stack([(item["x"] + 1) / 2 for item in items])
    real_feats, real_preds = classify(classifier, real, dataset, device)
    real_labels = torch.tensor([item["label"] for item in items])
    real_moves = displacements(real)
    result = {
        "classifier_test_accuracy": accuracy,
        # the same checks on real test clips: the ceiling a model can reach with this classifier
        "real_label_agreement": (real_preds == real_labels[:, None]).float().mean().item(),
        "real_identity_consistency": (real_preds == real_preds[:, :1]).all(dim=1).float().mean().item(),
        "identity_consistency": (preds == preds[:, :1]).all(dim=1).float().mean().item(),
        "motion_mean": moves.mean().item(),
        "motion_std": moves.std().item(),
        "real_motion_mean": real_moves.mean().item(),
        "real_motion_std": real_moves.std().item(),
        "frechet_distance": frechet_distance(np.concatenate(feats), real_feats),
        "n_samples": args.n,
    }
    if labels:
        result["label_agreement"] = (preds == torch.cat(labels)[:, None]).float().mean().item()
    return result
