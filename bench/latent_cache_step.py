"""Training step time of a latent image DiT with and without the latent cache (data.cache_latents).

    python bench/latent_cache_step.py --vae runs/vae/checkpoints/last
    python bench/latent_cache_step.py --vae ... --rounds 5 --steps 10 -- modality.condition=caption backbone=dit_s

One step is what the trainer's loop does for a batch: fetch it (drawing or decoding images, or reading
cached posterior moments), encode it (the frozen VAE, or nothing), the caption encoder when captions are
on, the loss, backward and an AdamW step. Both set-ups are built first (the cache is encoded or reused
then, untimed); their steps then alternate in rounds of --steps, so that a machine shared with other
work slows both alike. Prints one JSON line per set-up (median and interquartile range of ms per step)
and the ratio of the medians. Extra Hydra overrides after `--` shape the run as for train/train.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from modalities import build_modality
from modalities.data import Tolerant, collate
from train.config import CONFIG_DIR, register_schemas, validate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="modality.vae: a diffusers AutoencoderKL folder or a VAE checkpoint")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per set-up")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (after one untimed step)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. backbone=dit_s batch_size=64")
    return p.parse_args(argv)


class Setup:
    """One training set-up (cached or not) whose steps can be run and timed a round at a time."""

    def __init__(self, overrides: list[str]):
        register_schemas()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name="train", overrides=overrides)
        validate(cfg)
        modality = build_modality(cfg.modality, cfg.backbone.patch, cfg.data)
        train_set = modality.dataset("train")
        OmegaConf.set_struct(cfg, False)
        cfg.modality = OmegaConf.merge(cfg.modality, modality.resolve(train_set))
        self.modality = build_modality(cfg.modality, cfg.backbone.patch, cfg.data)
        self.model = self.modality.build_model(cfg).train()
        self.process = self.modality.noise_process()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        loader = DataLoader(
            Tolerant(train_set), cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate, num_workers=0
        )
        self.loader, self.batches = loader, iter(loader)
        self.generator = torch.Generator().manual_seed(0)

    def step(self):
        batch = next(self.batches, None)
        if batch is None:  # the epoch ran out: start another
            self.batches = iter(self.loader)
            batch = next(self.batches)
        cond = self.modality.cond(batch)
        loss = self.modality.loss(self.process, self.model, batch, cond, generator=self.generator)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def round(self, steps: int) -> list[float]:
        """Seconds per step of `steps` steps, after one untimed step."""
        self.step()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - start)
        return times


def main(argv=None) -> dict:
    args = parse_args(argv)
    common = ["modality=image", "modality.space=latent", f"modality.vae={args.vae}", *args.overrides]
    setups = {"no_cache": Setup(common), "cache": Setup([*common, "data.cache_latents=true"])}
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            times[name] += setup.round(args.steps)
    result = {}
    for name, seconds in times.items():
        q1, median, q3 = statistics.quantiles([1000 * s for s in seconds], n=4)
        result[name] = median
        print(json.dumps({"setup": name, "ms_per_step": round(median, 2), "iqr": [round(q1, 2), round(q3, 2)]}))
    result["ratio"] = result["no_cache"] / result["cache"]
    print(f"step time without / with the latent cache: {result['ratio']:.2f}x ({args.rounds} rounds of {args.steps})")
    return result


if __name__ == "__main__":
    main()
