"""`key=value` command lines for the inference entry points, checked against a dataclass so a
misspelt key fails naming the valid ones."""

from __future__ import annotations

import dataclasses
import sys
import typing

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


def _is_text(schema, dotted: str) -> bool:
    """True when the field at `dotted` is declared str (or str | None): its value is taken verbatim,
    so prompt="ROMEO:" stays a string instead of being read as YAML (a mapping)."""
    node = schema
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return False
        node = typing.get_type_hints(node)[part]
    return node is str or node == (str | None)


def parse(schema, argv: list[str] | None = None):
    """Merge `key=value` arguments into the structured config `schema` (a dataclass)."""
    argv = sys.argv[1:] if argv is None else argv
    base = OmegaConf.structured(schema)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments are key=value; got {bad}. Valid keys: {sorted(base.keys())}")
    try:
        args = base
        for arg in argv:
            key, value = arg.split("=", 1)
            if _is_text(schema, key):
                update = OmegaConf.create()
                OmegaConf.update(update, key, value, force_add=True)
            else:
                update = OmegaConf.from_dotlist([arg])
            args = OmegaConf.merge(args, update)
    except (ConfigKeyError, ValidationError) as e:
        raise SystemExit(f"{getattr(e, 'msg', e)}\nValid keys: {sorted(base.keys())}") from None
    missing = sorted(OmegaConf.missing_keys(args))
    if missing:
        raise SystemExit(f"missing required argument(s): {', '.join(f'{k}=...' for k in missing)}")
    return args


def check_request(modality, request: dict) -> dict:
    """Refuse what the model cannot take (prompt= for an image model, label= for text), naming
    what it does take; returns `request`."""
    refused = sorted(set(request) - set(modality.requests))
    if refused:
        takes = ", ".join(f"{k}=" for k in modality.requests) or "nothing"
        keys = ", ".join(f"{k}=" for k in refused)
        raise SystemExit(f"{keys} does not apply to this {modality.cfg.name} model; it takes {takes}")
    return request


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampling_plan(args, cfg, modality, process, device, request: dict | None = None) -> tuple[int, str, float]:
    """(steps, sampler, guidance) a command will really use: the command line's, else the run's
    `sample` settings. Reported as used: the process says how many steps it really takes (the
    autoregressive baseline: one per token), and an unconditional model has nothing for guidance
    to push towards."""
    steps = process.sample_steps(args.steps or cfg.sample.steps, modality.sample_shape(1))
    sampler = args.sampler or cfg.sample.sampler or process.samplers[0]
    guidance = cfg.sample.guidance if args.guidance is None else args.guidance
    if not modality.sample_cond(1, device, **(request or {})):
        guidance = 1.0
    return steps, sampler, guidance
