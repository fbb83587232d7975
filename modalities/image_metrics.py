"""Sample-quality metrics for images: a small CNN classifier trained once per data set, the
share of class-conditional samples it recognises as their requested class, and the Fréchet
distance between its features of samples and of real test images.

The Fréchet distance is FID's formula (Heusel et al. 2017) on this classifier's penultimate
features instead of Inception-v3's: nothing to download, and it suits 1-channel 16..64 px
data. Its numbers compare runs on the same data set (the same cached classifier), never
published FID values.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

from modalities.data import Tolerant, collate

RECIPE = "cnn3-onecycle-v1"  # part of the cache key: change it when the classifier or its training changes
MAX_REFERENCE = 10_000  # real test images whose features the samples are compared with


def _down(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class Classifier(nn.Module):
    """Three stride-2 conv layers, a 128-d feature layer and a linear head, for (channels, H, W)
    images, H and W in 16..64. Stride-2 convolutions rather than stride-1 ones plus pooling cost
    several times less on a CPU and still reach 98.8% on MNIST in one epoch."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, features: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            _down(channels, width),
            _down(width, 2 * width),
            _down(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(4),  # 16..64 px inputs all end as 4x4 maps, so one head fits every size
            nn.Flatten(),
            nn.Linear(4 * width * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, 128) penultimate features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


def _batches(dataset, batch: int, shuffle: bool = False, seed: int = 0, workers: int = 2):
    """(x, label) batches; unreadable items are skipped and reported in one warning, not fatal."""
    loader = DataLoader(
        Tolerant(dataset),
        batch,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    bad = []
    for b in loader:
        bad += b["bad"]
        if b["n"]:
            yield b["x"], b["label"]
    if bad:
        warnings.warn(f"{len(bad)} unreadable images skipped, e.g. {bad[:3]}", stacklevel=2)


@torch.no_grad()
def _predict(model: Classifier, dataset, batch: int, device, workers: int = 2):
    """Features (N, 128) as float64 numpy, predicted and true labels (N,) of the readable items."""
    model.eval()
    feats, preds, labels = [], [], []
    for x, y in _batches(dataset, batch, workers=workers):
        f = model.features(x.to(device))
        feats.append(f.cpu())
        preds.append(model.head(f).argmax(1).cpu())
        labels.append(y)
    return torch.cat(feats).double().numpy(), torch.cat(preds), torch.cat(labels)


@torch.enable_grad()  # evaluate_images calls this under no_grad
def train_classifier(
    train_set, test_set, epochs: int = 1, batch: int = 128, device="cpu", seed: int = 0, workers: int = 2
):
    """Train a Classifier on `train_set` (items {"x": (C, H, W) in [-1, 1], "label": int}, with a
    `classes` attribute). `workers` decode items beside the training (0: in this process, best
    for data already in memory). Returns (model in eval mode, accuracy on `test_set`)."""
    torch.manual_seed(seed)
    model = Classifier(train_set[0]["x"].shape[0], len(train_set.classes)).to(device)
    opt = torch.optim.Adam(model.parameters())
    # One-cycle learning rate (Smith & Topin 2019), a warm-up then a long decay: fast convergence
    # in the one or two epochs that we can afford.
    steps = epochs * math.ceil(len(train_set) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        for x, y in _batches(train_set, batch, shuffle=True, seed=seed + epoch, workers=workers):
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    _, pred, label = _predict(model, test_set, 4 * batch, device, workers)
    return model.eval(), (pred == label).float().mean().item()


def get_classifier(modality, device, epochs: int = 1):
    """The classifier of `modality`'s evaluation data (its `classifier_data`) and its test accuracy:
    from the cache when the same data (`classifier_key`, item counts, classes) was seen before, else
    trained and cached. Weights are safetensors, never pickle."""
    train_set, test_set = modality.classifier_data("train"), modality.classifier_data("test")
    description = {
        "recipe": RECIPE,
        "epochs": epochs,
        **modality.classifier_key(),
        "items": [len(train_set), len(test_set)],
        "classes": list(train_set.classes),
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("POLYDIFF_CACHE") or Path.home() / ".cache" / "polydiff")
    weights, info = cache / f"classifier-{key}.safetensors", cache / f"classifier-{key}.json"
    if weights.exists() and info.exists():
        model = Classifier(train_set[0]["x"].shape[0], len(train_set.classes))
        model.load_state_dict(load_file(weights))  # strict: a stale file fails loudly
        return model.to(device).eval(), json.loads(info.read_text())["test_accuracy"]
    model, accuracy = train_classifier(train_set, test_set, epochs=epochs, device=device)
    weights.parent.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed, so a killed run never leaves a half-written cache.
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    tmp = info.with_name(info.name + ".tmp")
    tmp.write_text(json.dumps({"test_accuracy": accuracy, **description}, indent=2))
    os.replace(tmp, info)
    return model, accuracy


def _sqrtm(m: np.ndarray):
    """Matrix square root, or None when m is singular (scipy warns), the result is not finite
    or it has a non-negligible imaginary part."""
    import scipy.linalg  # here: scipy costs every start-up most of a second, and only evaluation needs it

    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(m)
        except scipy.linalg.LinAlgWarning:
            return None
    if not np.isfinite(root).all() or np.abs(root.imag).max(initial=0) > 1e-3 * max(1.0, np.abs(root).max()):
        return None
    return root.real  # tiny imaginary parts are round-off


def frechet_distance(feats_a, feats_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Args:
        feats_a: (N, F) and feats_b: (M, F) features, N, M >= 2.
    Returns:
        the distance, >= 0 up to round-off.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = _sqrtm(cov_a @ cov_b)
    if covmean is None:  # singular product (e.g. dead ReLU features, fewer samples than features)
        import scipy.linalg

        offset = eps * np.eye(len(cov_a))  # the same fix as the reference implementation (pytorch-fid)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = np.real(scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset)))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def generated(modality, model, process, args, device):
    """`args.n` samples of `model` in batches of `args.batch`, each batch seeded (args.seed + i), with
    labels cycling through the classes for a class-conditional model, so every class is asked for
    equally often (other conditions: the modality's sample_cond). Yields (labels (B,) or None, x0)."""
    for i, start in enumerate(range(0, args.n, args.batch)):
        size = min(args.batch, args.n - start)
        cond, labels = modality.sample_cond(size, device), None
        if "label" in cond:
            labels = torch.arange(start, start + size, device=device) % len(modality.classes)
            cond["label"] = labels
        x0 = process.sample(
            modality.model_fn(model),
            modality.sample_shape(size),
            cond,
            steps=args.steps,
            sampler=args.sampler,
            guidance=args.guidance,
            device=device,
            generator=torch.Generator(device=device).manual_seed(args.seed + i),
            **modality.sample_options(model),  # e.g. self-conditioning
        )
        yield labels, x0


@torch.no_grad()
def evaluate_with_classifier(modality, model, process, args, device, as_seen, epochs: int = 1) -> dict:
    """Sample `args.n` items and score them with the classifier of the modality's data
    (`classifier_data`): returns {"classifier_test_accuracy", "frechet_distance", "n_samples"} plus,
    for class-conditional models, "label_agreement" (share of samples classified as their label) and
    "label_agreement_by_class" (the same share for each class name, over the samples asked for it).

    Args:
        as_seen: x0 -> the classifier's input, as classifier_data presents real items.
        epochs: classifier training epochs (when not cached).
    """
    if args.n < 2:
        raise ValueError(f"n={args.n}: the Fréchet distance needs at least 2 samples")
    classifier, accuracy = get_classifier(modality, device, epochs=epochs)
    feats, agree, asked = [], [], []
    for labels, x0 in generated(modality, model, process, args, device):
        f = classifier.features(as_seen(x0))
        feats.append(f.double().cpu().numpy())
        if labels is not None:
            agree.append((classifier.head(f).argmax(1) == labels).cpu())
            asked.append(labels.cpu())
    test_set = modality.classifier_data("test")
    test_set = Subset(test_set, range(min(len(test_set), MAX_REFERENCE)))
    result = {
        "classifier_test_accuracy": accuracy,
        "frechet_distance": frechet_distance(np.concatenate(feats), _predict(classifier, test_set, 512, device)[0]),
        "n_samples": args.n,
    }
    if agree:
        agree, asked = torch.cat(agree).float(), torch.cat(asked)
        result["label_agreement"] = agree.mean().item()
        result["label_agreement_by_class"] = {
            str(name): agree[asked == k].mean().item() for k, name in enumerate(modality.classes) if (asked == k).any()
        }
    return result


def evaluate_images(modality, model, process, args, device) -> dict:
    """Images scored by their data set's classifier (decode gives [0, 1]; the classifier reads [-1, 1])."""

    def as_seen(x0):
        return modality.decode(x0).to(device) * 2 - 1

    return evaluate_with_classifier(modality, model, process, args, device, as_seen)
