"""`key=value` command lines for the inference entry points, checked against a dataclass so a
misspelt key fails naming the valid ones."""

from __future__ import annotations

import sys

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


def parse(schema, argv: list[str] | None = None):
    """Merge `key=value` arguments into the structured config `schema` (a dataclass)."""
    argv = sys.argv[1:] if argv is None else argv
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(
            f"arguments are key=value; got {bad}. Valid keys: {sorted(OmegaConf.structured(schema).keys())}"
        )
    base = OmegaConf.structured(schema)
    try:
        args = OmegaConf.merge(base, OmegaConf.from_dotlist(argv))
    except (ConfigKeyError, ValidationError) as e:
        raise SystemExit(f"{e.msg if hasattr(e, 'msg') else e}\nValid keys: {sorted(base.keys())}") from None
    missing = sorted(OmegaConf.missing_keys(args))
    if missing:
        raise SystemExit(f"missing required argument(s): {', '.join(f'{k}=...' for k in missing)}")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
