"""Image metrics: Fréchet distance, the data set classifier and its cache, evaluate_images."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from backbones.dit import DiT
from diffusion import build_process
from modalities import image_metrics as metrics
from modalities.image import Image, ImageConfig
from modalities.image_data import SHAPES, Shapes


class InMemory(Dataset):
    """A data set's items read once, so that several epochs cost no drawing."""

    def __init__(self, dataset):
        self.items, self.classes = [dataset[i] for i in range(len(dataset))], dataset.classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def whitened(n, dim, seed):
    """n points whose sample mean is exactly 0 and sample covariance exactly the identity."""
    x = np.random.default_rng(seed).normal(size=(n, dim))
    x -= x.mean(0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


def image_modality(tmp_path, monkeypatch, **overrides):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    cfg = OmegaConf.structured(ImageConfig)
    cfg.size, cfg.shapes_items, cfg.classes = 16, 120, list(SHAPES)
    for key, value in overrides.items():
        cfg[key] = value
    return Image(cfg, patch=4)


@pytest.fixture(scope="module")
def shapes_classifier():
    train, test = InMemory(Shapes(600, 16, seed=0)), InMemory(Shapes(300, 16, seed=1))
    return metrics.train_classifier(train, test, epochs=6, batch=32, seed=0, workers=0)


# --- Fréchet distance -------------------------------------------------------------------


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    a = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(metrics.frechet_distance(a, a)) < 1e-8
    shift = np.linspace(0.1, 0.8, 8)  # same covariance, so the distance is exactly |shift|^2
    assert metrics.frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    assert metrics.frechet_distance(a, a + 2 * shift) > metrics.frechet_distance(a, a + shift)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # For diagonal covariances: |mu_a - mu_b|^2 + sum_i (s_a,i - s_b,i)^2 with s the standard deviations.
    mu_a, mu_b = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s_a, s_b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([2.0, 2.0, 1.5, 0.1])
    a, b = mu_a + s_a * whitened(400, 4, 1), mu_b + s_b * whitened(300, 4, 2)
    expected = ((mu_a - mu_b) ** 2).sum() + ((s_a - s_b) ** 2).sum()
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_survives_singular_covariances():
    a = np.random.default_rng(0).normal(size=(50, 6))
    a[:, :2] = 0.0  # dead (always-zero) features, as after a ReLU
    shift = np.array([0, 0, 1.0, 0, 0, 2.0])
    fd = metrics.frechet_distance(a, a + shift)
    assert math.isfinite(fd) and fd == pytest.approx(5.0, abs=1e-3)
    few = np.random.default_rng(1).normal(size=(5, 32))  # fewer samples than features
    assert math.isfinite(metrics.frechet_distance(few, few + 1.0))


# --- the classifier and its cache -------------------------------------------------------


def test_classifier_learns_shapes_well_above_chance(shapes_classifier):
    model, accuracy = shapes_classifier
    assert accuracy > 0.6, accuracy  # chance is 1/6
    x = torch.stack([Shapes(4, 32)[i]["x"] for i in range(4)])  # another size: the head still fits
    assert model.features(x).shape == (4, 128) and model(x).shape == (4, len(SHAPES))


def test_classifier_is_cached_and_reused(tmp_path, monkeypatch):
    modality = image_modality(tmp_path, monkeypatch)
    first_model, first = metrics.get_classifier(modality, "cpu")
    (info,) = (tmp_path / "cache").glob("classifier-*.json")
    assert info.with_suffix(".safetensors").exists()
    assert json.loads(info.read_text())["test_accuracy"] == first

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(metrics, "train_classifier", no_training)
    again_model, again = metrics.get_classifier(modality, "cpu")
    assert again == first
    for p, q in zip(first_model.state_dict().values(), again_model.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(AssertionError, match="trained again"):  # another data set has another key
        metrics.get_classifier(image_modality(tmp_path, monkeypatch, shapes_items=130), "cpu")


# --- evaluate_images ------------------------------------------------------------------


def args(**overrides):
    return OmegaConf.create(
        {"n": 14, "batch": 5, "steps": 2, "sampler": "ddim", "guidance": 2.0, "seed": 0, **overrides}
    )


def tiny_dit(modality):
    return DiT(hidden_size=32, depth=1, num_heads=2, **modality.backbone_kwargs()).eval()


def test_evaluate_images_on_a_random_model(tmp_path, monkeypatch):
    modality = image_modality(tmp_path, monkeypatch)
    model, process = tiny_dit(modality), build_process("gaussian", modality.cfg.diffusion)
    asked, real_sample = [], process.sample

    def recording_sample(model_fn, shape, cond, **options):
        asked.append(cond["label"])
        return real_sample(model_fn, shape, cond, **options)

    monkeypatch.setattr(process, "sample", recording_sample)
    result = modality.evaluate(model, process, args(), "cpu")
    assert [len(labels) for labels in asked] == [5, 5, 4]
    assert torch.cat(asked).tolist() == [i % len(SHAPES) for i in range(14)]  # classes cycle across batches
    assert set(result) == {
        "classifier_test_accuracy",
        "label_agreement",
        "label_agreement_by_class",
        "frechet_distance",
        "n_samples",
    }
    assert list(result["label_agreement_by_class"]) == list(SHAPES)
    assert result["n_samples"] == 14
    assert 0 <= result["label_agreement"] <= 1 and 0 <= result["classifier_test_accuracy"] <= 1
    assert math.isfinite(result["frechet_distance"]) and result["frechet_distance"] > 0
    assert metrics.evaluate_images(modality, model, process, args(), "cpu") == result  # seeded: repeatable


def test_evaluate_images_unconditional(tmp_path, monkeypatch):
    modality = image_modality(tmp_path, monkeypatch, conditional=False)
    model, process = tiny_dit(modality), build_process("flow", modality.cfg.diffusion)
    result = metrics.evaluate_images(modality, model, process, args(n=6, guidance=1.0), "cpu")
    assert set(result) == {"classifier_test_accuracy", "frechet_distance", "n_samples"}
    assert math.isfinite(result["frechet_distance"])


class Oracle:
    """A 'process' whose samples are real shapes: of the asked label, or pure noise."""

    def __init__(self, noise: bool, drawn_instead: dict | None = None):
        pool = Shapes(300, 16, seed=7)
        self.drawn_instead = drawn_instead or {}  # asked label -> the label whose shapes are drawn
        self.noise, self.by_label = (
            noise,
            {k: [pool[i]["x"] for i in range(300) if pool[i]["label"] == k] for k in range(len(SHAPES))},
        )

    def sample(self, model_fn, shape, cond, generator=None, **options):
        if self.noise:
            return torch.rand(shape, generator=generator) * 2 - 1
        drawn = [self.drawn_instead.get(int(k), int(k)) for k in cond["label"]]
        return torch.stack([self.by_label[k][i % 10] for i, k in enumerate(drawn)])


def test_metrics_prefer_real_images_to_noise(tmp_path, monkeypatch, shapes_classifier):
    monkeypatch.setattr(metrics, "get_classifier", lambda modality, device, epochs=1: shapes_classifier)
    modality = image_modality(tmp_path, monkeypatch, shapes_items=3000)  # test split: 300 real images
    model = tiny_dit(modality)
    real = metrics.evaluate_images(modality, model, Oracle(noise=False), args(n=60, batch=30), "cpu")
    noise = metrics.evaluate_images(modality, model, Oracle(noise=True), args(n=60, batch=30), "cpu")
    assert real["label_agreement"] > 0.6 and noise["label_agreement"] < 0.4
    assert real["frechet_distance"] < 0.5 * noise["frechet_distance"]


def test_agreement_by_class_names_the_class_that_is_drawn_wrong(tmp_path, monkeypatch, shapes_classifier):
    monkeypatch.setattr(metrics, "get_classifier", lambda modality, device, epochs=1: shapes_classifier)
    modality = image_modality(tmp_path, monkeypatch, shapes_items=3000)
    rings_as_squares = Oracle(noise=False, drawn_instead={SHAPES.index("ring"): SHAPES.index("square")})
    result = metrics.evaluate_images(modality, tiny_dit(modality), rings_as_squares, args(n=60, batch=30), "cpu")
    by_class = result["label_agreement_by_class"]
    assert by_class["ring"] < 0.2 and min(v for k, v in by_class.items() if k != "ring") > 0.6
    assert result["label_agreement"] == pytest.approx(sum(by_class.values()) / len(SHAPES))  # 10 asked per class
