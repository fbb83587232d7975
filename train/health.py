"""Is a run healthy? Weights checked before a checkpoint is written, and samples checked before
anyone looks at them: a model that blew up should stop loudly, not leave a black image."""

from __future__ import annotations

import warnings

import torch


def finite_weights(*models: torch.nn.Module) -> bool:
    """True when every parameter of every model is finite."""
    return all(bool(torch.isfinite(p).all()) for model in models for p in model.parameters())


def warn_if_degenerate(x0: torch.Tensor, what: str) -> str | None:
    """Warn when sampled x0 is useless: non-finite values (a diverged model), or one value
    everywhere (a black image, one repeated token). Returns the reason, or None when x0 looks sane.

    Args:
        x0: (B, ...) samples in the diffusion space, before `Modality.decode`.
        what: what the samples are, for the message (a path or "samples at step 100").
    """
    why = None
    if x0.is_floating_point() and not bool(torch.isfinite(x0).all()):
        why = f"{int((~torch.isfinite(x0)).sum())} of {x0.numel()} values are not finite"
    elif x0.numel() > 1 and bool((x0 == x0.flatten()[0]).all()):
        why = f"every value is {x0.flatten()[0].item():g}"
    if why:
        warnings.warn(
            f"{what} are degenerate ({why}): the model has diverged or is untrained; check loss.csv",
            stacklevel=2,
        )
    return why
