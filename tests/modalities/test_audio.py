import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion import build_process
from modalities.audio import Audio, AudioConfig
from modalities.audio_data import AudioFolder, Tones
from modalities.audio_metrics import log_spectral_distance
from modalities.data import Tolerant, collate
from modalities.media import read_audio
from tests.conftest import compose_cfg
from train.checkpoint import load_model
from train.config import DataConfig

FSDD = Path(__file__).resolve().parents[3] / "shared" / "data" / "fsdd" / "recordings"
ROUNDTRIP_LSD_DB = 9.0  # Griffin-Lim round trip of held-out FSDD clips measures about 6 dB (bench/audio_roundtrip.py)

# A model and clips small enough for two CPU cores: dit_xs on 16 mel bins x 32 frames, 4x4 patches.
TINY_AUDIO = [
    "modality=audio",
    "backbone=dit_xs",
    "backbone.patch=4",
    "modality.seconds=0.512",
    "modality.n_mels=16",
    "modality.tones_items=256",
    "modality.griffin_lim_iters=4",
    "steps=60",
    "batch_size=16",
    "num_workers=0",
    "log_every=10",
    "save_every=1000",
    "sample.every=0",
    "optim.warmup_steps=10",
    "optim.lr=2e-3",
]


def write_wav(path, samples: np.ndarray, rate: int):
    """(samples,) or (samples, channels) floats in [-1, 1] as 16-bit PCM."""
    samples = samples.reshape(len(samples), -1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[1])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((samples * 32767).round().astype("<i2").tobytes())


