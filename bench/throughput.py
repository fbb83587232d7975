"""Training and sampling throughput of the shared DiT, one JSON line per configuration.

    python bench/throughput.py --preset dit_xl --tokens 256 --batch 64 --precision bf16 --compile
    python bench/throughput.py --preset dit_b --tokens 4096 --batch 8 --precision bf16 --grid 16x16x16
    python bench/throughput.py --preset dit_xl --tokens 256 --batch 128 --precision bf16 --sample
    python bench/throughput.py --preset dit_b --longest-clip 16x16 --layout factorized --grad-checkpointing
    python bench/throughput.py --preset dit_xs --tokens 64 --batch 8 --steps 3        # CPU smoke run
    python bench/throughput.py --preset dit_xs --clip-sweep 8x8 --batch 1 --precision fp32 --steps 2

Training: one step = forward, VP v-prediction loss, backward, AdamW step, on random latent tokens
(16 values per token, as a 2x2 patch of 4 VAE channels) with class labels.
MFU counts 6 x (12 d^2 + 2 N d) x N x depth FLOPs per sample (forward and backward) against the
device's dense bf16 peak. Sampling (--sample): DPM-Solver++(2M), classifier-free guidance with the
conditional and unconditional passes in one forward, images (sequences) per second.
Longest clip (--longest-clip HxW): the most frames of HxW tokens whose training step fits in the
GPU's memory at --batch (doubling, then bisection; every try runs two full steps).
Clip sweep (--clip-sweep HxW): full against factorized attention on clips of --sweep-frames frames
of HxW tokens, each configuration in its own process, so each peak memory is its own: peak
resident memory of the process (CPU; it includes the ~0.3-0.5 GiB of PyTorch itself) or peak
allocated GPU memory, and the training step time; one JSON line each, then a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from omegaconf import OmegaConf

from backbones.dit import DiT, num_flops_per_token
from diffusion import build_process
from train.train import adamw

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "backbone"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from the vendors' data sheets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dit_xl", help="a configs/backbone/*.yaml name")
    p.add_argument("--tokens", type=int, default=256, help="tokens per sample")
    p.add_argument("--grid", default=None, help="token grid, e.g. 16x16 or 16x16x16 (default: square)")
    p.add_argument("--batch", type=int, default=None, help="default: 64, or 1 with --longest-clip")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="bf16")
    p.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
    p.add_argument("--compile-mode", default=None, help="e.g. max-autotune (sampling)")
    p.add_argument("--attention", default="auto", help="auto | sdpa | xformers | math")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--layout", default="full", help="full | factorized (alternating within/across-frame attention)")
    p.add_argument("--longest-clip", metavar="HxW", default=None, help="find the most frames of HxW tokens that train")
    p.add_argument("--max-frames", type=int, default=1024, help="--longest-clip: stop the search here")
    p.add_argument("--clip-sweep", metavar="HxW", default=None, help="full vs factorized as clips grow")
    p.add_argument("--sweep-frames", default="8,16,32,64", help="--clip-sweep: frame counts")
    p.add_argument("--no-fused-adamw", action="store_true")
    p.add_argument("--sample", action="store_true", help="measure sampling instead of training")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--token-dim", type=int, default=16)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps (sampling: timed batches)")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 1 if args.longest_clip or args.clip_sweep else 64
    return args


def grid_positions(tokens: int, grid: str | None, device) -> torch.Tensor:
    sizes = [int(s) for s in grid.split("x")] if grid else [math.isqrt(tokens)] * 2
    if math.prod(sizes) != tokens:
        raise SystemExit(f"--grid {grid or sizes} holds {math.prod(sizes)} tokens, not --tokens {tokens}")
    if any(s < 1 for s in sizes):
        raise SystemExit(f"--grid {grid}: every size must be at least 1")
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


def build_model(args, preset, device) -> DiT:
    model = DiT(
        in_dim=args.token_dim,
        out_dim=args.token_dim,
        hidden_size=preset.hidden_size,
        depth=preset.depth,
        num_heads=preset.num_heads,
        mlp_ratio=preset.mlp_ratio,
        num_classes=args.classes,
        attn_backend=args.attention,
        layout=args.layout,
        grad_checkpointing=args.grad_checkpointing,
    ).to(device)
    if args.compile:
        model.compile_blocks(mode=args.compile_mode)
    return model


class Bench:
    """One model and optimizer; `step(tokens, grid)` and `sampler(tokens, grid)` make the timed work."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.preset = OmegaConf.load(CONFIGS / f"{args.preset}.yaml")
        self.model = build_model(args, self.preset, device)
        self.process = build_process("gaussian", {"prediction": "v"})
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
        self.labels = torch.randint(0, args.classes, (args.batch,), device=device)
        self.optimizer = None

    def model_fn(self, pos):
        return lambda xt, t, cond: self.model(xt, pos, t, **cond)  # tokens are the data here

    def step(self, tokens: int, grid: str | None):
        """A training step: forward, loss, backward, AdamW."""
        if self.optimizer is None:
            fused = not self.args.no_fused_adamw
            self.optimizer = adamw(self.model.parameters(), self.device.type, lr=1e-4, fused=fused)
        model_fn = self.model_fn(grid_positions(tokens, grid, self.device))
        x0 = torch.randn(self.args.batch, tokens, self.args.token_dim, device=self.device)

        def run():
            with self.autocast:
                loss = self.process.loss(model_fn, x0, {"label": self.labels})
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        return run

    def sampler(self, tokens: int, grid: str | None):
        """One batch of guided DPM-Solver++(2M) samples."""
        self.model.eval()
        model_fn = self.model_fn(grid_positions(tokens, grid, self.device))
        shape = (self.args.batch, tokens, self.args.token_dim)

        def run():
            with torch.no_grad(), self.autocast:
                self.process.sample(
                    model_fn,
                    shape,
                    {"label": self.labels},
                    steps=self.args.sample_steps,
                    guidance=self.args.guidance,
                    device=self.device,
                )

        return run


