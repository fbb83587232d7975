"""Evaluate a checkpoint with its modality's own metrics; prints them and saves JSON beside it.

python infer/evaluate.py ckpt=runs/<run>/checkpoints/last                 # images: classifier agreement, FD
python infer/evaluate.py ckpt=... data.path=/my/heldout.txt                # text: held-out NLL bound
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python infer/evaluate.py` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import MISSING, OmegaConf

from infer.cli import parse, pick_device, sampling_plan
from train.checkpoint import load_model


@dataclass
class EvalData:
    path: str | None = None  # held-out data (default: the modality's own test split)


@dataclass
class EvalArgs:
    ckpt: str = MISSING
    n: int = 1000  # samples drawn for sample-quality metrics
    steps: int | None = None  # default: the training config's sample.steps
    sampler: str | None = None
    guidance: float | None = None
    seed: int = 0
    batch: int = 250
    mc_timesteps: int = 32  # Monte-Carlo timesteps per sequence for likelihood bounds (text)
    reference: str | None = None  # text: an autoregressive checkpoint that scores samples (generative perplexity)
    device: str = "auto"
    out: str | None = None  # JSON path (default: <ckpt>/eval-<sampler>-<steps>-g<guidance>-n<n>-seed<seed>.json)
    data: EvalData = field(default_factory=EvalData)


def default_out(args) -> Path:
    """<ckpt>/eval-<sampler>-<steps>-g<guidance>-n<n>-seed<seed>.json: every setting that changes the
    figures is in the name, so evaluations of one checkpoint under other settings keep their own files."""
    name = f"eval-{args.sampler}-{args.steps}-g{float(args.guidance):g}-n{args.n}-seed{args.seed}.json"
    return Path(args.ckpt) / name


def evaluate(args) -> dict:
    device = pick_device(args.device)
    cfg, modality, model = load_model(args.ckpt, device)
    process = modality.noise_process()
    steps, sampler, guidance = sampling_plan(args, cfg, modality, process, device)
    args = OmegaConf.merge(args, {"steps": steps, "sampler": sampler, "guidance": guidance})
    torch.manual_seed(args.seed)
    if args.reference and not modality.scored_by_reference:
        raise SystemExit(f"reference= scores text samples; a {cfg.modality.name} model is scored by its own metrics")
    reference = load_model(args.reference, device) if args.reference else None
    metrics = modality.evaluate(model, process, args, device, reference=reference)
    result = {
        "ckpt": str(args.ckpt),
        "sampler": args.sampler,
        "steps": args.steps,
        "guidance": args.guidance,
        "n": args.n,
        "seed": args.seed,
        **metrics,
    }
    out = Path(args.out) if args.out else default_out(args)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    print(f"metrics written to {out}")
    return result


if __name__ == "__main__":
    evaluate(parse(EvalArgs))
