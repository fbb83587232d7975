"""Cost of one training step and one guided sampling step of polydiff's DiT against the public
implementations, at identical shapes, on one machine in one run.

Contenders (each built at the same width, depth, heads, patch, latent size and 1000 classes):

- polydiff: backbones/dit.py, with the image modality's patching (einops) and its defaults
  (sincos positions added to the tokens, QK-norm, `--attention` backend);
- facebookresearch/DiT: `models.py` of a local checkout given as `--dit-repo` (loaded at run time,
  never vendored; it imports timm), built with learn_sigma=False so that all three predict 4 channels;
- diffusers: `DiTTransformer2DModel` (ada_norm_zero), built from its config, no weights downloaded.

A training step is forward, MSE loss against a fixed target, backward and AdamW, each contender's
AdamW as its own training code builds it (polydiff's trainer: fused where the device has the kernel;
facebookresearch/DiT's train.py: torch's defaults, a loop over the tensors on a CPU; `--loop-adamw`
adds polydiff with torch's defaults, which tells the optimizer's share from the model's); a sampling step
is one forward of the doubled batch for classifier-free guidance and the guided combination (the
reference DiT's own `forward_with_cfg`). Contenders alternate in rounds (the order rotated every
round, after untimed warm-up steps) so that drifts of the machine hit all alike; reported are the
median and the interquartile range in milliseconds, and each contender's ratio to the faster
reference.

    python bench/reference_step.py --dit-repo /path/to/DiT                      # DiT-S/2 and DiT-B/2, 64 and 256 tokens
    python bench/reference_step.py --dit-repo ... --presets S --tokens 64 --rounds 5 --out bench/ref.md
    python bench/reference_step.py --dit-repo ... --precision bf16              # on a GPU
    python bench/reference_step.py --dit-repo ... --plain --rope  # also without QK-norm; with rotary positions
    python bench/reference_step.py --dit-repo ... --loop-adamw  # also polydiff with torch's default AdamW
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf
from throughput import Timer  # bench/ is the script's own folder, first on sys.path

from backbones.dit import DiT
from diffusion.guidance import guided
from infer.cli import pick_device
from modalities.image import Image, ImageConfig
from train.train import adamw

PRESETS = {"S": (384, 12, 6), "B": (768, 12, 12)}  # DiT-S/2 and DiT-B/2: width, depth, heads (Peebles & Xie 2023)
CHANNELS, PATCH, CLASSES = 4, 2, 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-repo", default=None, help="a checkout of facebookresearch/DiT (its models.py)")
    p.add_argument("--presets", nargs="+", default=["S", "B"], help="S, B, or WIDTHxDEPTHxHEADS")
    p.add_argument("--tokens", nargs="+", type=int, default=[64, 256], help="tokens per image: (latent/2)^2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per contender and shape")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    p.add_argument("--attention", default="auto", help="polydiff's attention backend (auto, sdpa, math, xformers)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, GPU only")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--plain", action="store_true", help="add polydiff without QK-norm (what the references lack)")
    p.add_argument("--rope", action="store_true", help="add polydiff with rotary positions (other modalities' default)")
    p.add_argument("--loop-adamw", action="store_true", help="add polydiff with torch's default AdamW (not fused)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    return p.parse_args(argv)


def shape_of(preset: str) -> tuple[int, int, int]:
    if preset in PRESETS:
        return PRESETS[preset]
    try:
        width, depth, heads = (int(v) for v in preset.split("x"))
    except ValueError:
        raise SystemExit(f"--presets {preset!r}: use S, B or WIDTHxDEPTHxHEADS (e.g. 384x12x6)") from None
    return width, depth, heads


def latent_side(tokens: int) -> int:
    side = round((tokens**0.5) * PATCH)
    if (side // PATCH) ** 2 != tokens:
        raise SystemExit(f"--tokens {tokens} is not a square number of {PATCH}x{PATCH} patches")
    return side


class Polydiff(torch.nn.Module):
    """polydiff's DiT behind the image modality's own patching (its model_fn): (B, C, H, W) -> (B, C, H, W),
    with the image modality's positions (sincos) and QK-norm. variant "plain": without QK-norm, which
    the references lack, to tell its cost from the implementation's; "rope": rotary positions, the
    default of the other modalities; "loop_adamw": trained with torch's default AdamW (the references'),
    not the fused one of polydiff's trainer."""

    NAMES = {
        None: "polydiff",
        "plain": "polydiff, no QK-norm",
        "rope": "polydiff, rotary positions",
        "loop_adamw": "polydiff, torch's default AdamW",
    }

    def __init__(self, width, depth, heads, side, attention, variant=None):
        super().__init__()
        self.name = self.NAMES[variant]
        self.fused_adamw = variant != "loop_adamw"
        cfg = OmegaConf.structured(ImageConfig(size=side, channels=CHANNELS, classes=[str(i) for i in range(CLASSES)]))
        self.image = Image(cfg, PATCH)
        pos = "rope" if variant == "rope" else self.image.positions
        kwargs = self.image.backbone_kwargs()  # in and out widths, 1000 classes
        self.dit = DiT(
            hidden_size=width,
            depth=depth,
            num_heads=heads,
            attn_backend=attention,
            pos=pos,
            qk_norm=variant != "plain",
            **kwargs,
        )
        self.model_fn = self.image.model_fn(self.dit)

    def forward(self, x, t, y, drop=None):
        return self.model_fn(x, t, {"label": y, "drop": drop})

    def guided(self, x, t, y, scale):
        return guided(self.model_fn, scale, {"label": y})(x, t, {"label": y})