def largest_fitting(fits, cap: int) -> int:
    """The largest n in [1, cap] with fits(n) true, for a monotone fits (0 when even 1 fails):
    doubling until the first failure, then bisection, so O(log n) tries."""
    good, n = 0, 1
    while True:
        n = min(n, cap)
        if not fits(n):
            break
        good = n
        if n == cap:
            return cap
        n *= 2
    while n - good > 1:  # fits(good) and not fits(n)
        mid = (good + n) // 2
        good, n = (mid, n) if fits(mid) else (good, mid)
    return good


def longest_clip(args, bench: Bench, device) -> dict:
    """The most frames of an HxW token grid whose training step fits in memory at args.batch."""
    h, w = (int(v) for v in args.longest_clip.split("x"))
    peaks = {}

    def fits(frames: int) -> bool:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run = bench.step(frames * h * w, f"{frames}x{h}x{w}")
            run()
            run()  # the second step holds the optimizer state too
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[frames] = torch.cuda.max_memory_allocated() / 2**30
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            bench.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    frames = largest_fitting(fits, args.max_frames)
    return {
        "mode": "longest_clip",
        "preset": args.preset,
        "frame": args.longest_clip,
        "layout": args.layout,
        "batch": args.batch,
        "precision": args.precision,
        "grad_checkpointing": args.grad_checkpointing,
        "max_frames": frames,
        "max_tokens": frames * h * w,
        "hit_max_frames": frames == args.max_frames,
        "peak_mem_gib": round(peaks[frames], 2) if frames in peaks else None,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def clip_sweep(args, argv: list[str]) -> list[dict]:
    """Train-step time and peak memory for each layout and frame count, each in a fresh process
    (a process's peak resident memory never goes down, so configurations cannot share one)."""
    h, w = (int(v) for v in args.clip_sweep.split("x"))
    passed, skip = [], False  # the child gets this command line minus the sweep's own options
    for a in argv:
        if skip or a.startswith(("--clip-sweep", "--sweep-frames", "--layout", "--tokens", "--grid")):
            skip = not skip and "=" not in a
            continue
        passed.append(a)
    rows = []
    for frames in (int(f) for f in args.sweep_frames.split(",")):
        for layout in ("full", "factorized"):
            grid = f"{frames}x{h}x{w}"
            child = [sys.executable, __file__, *passed, "--layout", layout, "--tokens", str(frames * h * w)]
            out = subprocess.run([*child, "--grid", grid], capture_output=True, text=True)
            if out.returncode:
                row = {"grid": grid, "layout": layout, "error": out.stderr.strip().splitlines()[-1]}
            else:
                row = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    memory = "peak_mem_gib" if rows[0].get("peak_mem_gib") is not None else "peak_rss_gib"
    print(f"\n| frames x {args.clip_sweep} tokens | layout | step time (s) | {memory} |\n|---|---|---|---|")
    for row in rows:
        step = round(args.batch / row["samples_per_s"], 3) if "samples_per_s" in row else row["error"]
        print(f"| {row['grid']} | {row['layout']} | {step} | {row.get(memory)} |")
    return rows


def attended_tokens(args) -> float:
    """Keys each query sees, averaged over blocks: all tokens, or for the factorized layout half the
    blocks see one frame (S tokens) and half one position through time (F frames)."""
    if args.layout != "factorized":
        return args.tokens
    frames = int(args.grid.split("x")[0]) if args.grid else math.isqrt(args.tokens)
    return (args.tokens // frames + frames) / 2


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.precision != "fp32"
    if args.clip_sweep:
        return clip_sweep(args, sys.argv[1:] if argv is None else argv)
    bench = Bench(args, device)
    if args.longest_clip:
        result = longest_clip(args, bench, device)
        print(json.dumps(result), flush=True)
        return result

    run = bench.sampler(args.tokens, args.grid) if args.sample else bench.step(args.tokens, args.grid)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        run()
    with Timer(device) as timer:
        for _ in range(args.steps):
            run()
    per_s = args.batch * args.steps / timer.seconds
    model, preset = bench.model, bench.preset
    result = {
        "mode": "sample" if args.sample else "train",
        "preset": args.preset,
        "tokens": args.tokens,
        "grid": args.grid,
        "batch": args.batch,
        "precision": args.precision,
        "compile": args.compile,
        "attention": model.blocks[0].attn.backend,
        "layout": args.layout,
        "grad_checkpointing": args.grad_checkpointing,
        "samples_per_s": round(per_s, 2),
        "tokens_per_s": round(per_s * args.tokens),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),  # ru_maxrss: KiB
    }
    if args.sample:
        result.update(sample_steps=args.sample_steps, guidance=args.guidance)
    else:
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result["device"]), None)
        flops = num_flops_per_token(preset.hidden_size, preset.depth, attended_tokens(args)) * args.tokens * per_s
        result["tflops"] = round(flops / 1e12, 2)
        result["mfu"] = round(flops / 1e12 / peak, 4) if peak else None
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
