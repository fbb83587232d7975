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


# The valid values of the sampling keys (of SampleArgs and EvalArgs): key -> (test, range as told to the user)
RANGES = {
    "n": (lambda v: v >= 1, "at least 1"),
    "batch": (lambda v: v >= 1, "at least 1"),
    "steps": (lambda v: v >= 1, "at least 1"),
    "mc_timesteps": (lambda v: v >= 1, "at least 1"),
    # u + w (c - u) (Ho & Salimans 2022): 0 is unconditional, 1 no guidance, above 1 stronger guidance
    "guidance": (lambda v: v >= 0, ">= 0 (0: unconditional, 1: no guidance, above 1: stronger)"),
    "eta": (lambda v: 0 <= v <= 1, "in 0..1 (0: deterministic DDIM, 1: DDPM)"),
    "block": (lambda v: v >= 1, "at least 1 token"),
    "clamp_from": (lambda v: 0 <= v <= 1, "a share of the steps in 0..1"),
    "temperature": (lambda v: v > 0, "above 0"),
    "top_k": (lambda v: v >= 1, "at least 1"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def check_ranges(args):
    """Refuse a sampling value out of its range (RANGES), naming the key and the valid values,
    instead of letting it change silently or fail deep inside a sampler."""
    for key, (valid, told) in RANGES.items():
        value = args.get(key)
        if value is not None and not valid(value):
            raise SystemExit(f"{key}={value} is out of range: {key} must be {told}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sampling_plan(args, cfg, modality, process, device, request: dict | None = None) -> tuple[int, str, float]:
    """(steps, sampler, guidance) a command will really use: the command line's, else the run's
    `sample` settings, after check_ranges. Reported as used: the process says how many steps it
    really takes (the autoregressive baseline: one per token). An unconditional model has nothing for
    guidance to push towards: the run's setting is then 1, and a guidance other than 1 asked on the
    command line is refused."""
    if process is None:
        raise SystemExit(
            f"a modality={modality.cfg.name} model is trained without a noise process and has nothing to sample "
            "or evaluate here (README: what it is for)"
        )
    check_ranges(args)
    steps = process.sample_steps(cfg.sample.steps if args.steps is None else args.steps, modality.sample_shape(1))
    sampler = args.sampler or cfg.sample.sampler or process.samplers[0]
    guidance = cfg.sample.guidance if args.guidance is None else args.guidance
    if not modality.sample_cond(1, device, **(request or {})):
        if guidance != 1 and args.guidance is not None:
            raise SystemExit(
                f"guidance={args.guidance:g} needs a conditional model; this {modality.cfg.name} model "
                "takes no condition to guide towards: drop guidance= (or set it to 1)"
            )
        guidance = 1.0
    return steps, sampler, guidance
