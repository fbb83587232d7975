"""Data plumbing every modality shares: reporting unreadable items instead of crashing or
silently dropping them, and the loader's collate function that carries those reports."""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import Dataset, default_collate


class BadSample(Exception):
    """An item that cannot be used. Carries the file and the reason."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class Tolerant(Dataset):
    """Wraps a dataset so that an item raising BadSample becomes {"bad": "path: reason"}
    instead of killing the loader; `collate` drops it from the batch and keeps the report."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.skipped = list(getattr(dataset, "skipped", []))  # found unusable while listing files

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except BadSample as e:
            return {"bad": str(e)}


def collate(items: list[dict]) -> dict:
    """Stack the good items; list the bad ones under "bad"; "n" counts the good ones."""
    good = [item for item in items if "bad" not in item]
    batch = default_collate(good) if good else {}
    batch["bad"] = [item["bad"] for item in items if "bad" in item]
    batch["n"] = len(good)
    return batch


class BadDataTracker:
    """Counts bad items over an epoch and stops the run when they pass a threshold.

    Args:
        threshold: largest tolerated share of bad items (0.01 = 1%).
        min_seen: items to see before the share is judged (avoids stopping on the first batch).
    """

    def __init__(self, threshold: float = 0.01, min_seen: int = 200):
        self.threshold, self.min_seen = threshold, min_seen
        self.seen = self.bad = 0
        self.reports: list[str] = []

    def add(self, n_good: int, bad: list[str], verbose: bool = True):
        self.seen += n_good + len(bad)
        self.bad += len(bad)
        for report in bad:
            self.reports.append(report)
            if verbose:
                warnings.warn(f"skipped bad item {report}", stacklevel=2)
        self.check()

    def check(self, final: bool = False):
        if self.seen and (final or self.seen >= self.min_seen) and self.bad / self.seen > self.threshold:
            listed = "\n  ".join(self.reports[:10])
            raise RuntimeError(
                f"{self.bad} of {self.seen} items ({100 * self.bad / self.seen:.1f}%) could not be read, above "
                f"data.bad_threshold={self.threshold}; fix or remove them (first ones:\n  {listed})"
            )

    def summary(self) -> str:
        return f"{self.bad} bad of {self.seen} items" + (f" (first: {self.reports[0]})" if self.reports else "")

    def reset(self):
        self.seen = self.bad = 0
        self.reports = []


def tensor_counts(n_good: int, n_bad: int, device) -> torch.Tensor:
    return torch.tensor([n_good, n_bad], device=device)