class Reference(torch.nn.Module):
    """facebookresearch/DiT's models.DiT, timesteps in [0, 1000)."""

    name = "facebookresearch/DiT"

    def __init__(self, models, width, depth, heads, side):
        super().__init__()
        self.net = models.DiT(
            input_size=side,
            patch_size=PATCH,
            in_channels=CHANNELS,
            hidden_size=width,
            depth=depth,
            num_heads=heads,
            num_classes=CLASSES,
            learn_sigma=False,
        )

    def forward(self, x, t, y):
        return self.net(x, t * 1000, y)

    def guided(self, x, t, y, scale):
        null = torch.full_like(y, CLASSES)
        return self.net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]) * 1000, torch.cat([y, null]), scale)


class Diffusers(torch.nn.Module):
    """diffusers' DiTTransformer2DModel (adaLN-Zero), timesteps in [0, 1000)."""

    name = "diffusers"

    def __init__(self, width, depth, heads, side):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.net = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=CHANNELS,
            out_channels=CHANNELS,
            num_layers=depth,
            sample_size=side,
            patch_size=PATCH,
            num_embeds_ada_norm=CLASSES,
            norm_type="ada_norm_zero",
        )

    def forward(self, x, t, y):
        return self.net(x, timestep=t * 1000, class_labels=y).sample

    def guided(self, x, t, y, scale):
        null = torch.full_like(y, CLASSES)  # diffusers' label embedder keeps index num_classes for "no label"
        c, u = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        return u + scale * (c - u)


