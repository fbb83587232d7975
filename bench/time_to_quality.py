"""Time to quality: sample quality against training images seen, for one or more runs.

Each run is trained once with checkpoints every few steps (`save_every`, a `keep_last` large enough
to keep them); this script evaluates the checkpoints at the requested image counts (images = step x
global batch, read from the run's config.yaml) with the modality's own metrics (infer/evaluate.py:
for images, label agreement under the evaluation classifier and the Fréchet distance of its
features), all with the same sampler, steps, guidance, sample count and seed, and writes one
Markdown table.

    python bench/time_to_quality.py --runs old=runs/mnist-old new=runs/mnist-new \\
        --images 16000 32000 64000 128000 --n 500 --steps 10 --out bench/ttq.md

A requested count that is not a checkpointed step of a run is reported as missing (no row is
invented); a count that is not a whole number of batches is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf

from infer.evaluate import EvalArgs, evaluate
from train.config import load_run_config

COLUMNS = (("label_agreement", "label agreement", "{:.1%}"), ("frechet_distance", "Fréchet distance", "{:.1f}"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="label=run folder (or a bare run folder)")
    p.add_argument("--images", nargs="+", type=int, default=[16000, 32000, 64000, 128000])
    p.add_argument("--n", type=int, default=500, help="samples per evaluation")
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    return p.parse_args(argv)


def checkpoint_at(run: Path, images: int) -> tuple[int, Path]:
    """(step, checkpoint dir) of `run` after `images` training images."""
    cfg = load_run_config(run / "config.yaml")
    per_step = cfg.batch_size  # global batch: per-process batch x processes x grad_accum
    if images % per_step:
        raise SystemExit(f"{images} images is not a whole number of steps of {run} (global batch {per_step})")
    step = images // per_step
    return step, run / "checkpoints" / f"step_{step:08d}"


def table(rows: list[dict]) -> str:
    head = "| run | images | step | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for r in rows:
        cells = [r["run"], f"{r['images']:,}", str(r["step"])]
        cells += [fmt.format(r[key]) if r.get(key) is not None else "missing" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    runs = [spec.split("=", 1) if "=" in spec else (Path(spec).name, spec) for spec in args.runs]
    rows = []
    for label, folder in runs:
        run = Path(folder)
        if not (run / "config.yaml").is_file():
            raise SystemExit(f"{run} is not a run folder (no config.yaml)")
        for images in args.images:
            step, ckpt = checkpoint_at(run, images)
            row = {"run": label, "images": images, "step": step}
            if ckpt.is_dir():
                eval_args = OmegaConf.merge(
                    OmegaConf.structured(EvalArgs),
                    {
                        "ckpt": str(ckpt),
                        "n": args.n,
                        "steps": args.steps,
                        "sampler": args.sampler,
                        "guidance": args.guidance,
                        "seed": args.seed,
                        "device": args.device,
                    },
                )
                row.update(evaluate(eval_args))
            else:
                print(f"{label}: no checkpoint at step {step} ({images} images): {ckpt} is missing")
            print(json.dumps(row))
            rows.append(row)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"table written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
