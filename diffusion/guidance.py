"""Classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import torch


def guided(model_fn, scale: float, cond: dict):
    """Wrap model_fn so that it returns u + scale * (c - u), with c the conditional and u the
    unconditional output, from one forward pass of the doubled batch.

    Guidance applies to every output channel. (DiT's reference `forward_with_cfg` guided only
    the first three of four latent channels; that quirk is deliberately not reproduced.)
    scale = 1, or no condition at all, returns model_fn unchanged.
    """
    if scale == 1.0 or not cond:
        return model_fn

    def fn(xt, t, cond):
        b = xt.shape[0]
        doubled = {k: torch.cat([v, v]) for k, v in cond.items()}
        doubled["drop"] = torch.arange(2 * b, device=xt.device) >= b  # second half: null condition
        c, u = model_fn(torch.cat([xt, xt]), torch.cat([t, t]), doubled).float().chunk(2)
        return u + scale * (c - u)

    return fn
