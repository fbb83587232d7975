"""Text checkpoints side by side, continuous and discrete, on one held-out text with the same metrics.

Trains nothing: each checkpoint goes through infer/evaluate.py with the same held-out text, sample
count, steps, seed and scoring reference, and one Markdown table comes out: the held-out bound in bits
per character, the real-word share of the samples, their generative perplexity under --reference and
their unigram entropy. A continuous-text model gets four rows, with and without the clamping trick and
decoded by its rounding decoder (argmax) or by the nearest embedding (a clamped row clamps to the token
its decoding reads), plus the share of tokens on which those two decodings differ.

    python bench/text_compare.py --ckpts continuous=runs/ct/checkpoints/last masked=runs/m/checkpoints/last \
        ar=runs/ar/checkpoints/last --reference runs/ar/checkpoints/last --heldout heldout.txt \
        --out bench/text_compare.md

To compare at equal cost, train the contenders for the same wall-clock (`max_minutes=`), see README.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infer.cli import parse
from infer.evaluate import EvalArgs, evaluate

# continuous-text variants: (row label, metric prefix, rounding-changed key)
VARIANTS = (
    ("clamp, argmax", "", "rounding_changed_share"),
    ("clamp, nearest", "clamp_nearest_", "rounding_changed_share"),
    ("no clamp, argmax", "noclamp_argmax_", "noclamp_rounding_changed_share"),
    ("no clamp, nearest", "noclamp_nearest_", "noclamp_rounding_changed_share"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpts", nargs="+", required=True, help="text checkpoints, each PATH or NAME=PATH")
    p.add_argument("--heldout", default=None, help="held-out text (default: each run's own held-out split)")
    p.add_argument("--reference", default=None, help="checkpoint that scores samples (generative perplexity)")
    p.add_argument("--n", type=int, default=64, help="samples per model")
    p.add_argument(
        "--steps", type=int, default=200, help="sampler steps (the autoregressive model takes one per token)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mc-timesteps", type=int, default=8, help="Monte-Carlo timesteps per sequence for the bounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="text_compare.md", help="the Markdown table; JSON per model beside it")
    return p.parse_args(argv)


def rows_of(name: str, metrics: dict) -> list[dict]:
    """Table rows of one model's metrics: one, or four for a continuous-text model."""
    base = {"model": name, "steps": metrics["steps"], "bits_per_char": metrics.get("bits_per_char", math.nan)}
    if "rounding_changed_share" not in metrics:
        return [{**base, "decoding": metrics["sampler"], **pick(metrics, "")}]
    return [
        {**base, "decoding": f"{metrics['sampler']}, {label}", **pick(metrics, prefix), "changed": metrics[changed]}
        for label, prefix, changed in VARIANTS
    ]


def pick(metrics: dict, prefix: str) -> dict:
    keys = ("real_word_share", "generative_perplexity", "sample_unigram_entropy_bits")
    return {k: metrics.get(prefix + k, math.nan) for k in keys}


def table(rows: list[dict], data_entropy: float) -> str:
    head = (
        "| model | decoding | steps | bits/char (bound) | real-word share | gen. PPL | unigram entropy (bits) "
        "| argmax ≠ nearest |\n|---|---|---|---|---|---|---|---|\n"
    )
    cell = lambda v, f: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)
    body = "".join(
        f"| {r['model']} | {r['decoding']} | {r['steps']} | {cell(r['bits_per_char'], '.3f')} "
        f"| {cell(r['real_word_share'], '.1%')} | {cell(r['generative_perplexity'], '.2f')} "
        f"| {cell(r['sample_unigram_entropy_bits'], '.2f')} | {cell(r.get('changed'), '.1%')} |\n"
        for r in rows
    )
    return head + body + f"\nHeld-out text's own unigram entropy: {data_entropy:.2f} bits.\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, entropy = [], math.nan
    for spec in args.ckpts:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).resolve().parent.parent.name  # runs/<name>/checkpoints/last
        keys = [f"ckpt={path}", f"n={args.n}", f"steps={args.steps}", f"batch={args.batch}", f"seed={args.seed}"]
        keys += [
            f"mc_timesteps={args.mc_timesteps}",
            f"device={args.device}",
            f"out={out.with_suffix(f'.{name}.json')}",
        ]
        keys += [f"data.path={args.heldout}"] if args.heldout else []
        keys += [f"reference={args.reference}"] if args.reference else []
        metrics = evaluate(parse(EvalArgs, keys))
        entropy = metrics.get("data_unigram_entropy_bits", entropy)
        rows += rows_of(name, metrics)
    markdown = table(rows, entropy)
    out.write_text(markdown)
    print(markdown)
    print(f"table written to {out}; each model's metrics beside it as JSON")
    return rows


if __name__ == "__main__":
    main()
