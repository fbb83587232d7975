"""Exponential moving average of the weights (the model that gets sampled and saved)."""

from __future__ import annotations

import torch


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, step: int):
    """ema <- decay_t * ema + (1 - decay_t) * model, with decay_t = min(decay, (1 + step) / (10 + step)):
    the warm-up keeps short runs from sampling a model dominated by its random initialisation.

    The EMA copy is whole on every process; under FSDP the live parameters are shards (DTensors)
    and are gathered first."""
    decay_t = min(decay, (1 + step) / (10 + step))
    ema_params = list(ema_model.parameters())
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(params, ema_params)], 1 - decay_t)
