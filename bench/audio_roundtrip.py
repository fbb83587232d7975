"""Griffin-Lim round-trip quality on real held-out clips: each clip is encoded to the audio
modality's normalised log-mel and decoded back (mel inversion + Griffin-Lim), then compared with
the original by the log-spectral distance (dB) and the multi-resolution STFT distance. A baseline
for any later vocoder. Prints one JSON line, then a Markdown table row.

    python bench/audio_roundtrip.py /data/fsdd/recordings
    python bench/audio_roundtrip.py /data/fsdd/recordings --clips 100 --iters 16 32 64

The clips are the first --clips of the held-out split (FSDD names: the held-out speaker). The
spectrogram statistics come from the training split, as in training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omegaconf import OmegaConf

from modalities.audio import Audio, AudioConfig
from modalities.audio_metrics import griffin_lim_roundtrip, readable_clips
from train.config import DataConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a folder of audio files (modality.dataset=folder)")
    p.add_argument("--clips", type=int, default=50, help="held-out clips to round-trip")
    p.add_argument("--iters", type=int, nargs="+", default=[32], help="Griffin-Lim iterations, one row each")
    p.add_argument("--labels", default="prefix", help="modality.labels: prefix | folder")
    p.add_argument("--set", nargs="*", default=[], help="further modality keys, e.g. n_mels=64 seconds=1")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    overrides = OmegaConf.from_dotlist(["dataset=folder", f"labels={args.labels}", *args.set])
    cfg = OmegaConf.merge(OmegaConf.structured(AudioConfig), overrides)
    data = DataConfig(path=args.folder)
    modality = Audio(cfg, patch=1, data=data)
    cfg = OmegaConf.merge(cfg, modality.resolve(modality.dataset("train")))
    clips = readable_clips(Audio(cfg, patch=1, data=data).dataset("test"), args.clips)
    print("| mel bins | Griffin-Lim iterations | clips | log-spectral distance (dB) | MR-STFT distance | s/clip |")
    print("|---|---|---|---|---|---|")
    for iters in args.iters:
        modality = Audio(OmegaConf.merge(cfg, {"griffin_lim_iters": iters}), patch=1, data=data)
        t0 = time.perf_counter()
        result = griffin_lim_roundtrip(modality, clips)
        seconds = (time.perf_counter() - t0) / len(clips)
        row = {"folder": args.folder, "n_mels": cfg.n_mels, "griffin_lim_iters": iters, **result}
        print(json.dumps(row | {"seconds_per_clip": seconds}), file=sys.stderr)
        print(
            f"| {cfg.n_mels} | {iters} | {result['clips']} | {result['log_spectral_distance_db']:.2f} "
            f"| {result['mr_stft_distance']:.3f} | {seconds:.4f} |"
        )


if __name__ == "__main__":
    main()
