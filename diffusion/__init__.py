"""Noise processes: how clean data is corrupted, the training loss, and how samples are drawn.

This package never imports a modality; modalities choose a process by name.
"""

from __future__ import annotations

import inspect

from diffusion.continuous import GaussianVP, RectifiedFlow
from diffusion.discrete import Autoregressive, MaskedDiffusion, UniformDiffusion

PROCESSES = {
    "gaussian": GaussianVP,
    "flow": RectifiedFlow,
    "masked": MaskedDiffusion,
    "uniform": UniformDiffusion,
    "autoregressive": Autoregressive,
}


def build_process(name: str, options: dict, **extra):
    """Make the process `name`, passing it the options from `diffusion:` that its constructor
    takes plus `extra` (sizes that come from the modality, e.g. the vocabulary); an option left
    null keeps the process's own default."""
    if name not in PROCESSES:
        raise ValueError(f"modality.process={name!r} is not a noise process; choose one of {sorted(PROCESSES)}")
    cls = PROCESSES[name]
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**dict(options), **extra}.items() if k in params and v is not None}
    return cls(**kwargs)
