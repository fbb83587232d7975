"""Checkpoint directories: written atomically, read without unpickling.

    runs/<name>/checkpoints/
        step_00001000/
            config.yaml          the fully resolved config that made the model
            model.safetensors    EMA weights: all that sampling needs
            state/               accelerator.save_state: weights, optimizer, scheduler, RNGs, counters
        last -> step_00001000    symlinks, replaced atomically
        best -> step_00000500

A checkpoint is assembled in `step_XXXXXXXX.tmp` and renamed into place, so a run killed
mid-write leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from modalities import build_modality
from train.config import load_run_config


def build_model(cfg, modality) -> torch.nn.Module:
    """The network that `cfg` describes, built by `modality` (the DiT unless the modality says otherwise)."""
    return modality.build_model(cfg)


def _point(link: Path, target: str):
    """Make `link` a symlink to `target` atomically (a new link renamed over the old one)."""
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def save_checkpoint(accelerator, root: Path, step: int, cfg, ema_model, keep_last: int, is_best: bool) -> Path:
    """Write checkpoint `step` under `root` (every process must call this: save_state is collective).

    Returns the final directory."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-write
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))
    if accelerator.is_main_process:
        OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
        state = {k: v.detach().contiguous().cpu() for k, v in ema_model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"step": str(step), "format": "pt"})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _point(root / "last", final.name)
        if is_best:
            _point(root / "best", final.name)
        _prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep_last: int):
    """Delete step checkpoints beyond the newest `keep_last`, never the one `best` points to."""
    best = (root / "best").resolve() if (root / "best").exists() else None
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.resolve() != best:
            shutil.rmtree(old, ignore_errors=True)


def _safetensors_damage(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, judged from its header alone: 8 bytes giving the
    header's length, a JSON header, and tensor data that must end exactly where the file ends."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + n > size:
                return f"truncated ({size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "missing"
    except (ValueError, TypeError, KeyError, AttributeError):
        return "its header is not valid safetensors"
    if 8 + n + end != size:
        return f"truncated ({size} bytes, its header says {8 + n + end})"
    return None


def checkpoint_damage(ckpt: Path) -> str | None:
    """Why checkpoint `ckpt` cannot be resumed ("<file>: <reason>"), or None when it looks whole.
    Cheap: reads the headers of the safetensors files and checks that the other state files are not empty."""
    ckpt = Path(ckpt)
    if not (ckpt / "state").is_dir():
        return f"{ckpt / 'state'}: missing"
    for path in [ckpt / "model.safetensors", *sorted((ckpt / "state").iterdir())]:
        if path.suffix == ".safetensors":
            why = _safetensors_damage(path)
        else:
            why = None if path.stat().st_size else "empty"
        if why:
            return f"{path}: {why}"
    return None


def resume_state(accelerator, resume: str | None, run_dir: Path) -> Path | None:
    """Load the training state that `resume` names into `accelerator`; returns the checkpoint
    directory, or None when there is nothing to resume.

    resume=auto takes the newest intact checkpoint of `run_dir`: a damaged one (truncated by a full
    disk, a copy cut short) is named and passed over for the next older one. An explicit directory
    is loaded as given, and refused naming its damaged file."""
    if not resume:
        return None
    if resume != "auto":
        ckpt = Path(resume).resolve()
        if not (ckpt / "state").is_dir():
            raise FileNotFoundError(f"resume={resume}: no resumable state in {ckpt / 'state'}")
        why = checkpoint_damage(ckpt)
        if why:
            raise ValueError(f"resume={resume}: the checkpoint is damaged: {why}")
        accelerator.load_state(str(ckpt / "state"))
        return ckpt
    root = Path(run_dir) / "checkpoints"
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    damaged = []
    for ckpt in reversed(steps):
        why = checkpoint_damage(ckpt)
        if why is None:
            try:
                accelerator.load_state(str(ckpt / "state"))
                return ckpt
            except Exception as e:  # a damaged pickle, a state from other code: report it, try the previous one
                why = f"{ckpt / 'state'} does not load: {type(e).__name__}: {e}"
        accelerator.print(f"warning: checkpoint {ckpt} is damaged ({why}); falling back to an older one")
        damaged.append(why)
    if damaged:
        raise ValueError(f"no intact checkpoint in {root} to resume from:\n  " + "\n  ".join(damaged))
    return None


# Backbone keys that shape the model a checkpoint holds. `pos` has no weights of its own, so a
# resumed run built with other positions would load its checkpoint without complaint.
ARCHITECTURE = ("depth", "hidden_size", "num_heads", "patch", "mlp_ratio", "pos", "qk_norm", "layout")


def check_resumed_architecture(cfg, ckpt: Path):
    """Refuse to continue checkpoint `ckpt` with a backbone other than the one it was trained with
    (e.g. an image run from before sincos became the image default, resumed with pos left null)."""
    saved = load_run_config(Path(ckpt) / "config.yaml").backbone
    ours = cfg.backbone
    differ = [f"backbone.{k}={saved[k]} (this run: {ours[k]})" for k in ARCHITECTURE if saved[k] != ours[k]]
    if differ:
        raise ValueError(f"resume: {ckpt} was trained with {', '.join(differ)}; give its values to continue it")


def load_weights(model: torch.nn.Module, path: Path):
    """Load safetensors weights into `model`, naming the file and every mismatch."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: file has {tuple(v.shape)}, config.yaml's architecture needs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ValueError(
            f"{path} does not match the architecture in config.yaml beside it:\n  " + "\n  ".join(problems[:12])
        )
    model.load_state_dict(state)


def load_model(ckpt, device="cpu"):
    """A checkpoint directory -> (cfg, modality, EMA model in eval mode on device)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    cfg = load_run_config(ckpt / "config.yaml")
    modality = build_modality(cfg.modality, cfg.backbone.patch, cfg.data)
    model = build_model(cfg, modality)
    load_weights(model, ckpt / "model.safetensors")
    model.set_attention_backend(cfg.attention if cfg.attention != "xformers" else "auto", torch.device(device).type)
    return cfg, modality, model.to(device).eval()
