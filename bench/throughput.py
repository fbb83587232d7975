"""Training and sampling throughput of the shared DiT, one JSON line per configuration.

    python bench/throughput.py --preset dit_xl --tokens 256 --batch 64 --precision bf16 --compile
    python bench/throughput.py --preset dit_b --tokens 4096 --batch 8 --precision bf16 --grid 16x16x16
    python bench/throughput.py --preset dit_xl --tokens 256 --batch 128 --precision bf16 --sample
    python bench/throughput.py --preset dit_xs --tokens 64 --batch 8 --steps 3        # CPU smoke run

Training: one step = forward, VP v-prediction loss, backward, AdamW step, on random latent tokens
(16 values per token, as a 2x2 patch of 4 VAE channels) with class labels.
MFU counts 6 x (12 d^2 + 2 N d) x N x depth FLOPs per sample (forward and backward) against the
device's dense bf16 peak. Sampling (--sample): DPM-Solver++(2M), classifier-free guidance with the
conditional and unconditional passes in one forward, images (sequences) per second.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

from backbones.dit import DiT, num_flops_per_token
from diffusion import build_process

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "backbone"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from the vendors' data sheets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dit_xl", help="a configs/backbone/*.yaml name")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    p.add_argument("--grid", default=None, help="token grid, e.g. 16x16 or 16x16x16 (default: square)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    p.add_argument("--compile-mode", default=None, help="e.g. max-autotune (sampling)")
    p.add_argument("--attention", default="auto", help="auto | sdpa | xformers | math")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-fused-adamw", action="store_true")
    p.add_argument("--sample", action="store_true", help="measure sampling instead of training")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--token-dim", type=int, default=16)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (sampling: timed batches)")
    return p.parse_args(argv)


def grid_positions(tokens: int, grid: str | None, device) -> torch.Tensor:
    sizes = [int(s) for s in grid.split("x")] if grid else [math.isqrt(tokens)] * 2
    if math.prod(sizes) != tokens:
        raise SystemExit(f"--grid {grid or sizes} holds {math.prod(sizes)} tokens, not --tokens {tokens}")
    axes = torch.meshgrid(*[torch.arange(s, device=device) for s in sizes], indexing="ij")
    return torch.stack(axes, dim=-1).reshape(-1, len(sizes))


class Timer:
    """CUDA events on a GPU (no host sync inside the timed region), wall clock on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    preset = OmegaConf.load(CONFIGS / f"{args.preset}.yaml")
    model = DiT(
        in_dim=args.token_dim,
        out_dim=args.token_dim,
        hidden_size=preset.hidden_size,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=preset.mlp_ratio,
        num_classes=args.classes,
        attn_backend=args.attention,
        grad_checkpointing=args.grad_checkpointing,
    ).to(device)
    if args.compile:
        model.compile_blocks(mode=args.compile_mode)
    pos = grid_positions(args.tokens, args.grid, device)
    process = build_process("gaussian", {"prediction": "v"})
    model_fn = lambda xt, t, cond: model(xt, pos, t, **cond)  # noqa: E731 - tokens are the data here
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    shape = (args.batch, args.tokens, args.token_dim)

    if args.sample:
        model.eval()
        run = lambda: process.sample(
            model_fn,
            shape,
            {"label": labels},
            steps=args.sample_steps,  # noqa: E731
            guidance=args.guidance,
            device=device,
        )
    else:
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, fused=(device.type == "cuda" and not args.no_fused_adamw) or None
        )
        x0 = torch.randn(shape, device=device)

        def run():
            with autocast:
                loss = process.loss(model_fn, x0, {"label": labels})
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad() if args.sample else torch.enable_grad(), autocast:
        for _ in range(args.warmup):
            run()
        with Timer(device) as timer:
            for _ in range(args.steps):
                run()
    per_s = args.batch * args.steps / timer.seconds
    result = {
        "mode": "sample" if args.sample else "train",
        "preset": args.preset,
        "tokens": args.tokens,
        "grid": args.grid,
        "batch": args.batch,
        "precision": args.precision,
        "compile": args.compile,
        "attention": model.blocks[0].attn.backend,
        "grad_checkpointing": args.grad_checkpointing,
        "samples_per_s": round(per_s, 2),
        "tokens_per_s": round(per_s * args.tokens),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    }
    if args.sample:
        result.update(sample_steps=args.sample_steps, guidance=args.guidance)
    else:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result["device"]), None)
        flops = num_flops_per_token(preset.hidden_size, preset.depth, args.tokens) * args.tokens * per_s
        result["tflops"] = round(flops / 1e12, 2)
        result["mfu"] = round(flops / 1e12 / peak, 4) if peak else None
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