def load_reference_models(repo: str | None):
    """models.py of a facebookresearch/DiT checkout, or (None, why not)."""
    if repo is None:
        return None, "no --dit-repo given"
    path = Path(repo) / "models.py"
    if not path.is_file():
        return None, f"{path} does not exist"
    spec = importlib.util.spec_from_file_location("dit_reference_models", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:  # models.py imports timm
        return None, f"{path} does not import ({err}); it needs `pip install timm`"
    return module, None


def contenders(args, width, depth, heads, side, reference_models):
    made = [Polydiff(width, depth, heads, side, args.attention)]
    variants = [v for v in ("plain", "rope", "loop_adamw") if getattr(args, v)]
    made += [Polydiff(width, depth, heads, side, args.attention, v) for v in variants]
    if reference_models is not None:
        made.append(Reference(reference_models, width, depth, heads, side))
    made.append(Diffusers(width, depth, heads, side))
    return made


class Work:
    """One contender's model, optimizer and inputs; train() and sample() are the timed steps."""

    def __init__(self, model, args, side, device, generator):
        self.model, self.args = model.to(device), args
        if getattr(model, "fused_adamw", False):
            self.optimizer = adamw(model.parameters(), device.type, lr=1e-4)  # as polydiff's trainer builds it
        else:  # as facebookresearch/DiT's train.py builds it: torch's defaults (on a CPU, a loop over tensors)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        b = args.batch
        self.x = torch.randn(b, CHANNELS, side, side, generator=generator).to(device)
        self.target = torch.randn(b, CHANNELS, side, side, generator=generator).to(device)
        self.t = torch.rand(b, generator=generator).to(device)
        self.y = torch.randint(CLASSES, (b,), generator=generator).to(device)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def train(self):
        self.model.train()
        with self.autocast:
            loss = (self.model(self.x, self.t, self.y).float() - self.target).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sample(self):
        self.model.eval()
        with self.autocast:
            return self.model.guided(self.x, self.t, self.y, self.args.guidance)


def timed_rounds(works: list[Work], kind: str, args, device) -> dict[str, list[float]]:
    """Milliseconds per step of `kind` for each contender, alternating in rotated rounds."""
    for w in works:
        for _ in range(args.warmup):
            getattr(w, kind)()
    times = {w.model.name: [] for w in works}
    for r in range(args.rounds):
        for w in works[r % len(works) :] + works[: r % len(works)]:
            with Timer(device) as timer:
                getattr(w, kind)()
            times[w.model.name].append(timer.seconds * 1000)
    return times


def summarise(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_ms": round(statistics.median(times), 2), "q1_ms": round(q[0], 2), "q3_ms": round(q[2], 2)}


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | tokens | step | contender | parameters | median ms | IQR ms | / faster reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['step']} | {r['contender']} | {r['parameters'] / 1e6:.2f}M "
            f"| {r['median_ms']:.1f} | {r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.precision == "bf16" and device.type != "cuda":
        raise SystemExit("--precision bf16 needs a GPU; on a CPU use fp32")
    if args.rounds < 1 or args.batch < 1:
        raise SystemExit(f"--rounds and --batch must be positive (got {args.rounds}, {args.batch})")
    reference_models, why = load_reference_models(args.dit_repo)
    if why:
        print(f"skipping facebookresearch/DiT: {why}", flush=True)
    rows = []
    for preset in args.presets:
        width, depth, heads = shape_of(preset)
        for tokens in args.tokens:
            side = latent_side(tokens)
            generator = torch.Generator().manual_seed(args.seed)
            works = []
            for model in contenders(args, width, depth, heads, side, reference_models):
                works.append(Work(model, args, side, device, generator.manual_seed(args.seed)))
            for kind in ("train", "sample"):
                times = timed_rounds(works, kind, args, device)
                stats = {name: summarise(t) for name, t in times.items()}
                references = [s["median_ms"] for name, s in stats.items() if not name.startswith("polydiff")]
                fastest = min(references) if references else None
                for w in works:
                    name = w.model.name
                    row = {
                        "shape": f"{preset} ({width}x{depth}, {heads} heads)",
                        "tokens": tokens,
                        "step": "training" if kind == "train" else f"sampling, guidance {args.guidance:g}",
                        "contender": name,
                        "parameters": sum(p.numel() for p in w.model.parameters() if p.requires_grad),
                        **stats[name],
                        "ratio": None if fastest is None else round(stats[name]["median_ms"] / fastest, 3),
                        "batch": args.batch,
                        "precision": args.precision,
                        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                        "threads": torch.get_num_threads(),
                        "adamw": "fused" if w.optimizer.defaults.get("fused") else "torch default",
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    markdown = table(rows)
    print(markdown, end="")
    if args.out:
        Path(args.out).write_text(markdown)
    print(f"{len(rows)} rows" + (f"; table written to {args.out}" if args.out else ""))
    return rows


if __name__ == "__main__":
    main()