def audio(tmp_path=None, **keys):
    cfg = OmegaConf.merge(OmegaConf.structured(AudioConfig), keys)
    return Audio(cfg, patch=2, data=DataConfig(path=str(tmp_path)) if tmp_path else None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from train.train import train

    out = tmp_path_factory.mktemp("runs")
    return train(compose_cfg([*TINY_AUDIO, f"out_dir={out}", "name=a"]))


@pytest.mark.skipif(not FSDD.exists(), reason="../shared/data/fsdd not present")
def test_real_fsdd_wav_loads_at_the_configured_rate_and_length():
    path = FSDD / "7_jackson_12.wav"
    with wave.open(str(path)) as f:
        frames, rate = f.getnframes(), f.getframerate()
    assert rate == 8000 and abs(len(read_audio(path, 8000)) - frames) <= 1
    assert abs(len(read_audio(path, 16000)) - 2 * frames) <= 2  # resampled, not dropped
    data = AudioFolder(str(FSDD), "test", sample_rate=8000, length=8000)
    item = data[0]
    assert item["x"].shape == (8000,) and data.classes[item["label"]] == data.items[0][0].name.split("_")[0]
    assert {p.name.split("_")[1] for p, _ in data.items} == {"yweweler"}  # the held-out speaker


def test_another_rate_is_resampled_and_stereo_folded(tmp_path):
    t = np.arange(4000) / 16000  # 0.25 s of 440 Hz at 16 kHz, the same tone in both channels
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    write_wav(tmp_path / "stereo16k.wav", np.stack([tone, tone], axis=1), 16000)
    x = read_audio(tmp_path / "stereo16k.wav", 8000)
    assert abs(len(x) - 2000) <= 2
    spectrum = np.abs(np.fft.rfft(x.numpy()))
    assert abs(np.argmax(spectrum) * 8000 / len(x) - 440) < 8  # the pitch survives resampling
    assert 0.4 < x.abs().max() < 0.6  # folded to mono at the same level


def test_save_writes_16bit_wavs_at_the_model_rate_and_a_png(tmp_path):
    modality = audio(seconds=0.5)
    samples = torch.rand(3, modality.length) * 2 - 1
    folder = Path(modality.save(samples, tmp_path / "out"))
    with wave.open(str(folder / "001.wav")) as f:
        assert (f.getframerate(), f.getnframes(), f.getsampwidth(), f.getnchannels()) == (8000, 4000, 2, 1)
        pcm = np.frombuffer(f.readframes(4000), dtype="<i2") / 32767
    np.testing.assert_allclose(pcm, samples[1].numpy(), atol=1 / 32767)
    assert (folder / "spectrograms.png").stat().st_size > 1000


@pytest.mark.skipif(not FSDD.exists(), reason="../shared/data/fsdd not present")
def test_griffin_lim_round_trip_of_real_clips_is_close():
    modality = audio()
    data = AudioFolder(str(FSDD), "test", sample_rate=8000, length=8000)
    clips = torch.stack([data[i]["x"] for i in range(0, 300, 60)])  # 5 clips, different digits
    log_mel = modality.log_mel(clips)
    modality.cfg.mel_mean = log_mel.mean(dim=(0, 2)).tolist()
    modality.cfg.mel_std = log_mel.std(dim=(0, 2)).tolist()
    reconstruction = modality.decode(modality.encode({"x": clips}))
    lsd = log_spectral_distance(clips, reconstruction)
    assert (lsd < ROUNDTRIP_LSD_DB).all(), lsd
    other_clip = log_spectral_distance(clips, clips.roll(1, dims=0))  # another digit: what "wrong" looks like
    assert other_clip.mean() > lsd.mean() + 2, (lsd, other_clip)


def test_empty_and_corrupt_files_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("0_ann_0.wav", "1_ann_1.wav", "0_bob_0.wav"):
        write_wav(tmp_path / name, rng.uniform(-0.5, 0.5, 1000), 8000)
    (tmp_path / "0_ann_2.wav").write_bytes(b"")
    (tmp_path / "1_ann_3.wav").write_bytes(b"RIFF\x00\x00not audio at all" * 10)
    (tmp_path / "notes.txt").write_text("hello")
    train = AudioFolder(str(tmp_path), "train", sample_rate=8000, length=800)
    assert len(train) == 3 and AudioFolder(str(tmp_path), "test", 8000, 800).items[0][0].name == "0_bob_0.wav"
    assert sorted(Path(s.split(":")[0]).name for s in train.skipped) == ["0_ann_2.wav", "notes.txt"]
    tolerant = Tolerant(train)
    batch = collate([tolerant[i] for i in range(len(tolerant))])
    assert batch["n"] == 2 and batch["x"].shape == (2, 800)
    assert len(batch["bad"]) == 1 and "1_ann_3.wav" in batch["bad"][0]


def test_tones_are_deterministic_and_check_names_a_valid_shape():
    a, b = Tones(8, 8000, 4000, seed=0), Tones(8, 8000, 4000, seed=0)
    assert torch.equal(a[5]["x"], b[5]["x"]) and a[5]["label"] == b[5]["label"]
    assert not torch.equal(a[5]["x"], Tones(8, 8000, 4000, seed=1)[5]["x"])
    with pytest.raises(ValueError, match=r"in \[1\], or modality.seconds=0.3125 and modality.n_mels=32"):
        audio(seconds=0.3, n_mels=30).check(OmegaConf.create({"patch": 4}))
    audio(seconds=0.3125, n_mels=32).check(OmegaConf.create({"patch": 4}))  # the suggestion works


def test_tiny_audio_model_loss_falls(tiny_run):
    losses = [loss for _, loss in tiny_run.losses]
    assert losses[-1] < 0.7 * losses[0], losses


def test_sampling_under_a_seed_is_deterministic(tiny_run):
    cfg, modality, model = load_model(tiny_run.run_dir / "checkpoints" / "last")
    process = build_process(cfg.modality.process, cfg.modality.diffusion, **modality.process_kwargs())

    def draw(seed):
        x0 = process.sample(
            modality.model_fn(model),
            modality.sample_shape(2),
            modality.sample_cond(2, "cpu", label=1),
            steps=4,
            sampler="ddim",
            guidance=2.0,
            device="cpu",
            generator=torch.Generator().manual_seed(seed),
        )
        return modality.decode(x0)

    first = draw(0)
    assert first.shape == (2, modality.length) and torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))


def test_evaluate_scores_samples_with_a_cached_spectrogram_classifier(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path))
    cfg, modality, model = load_model(tiny_run.run_dir / "checkpoints" / "last")
    process = build_process(cfg.modality.process, cfg.modality.diffusion, **modality.process_kwargs())
    args = OmegaConf.create({"n": 8, "batch": 8, "steps": 4, "sampler": "ddim", "guidance": 2.0, "seed": 0})
    metrics = modality.evaluate(model, process, args, "cpu")
    assert metrics["classifier_test_accuracy"] > 0.6  # four timbres a listener tells apart; chance is 0.25
    assert 0 <= metrics["label_agreement"] <= 1 and metrics["frechet_distance"] > 0
    assert metrics["roundtrip_log_spectral_distance_db"] > 0  # 16 mel bins, 4 iterations: no bound here
    assert len(list(tmp_path.glob("classifier-*.safetensors"))) == 1
