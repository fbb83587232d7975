"""How much a class-conditional model uses its label, noise level by noise level.

Held-out items (the modality's test split) are noised at each --t with one fixed noise draw, and the
mean squared error of the model's x0 estimate is measured three ways: with the right labels, with the
labels shuffled among the items, and with the null label (the condition that classifier-free
guidance moves away from). A model that draws its classes needs the label most at high noise, where
the class is decided; if the three errors agree there, it has not learnt what the classes look
like, however low its loss.

    python bench/condition_use.py --ckpt runs/<run>/checkpoints/last --t 0.3 0.5 0.7 0.85 0.95
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import default_collate

from infer.cli import pick_device
from train.checkpoint import load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a checkpoint of a label-conditioned continuous model")
    p.add_argument("--t", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.85, 0.95], help="process times")
    p.add_argument("--n", type=int, default=64, help="held-out items (the first n of the test split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    return p.parse_args(argv)


@torch.no_grad()
def condition_use(ckpt, times, n: int = 64, seed: int = 0, device="cpu") -> list[dict]:
    """One row per time: t, sigma and the x0 MSE with the right, shuffled and null labels."""
    cfg, modality, model = load_model(ckpt, device)
    process = modality.noise_process()
    if not hasattr(process, "corrupt"):
        raise SystemExit(
            f"{ckpt}: a {cfg.modality.name} model with a {cfg.modality.process} process has no x0 estimate"
        )
    test = modality.dataset("test")
    batch = default_collate([test[i] for i in range(min(n, len(test)))])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    cond = modality.cond(batch)
    if "label" not in cond:
        raise SystemExit(f"{ckpt}: this {cfg.modality.name} model takes no class label")
    x0, labels = modality.encode(batch).float(), cond["label"]
    generator = torch.Generator(device=device).manual_seed(seed)
    eps = torch.randn(x0.shape, generator=generator, device=device)
    shuffled = labels[torch.randperm(len(labels), generator=generator, device=device)]
    null = torch.ones(len(labels), dtype=torch.bool, device=device)
    model_fn, rows = modality.model_fn(model), []
    for t_value in times:
        t = torch.full((len(labels),), float(t_value), device=device)
        xt = process.corrupt(x0, t, eps)
        xt = xt[0] if isinstance(xt, tuple) else xt  # GaussianVP also returns alpha and sigma
        row = {"t": float(t_value), "sigma": process.sigma_of_t(t[:1].double()).item()}
        for name, given in (("right", {"label": labels}), ("shuffled", {"label": shuffled})):
            row[name] = (process.to_x0(model_fn(xt, t, {**cond, **given}), xt, t) - x0).pow(2).mean().item()
        row["null"] = (process.to_x0(model_fn(xt, t, {**cond, "drop": null}), xt, t) - x0).pow(2).mean().item()
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| t | sigma | x0 MSE, right label | shuffled labels | null label | right vs null |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = 1 - r["right"] / r["null"] if r["null"] > 0 else float("nan")
        lines.append(
            f"| {r['t']:.2f} | {r['sigma']:.2f} | {r['right']:.4f} | {r['shuffled']:.4f} | {r['null']:.4f} "
            f"| {gain:+.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = condition_use(args.ckpt, args.t, args.n, args.seed, pick_device(args.device))
    text = table(rows)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
        print(f"table written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
