"""Draw samples from a trained checkpoint; the architecture comes from the checkpoint itself.

python infer/sample.py ckpt=runs/<run>/checkpoints/last steps=50 sampler=dpmpp_2m guidance=3 label=3
python infer/sample.py ckpt=runs/<video run>/checkpoints/last first_frame=frame.png     # image-to-video
python infer/sample.py ckpt=runs/<text run>/checkpoints/last prompt="ROMEO:" suffix="."   # text infilling
python infer/sample.py ckpt=runs/<caption run>/checkpoints/last prompt="a small red circle top left" guidance=4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python infer/sample.py` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import MISSING
from tqdm import tqdm

from infer.cli import check_request, parse, pick_device, sampling_plan
from train.checkpoint import load_model
from train.health import warn_if_degenerate

# what a sample may be asked for; each modality says which it takes
REQUESTS = ("label", "prompt", "suffix", "template", "clamp", "clamp_from", "decode", "first_frame")


@dataclass
class SampleArgs:
    ckpt: str = MISSING  # a checkpoint directory (config.yaml + model.safetensors)
    n: int = 16  # number of samples
    steps: int | None = None  # sampler steps (default: the training config's sample.steps)
    sampler: str | None = None  # default: the training config's sample.sampler, else the process's first
    guidance: float | None = None  # classifier-free guidance scale; 1 = none (default: training config's)
    seed: int = 0
    label: Any = None  # class index or name (models trained with labels)
    prompt: str | None = None  # text: fixed prefix; caption image models: a caption, or several "a|b" (a row each)
    suffix: str | None = None  # text diffusion models: fixed end of every sample
    template: str | None = None  # text diffusion models: the whole sample with [n] holes of n free tokens
    clamp: bool | None = None  # continuous text: the clamping trick (default: the model's modality.clamp)
    clamp_from: float | None = None  # continuous text: share of the steps before clamping starts
    decode: str | None = None  # continuous text: argmax (rounding decoder) | nearest (nearest embedding)
    first_frame: str | None = None  # video models: an image file held as frame 0 (image-to-video)
    eta: float | None = None  # ddim: 0 deterministic .. 1 DDPM
    block: int | None = None  # discrete text, sampler=blocks: block length
    temperature: float | None = None  # discrete text
    top_k: int | None = None
    top_p: float | None = None
    batch: int = 64  # samples per forward pass
    preview: bool = False  # also save the x0 estimate at 8 points along the way
    out: str | None = None  # output path (default: <ckpt>/samples/...)
    device: str = "auto"


def sample(args) -> str:
    device = pick_device(args.device)
    cfg, modality, model = load_model(args.ckpt, device)
    process = modality.noise_process()
    request = check_request(modality, {k: args[k] for k in REQUESTS if args[k] is not None})
    steps, sampler, guidance = sampling_plan(args, cfg, modality, process, device, request)
    options = {k: args[k] for k in ("eta", "block", "temperature", "top_k", "top_p") if args[k] is not None}
    options.update(modality.sample_options(model, **request))
    generator = torch.Generator(device=device).manual_seed(args.seed)

    cond = modality.sample_cond(args.n, device, **request)  # drawn once, so label grids cycle across chunks
    chunks, previews = [], []
    keep = sorted({round(i * (steps - 1) / 7) for i in range(8)})
    for start in tqdm(range(0, args.n, args.batch), desc="sampling", disable=args.n <= args.batch):
        n = min(args.batch, args.n - start)

        def callback(i, x0_hat, first=(start == 0), n=n):
            if args.preview and first and i in keep:
                previews.append(x0_hat[: min(n, 8)].clone())

        x0 = process.sample(
            modality.model_fn(model),
            modality.sample_shape(n),
            {k: v[start : start + n] for k, v in cond.items()},
            steps=steps,
            sampler=sampler,
            guidance=guidance,
            generator=generator,
            device=device,
            callback=callback,
            **options,
        )
        warn_if_degenerate(x0, f"samples from {args.ckpt}")
        chunks.append(modality.decode(x0, model, **request))
    samples = torch.cat(chunks) if isinstance(chunks[0], torch.Tensor) else sum(chunks, [])
    out = args.out or str(Path(args.ckpt) / "samples" / f"{sampler}-{steps}steps-g{guidance:g}-seed{args.seed}")
    path = modality.save(samples, out, **request)
    if previews:  # rows: the first samples; columns: time from noise to the answer
        stacked = torch.stack(previews, dim=1).flatten(0, 1)
        preview_path = modality.save(modality.decode(stacked, model, **request), f"{out}-preview")
        print(f"x0 previews at steps {keep}: {preview_path}")
    print(f"wrote {args.n} samples ({sampler}, {steps} steps, guidance {guidance:g}, seed {args.seed}) to {path}")
    return path


if __name__ == "__main__":
    sample(parse(SampleArgs))
