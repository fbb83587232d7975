"""Data plumbing every modality shares: reporting unreadable items instead of crashing or
silently dropping them, and the loader's collate function that carries those reports."""

from __future__ import annotations

import warnings

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

    def check(self, seen: int | None = None, bad: int | None = None, final: bool = False):
        """Raise when the bad share passes the threshold. `seen` and `bad` default to this process's
        counts; with several processes pass the totals over all of them, so all stop together."""
        seen, bad = (self.seen, self.bad) if seen is None else (seen, bad)
        if seen and (final or seen >= self.min_seen) and bad / seen > self.threshold:
            listed = "\n  ".join(self.reports[:10])
            raise RuntimeError(
                f"{bad} of {seen} items ({100 * bad / seen:.1f}%) could not be read, above "
                f"data.bad_threshold={self.threshold}; fix or remove them (first ones:\n  {listed})"
            )

    def summary(self, seen: int, bad: int) -> str:
        """One line for the epoch's end, from the totals over all processes."""
        return f"{bad} bad of {seen} items" + (f" (first here: {self.reports[0]})" if self.reports else "")

    def reset(self):
        self.seen = self.bad = 0
        self.reports = []
