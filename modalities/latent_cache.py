"""The latent cache (data.cache_latents=true): a data set encoded once by the frozen VAE into
sharded safetensors files, so that training reads latents instead of running the encoder on every
batch.

    <cache>/latents-<data key>/
        key.json                    what the latents were made from: data, VAE weights, size
        shard_00000.safetensors     "moments" (n, 2c, [T,] h, w) posterior mean and log-variance, "label" (n,)
        captions.json               the items' captions, in order
        skipped.json                items that could not be read while encoding ("path: reason")

The folder is named by where the data comes from (data set, path, size, split); key.json adds a
fingerprint of the data's contents and of the VAE's weights and config. A cache whose key.json matches
is reused; one that differs (changed files, another VAE, retrained weights) is rebuilt in place, with a
message saying what changed. The posterior's moments rather than
latents are stored, so that modality.latent=sample still draws fresh noise each epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from modalities.data import Tolerant, collate

SHARD = 4096  # items per safetensors file


def cache_root() -> Path:
    """Where polydiff caches what it computes once (POLYDIFF_CACHE, else ~/.cache/polydiff)."""
    return Path(os.environ.get("POLYDIFF_CACHE") or Path.home() / ".cache" / "polydiff")


class LatentCache(Dataset):
    """The items of `dataset` as {"moments", "label", "caption"}, encoded by `codec` once and read
    back from disk on later runs.

    Args:
        dataset: the pixel data set (items {"x", "label", "caption"}, with `classes` and `fingerprint()`).
        codec: the modalities.latents.LatentCodec that encodes.
        identity: where the data comes from (data set, path, size, split): names the folder; the key adds
            the data set's fingerprint() (its contents) and the VAE's.
        device: where to run the encoder while building.
    """

    def __init__(self, dataset, codec, identity: dict, device="cpu", batch: int = 64):
        self.classes = dataset.classes
        name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = cache_root() / f"latents-{name}"
        key = {**identity, "data": dataset.fingerprint(), "vae": codec.fingerprint(), "vae_folder": str(codec.folder)}
        found = self.folder / "key.json"
        old = json.loads(found.read_text()) if found.exists() else None
        if old != key:
            if old is None:
                print(f"latent cache: encoding {len(dataset)} items into {self.folder}")
            else:
                changed = sorted(k for k in set(key) | set(old) if key.get(k) != old.get(k))
                print(f"latent cache: {self.folder} was made with other {', '.join(changed)}; rebuilding it")
            self._build(dataset, codec, key, device, batch)
        else:
            print(f"latent cache: reusing {self.folder}")
        shards = sorted(self.folder.glob("shard_*.safetensors"))
        tensors = [load_file(path) for path in shards]
        self.moments = torch.cat([t["moments"] for t in tensors])
        self.labels = torch.cat([t["label"] for t in tensors])
        self.captions = json.loads((self.folder / "captions.json").read_text())
        self.skipped = json.loads((self.folder / "skipped.json").read_text())

    def _build(self, dataset, codec, key: dict, device, batch: int):
        """Encode every readable item; written under a temporary name and renamed into place, so a
        run killed mid-way leaves no half cache that looks whole."""
        tmp = self.folder.with_name(f"{self.folder.name}.tmp-{os.getpid()}")  # one per process: they may race
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        loader = DataLoader(Tolerant(dataset), batch_size=batch, collate_fn=collate)
        moments, labels, captions, skipped = [], [], [], list(getattr(dataset, "skipped", []))
        for b in tqdm(loader, desc="encoding latents"):
            skipped += b["bad"]
            if b["n"]:
                moments.append(codec.moments(b["x"].to(device)).cpu())
                labels.append(b["label"])
                captions += list(b["caption"]) if "caption" in b else [""] * b["n"]  # video items have none
        moments, labels = torch.cat(moments), torch.cat(labels)
        for i, start in enumerate(range(0, len(labels), SHARD)):
            shard = {"moments": moments[start : start + SHARD], "label": labels[start : start + SHARD]}
            save_file({k: v.contiguous() for k, v in shard.items()}, tmp / f"shard_{i:05d}.safetensors")
        (tmp / "captions.json").write_text(json.dumps(captions))
        (tmp / "skipped.json").write_text(json.dumps(skipped))
        (tmp / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.replace(tmp, self.folder)
        except OSError:  # another process put the same cache in place first
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"moments": self.moments[i], "label": int(self.labels[i]), "caption": self.captions[i]}
