import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from modalities.image import Image, ImageConfig
from modalities.image_data import MNIST, Shapes, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_round_trip_and_corrupt_headers_are_named(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    data = MNIST(str(tmp_path), "test", size=28)
    assert len(data) == 5 and data[2]["label"] == 4
    pixels = (data[0]["x"][0] + 1) / 2 * 255
    np.testing.assert_allclose(pixels.numpy(), images[0], atol=0.6)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04junk"))
    with pytest.raises(ValueError, match="bad.gz: cannot read as an idx file"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz not found"):
        MNIST(str(tmp_path), "train", size=28)


@pytest.mark.skipif(not SHARED_MNIST.exists(), reason="../shared/data/mnist not present")
def test_real_mnist_files():
    test = MNIST(str(SHARED_MNIST), "test", size=32)
    assert len(test) == 10000 and test[0]["x"].shape == (1, 32, 32)
    assert sorted({test[i]["label"] for i in range(200)}) == list(range(10))


def test_shapes_are_deterministic_and_captioned():
    a, b = Shapes(10, 16, seed=0), Shapes(10, 16, seed=0)
    assert torch.equal(a[3]["x"], b[3]["x"]) and a[3]["caption"] == b[3]["caption"]
    assert not torch.equal(a[3]["x"], Shapes(10, 16, seed=1)[3]["x"])
    words = a[3]["caption"].split()
    assert words[0] == "a" and words[3] == Shapes.classes[a[3]["label"]]


def test_patch_tokens_round_trip():
    cfg = OmegaConf.merge(OmegaConf.structured(ImageConfig), {"size": 8, "classes": ["a", "b"]})
    image = Image(cfg, patch=2)
    x = torch.randn(2, 3, 8, 8)
    tokens, pos = image.to_tokens(x)
    assert tokens.shape == (2, 16, 12) and pos.shape == (16, 2) and pos.max() == 3
    assert torch.equal(image.from_tokens(tokens, x.shape), x)
    with pytest.raises(ValueError, match="label='zebra' is not a class of this model"):
        image.sample_cond(2, "cpu", label="zebra")
    assert image.sample_cond(3, "cpu", label="b")["label"].tolist() == [1, 1, 1]
