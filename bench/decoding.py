"""Decoding speed against sample quality for a text checkpoint: for every sampler and step count,
sequences per second, network calls per batch, generative perplexity under a reference model and
the samples' unigram entropy. One JSON line per (sampler, steps), then a Markdown table.

    python bench/decoding.py --ckpt runs/masked/checkpoints/last --reference runs/ar/checkpoints/last
    python bench/decoding.py --ckpt ... --samplers confidence blocks --steps 8 32 128 --n 256 --batch 128
    python bench/decoding.py --ckpt ... --reference ... --out bench/decoding-masked.md

Timing covers sampling alone (after one untimed warm-up batch per row): CUDA events on a GPU, the
wall clock on a CPU. Network calls are counted per batch, and network evaluations per sequence (rows
evaluated, padding included, over n): the ancestral sampler of masked diffusion re-evaluates only
the sequences that changed (`--caches row`), or the whole batch when any changed (`batch`, MDLM's
cache), or everything (`off`); with several caches the samples of each are compared with the
first's, and the `same` column says whether they are identical.

    python bench/decoding.py --ckpt ... --samplers ancestral --caches off batch row --steps 128 256 512

Quality is scored
after the timed region: the generative perplexity of the decoded samples under --reference (the
autoregressive baseline trained by the same trainer, as infer/evaluate.py does), and the unigram
entropy in bits of their tokens beside the held-out text's (a low entropy exposes repetition).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf
from throughput import Timer  # bench/ is the script's own folder, first on sys.path
from tqdm import tqdm

from diffusion import build_process
from infer.cli import pick_device
from modalities.text_metrics import chunks, generative_perplexity, unigram_entropy
from train.checkpoint import load_model

DEFAULT_STEPS = (8, 16, 32, 64, 128, 256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a text checkpoint directory (masked or uniform diffusion)")
    p.add_argument("--reference", default=None, help="checkpoint that scores the samples (generative perplexity)")
    p.add_argument("--samplers", nargs="+", default=None, help="default: every sampler of the model's process")
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    p.add_argument("--n", type=int, default=64, help="sequences per row")
    p.add_argument("--batch", type=int, default=64, help="sequences per sampling call")
    p.add_argument("--block", type=int, default=None, help="block length of the blocks sampler (default: its own)")
    p.add_argument("--caches", nargs="+", default=["row"], help="ancestral sampler caches: row, batch, off")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, on a GPU only")
    p.add_argument("--mc-timesteps", type=int, default=8, help="reference timesteps, if it is a diffusion model")
    p.add_argument(
        "--heldout", default=None, help="text whose unigram entropy is shown beside (default: the run's held-out split)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def counted(model_fn):
    """model_fn that counts its calls in `.calls` and the sequences it was given in `.rows`."""

    def call(xt, *args, **kwargs):
        call.calls += 1
        call.rows += xt.shape[0]
        return model_fn(xt, *args, **kwargs)

    call.calls = call.rows = 0
    return call


def table(rows: list[dict]) -> str:
    lines = [
        "| sampler | cache | steps | network calls | evaluations / sequence | sequences/s | same | gen. perplexity "
        "| unigram entropy (bits) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = "" if r["generative_perplexity"] is None else f"{r['generative_perplexity']:.1f}"
        same = {None: "", True: "yes", False: "NO"}[r["same_samples"]]
        lines.append(
            f"| {r['sampler']} | {r['cache'] or ''} | {r['steps']} | {r['network_calls']} "
            f"| {r['evaluations_per_sequence']:.1f} | {r['sequences_per_s']:.2f} | {same} | {ppl} "
            f"| {r['unigram_entropy_bits']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.precision == "bf16" and device.type != "cuda":
        raise SystemExit("--precision bf16 needs a GPU; on a CPU use fp32")
    if min(args.steps) < 1 or args.n < 1 or args.batch < 1:
        raise SystemExit(f"--steps, --n and --batch must be positive (got {args.steps}, {args.n}, {args.batch})")
    cfg, modality, model = load_model(args.ckpt, device)
    if cfg.modality.name != "text_discrete":
        raise SystemExit(f"{args.ckpt} is a {cfg.modality.name} checkpoint; decoding.py measures text models")
    process = build_process(cfg.modality.process, cfg.modality.diffusion, **modality.process_kwargs())
    samplers = args.samplers or list(process.samplers)
    unknown = [s for s in samplers if s not in process.samplers]
    if unknown:
        raise SystemExit(f"--samplers {unknown} are not samplers of {cfg.modality.process}: {list(process.samplers)}")
    options = {} if args.block is None else {"block": args.block}
    bad = sorted(set(args.caches) - {"row", "batch", "off"})
    if bad:
        raise SystemExit(f"--caches {bad}: choose from row, batch, off")
    scoring = OmegaConf.create({"seed": args.seed, "batch": args.batch, "mc_timesteps": args.mc_timesteps})
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def draw(sampler, cache, steps, n, generator):
        model_fn = counted(modality.model_fn(model))
        with autocast:
            x = process.sample(
                model_fn,
                modality.sample_shape(n),
                {},
                steps=steps,
                sampler=sampler,
                generator=generator,
                device=device,
                **options,
                **({} if cache is None else {"cache": cache}),
            )
        return x, model_fn.calls, model_fn.rows

    rows, skipped = [], []
    reference = load_model(args.reference, device) if args.reference else None
    data_entropy = unigram_entropy(modality.heldout(args.heldout).ids, modality.vocab)
    first = {}  # (sampler, steps) -> the samples of the first cache, to compare the others with
    plan = [(s, c, k) for s in samplers for c in (args.caches if s == "ancestral" else [None]) for k in args.steps]
    for sampler, cache, steps in tqdm(plan, desc="decoding", leave=False):
        generator = torch.Generator(device=device).manual_seed(args.seed)
        try:
            draw(sampler, cache, steps, min(args.batch, args.n), generator)  # warm-up: kernels, allocator
        except ValueError as err:  # a combination the sampler refuses, e.g. fewer steps than blocks
            skipped.append(f"{sampler}@{steps}")
            print(f"skipped {sampler} at {steps} steps: {err}", file=sys.stderr, flush=True)
            continue
        generator.manual_seed(args.seed)
        batches, calls, evaluated = [], [], 0
        with Timer(device) as timer:
            for i, j in chunks(args.n, args.batch):
                x, c, r = draw(sampler, cache, steps, j - i, generator)
                batches.append(x)
                calls.append(c)
                evaluated += r
        samples = torch.cat(batches)
        baseline = first.setdefault((sampler, steps), samples)
        texts = modality.decode(samples)
        row = {
            "sampler": sampler,
            "cache": cache,
            "steps": steps,
            "n": args.n,
            "batch": args.batch,
            "precision": args.precision,
            "network_calls": max(calls),
            "evaluations_per_sequence": round(evaluated / args.n, 2),
            "sequences_per_s": round(args.n / timer.seconds, 3),
            "same_samples": None if baseline is samples else bool(torch.equal(baseline, samples)),
            "generative_perplexity": (
                generative_perplexity(texts, reference, scoring, device) if reference is not None else None
            ),
            "unigram_entropy_bits": round(unigram_entropy(samples, modality.vocab), 4),
            "data_unigram_entropy_bits": round(data_entropy, 4),
            "example": texts[0][:120],
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    markdown = table(rows)
    print(markdown, end="")
    if args.out:
        Path(args.out).write_text(markdown)
    summary = f"{len(rows)} rows for {args.ckpt}"
    summary += f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else ""
    print(summary + (f"; table written to {args.out}" if args.out else ""))
    return rows


if __name__ == "__main__":
    main()
