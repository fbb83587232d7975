import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx
from omegaconf import OmegaConf
from PIL import Image as PIL

from modalities.data import BadSample
from modalities.image import Image, ImageConfig
from modalities.image_data import MNIST, ImageFolder, Shapes, read_idx

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


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


def test_shapes_are_drawn_once_and_kept_bit_for_bit(monkeypatch):
    import modalities.image_data as image_data

    fresh = Shapes(10, 16, seed=0)[3]["x"]  # a first read draws
    data, drawn = Shapes(10, 16, seed=0), []
    draw = image_data.shape_pixels
    monkeypatch.setattr(image_data, "shape_pixels", lambda *a, **k: drawn.append(a) or draw(*a, **k))
    first = data[3]
    again = data[3]
    assert len(drawn) == 1  # the second read came from the kept pixels
    assert torch.equal(first["x"], again["x"]) and first["caption"] == again["caption"]
    assert torch.equal(again["x"], fresh)  # the same floats as a fresh drawing
    monkeypatch.setattr(Shapes, "KEEP_BYTES", 10 * 3 * 16 * 16 - 1)  # a split that does not fit is redrawn
    big = Shapes(10, 16, seed=0)
    big[3], big[3]
    assert len(drawn) == 3 and big.kept is None


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


def test_coarse_images_average_2x2_blocks_and_keep_their_places_on_the_full_grid():
    cfg = OmegaConf.merge(OmegaConf.structured(ImageConfig), {"size": 8, "classes": ["a", "b"]})
    image = Image(cfg, patch=2)
    x = torch.randn(2, 3, 8, 8)
    coarse = image.coarsen(x)
    assert coarse.shape == (2, 3, 4, 4)
    assert torch.allclose(coarse[:, :, 1, 2], x[:, :, 2:4, 4:6].mean(dim=(-2, -1)))
    tokens, pos = image.to_tokens(coarse)
    full_tokens, full_pos = image.to_tokens(x)
    # the coarse grid's 2x2 tokens sit where the full grid's tokens 0, 2 (rows and columns) are, so a
    # position means the same place of the image at both sizes
    assert tokens.shape == (2, 4, 12)
    assert pos.tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert pos.tolist() == full_pos.reshape(4, 4, 2)[::2, ::2].reshape(-1, 2).tolist()
    assert torch.equal(image.from_tokens(tokens, coarse.shape), coarse)
    with pytest.raises(ValueError, match="backbone.patch=4 does not divide"):
        Image(OmegaConf.merge(cfg, {"size": 12}), patch=4).coarsen(torch.randn(2, 3, 12, 12))  # 6x6 coarse


# --- files as a viewer shows them ---------------------------------------------------------------


def image_cfg(**keys):
    return OmegaConf.merge(OmegaConf.structured(ImageConfig), keys)


def pixels(item) -> np.ndarray:
    """An item's x back to 0..255, (H, W, C)."""
    return ((item["x"] + 1) / 2 * 255).permute(1, 2, 0).numpy()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_decompression_bomb_is_a_bad_sample(tmp_path):
    PIL.new("RGB", (4, 4), (10, 200, 30)).save(tmp_path / "ok.png")
    header = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)  # 10^10 grey pixels claimed
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )
    (tmp_path / "bomb.png").write_bytes(bomb)
    data = ImageFolder(str(tmp_path), size=4)
    assert [p.name for p, _ in data.items] == ["bomb.png", "ok.png"]
    with pytest.raises(BadSample, match="bomb.png: cannot decode image \\(DecompressionBombError"):
        data[0]
    np.testing.assert_allclose(pixels(data[1])[0, 0], (10, 200, 30), atol=0.6)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grey_is_scaled_to_the_full_range(tmp_path, suffix):
    values = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    image = PIL.fromarray(values)
    assert image.mode == "I;16"
    image.save(tmp_path / f"grey{suffix}")
    x = pixels(ImageFolder(str(tmp_path), size=2, channels=1)[0])[..., 0]
    np.testing.assert_allclose(x, values / 257, atol=0.6)  # not clipped to white above 255


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((2, 4, 3), dtype=np.uint8)  # stored 4 wide, 2 high: left half red, right half blue
    stored[:, :2] = (255, 0, 0)
    stored[:, 2:] = (0, 0, 255)
    exif = PIL.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half is shown on top
    PIL.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    x = pixels(ImageFolder(str(tmp_path), size=2)[0])  # the centre 2x2 of the 2-wide, 4-high picture
    np.testing.assert_allclose(x[0], [(255, 0, 0)] * 2, atol=0.6)  # top row red
    np.testing.assert_allclose(x[1], [(0, 0, 255)] * 2, atol=0.6)  # bottom row blue


@pytest.mark.parametrize("background, rgb", [("white", (255, 255, 255)), ("#336699", (0x33, 0x66, 0x99))])
@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_the_background(tmp_path, mode, background, rgb):
    # 2x2: left column opaque red (grey 76 for LA), right column fully transparent over stored black
    if mode == "RGBA":
        image = PIL.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]] * 2, dtype=np.uint8))
        opaque = (255, 0, 0)
    elif mode == "LA":
        image = PIL.fromarray(np.array([[[76, 255], [0, 0]]] * 2, dtype=np.uint8)).convert("LA")
        opaque = (76, 76, 76)
    else:
        image = PIL.fromarray(np.array([[1, 0]] * 2, dtype=np.uint8)).convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0])
        image.info["transparency"] = 0  # palette entry 0 (black) is transparent
        opaque = (255, 0, 0)
    image.save(tmp_path / "icon.png")
    assert PIL.open(tmp_path / "icon.png").mode == mode
    modality = Image(image_cfg(dataset="folder", size=2, background=background), patch=1, data=folder(tmp_path))
    x = pixels(modality.dataset("train")[0])
    np.testing.assert_allclose(x[:, 0], [opaque] * 2, atol=0.6)
    np.testing.assert_allclose(x[:, 1], [rgb] * 2, atol=0.6)


def folder(path):
    return OmegaConf.create({"path": str(path), "bad_threshold": 0.01})


def test_a_background_that_is_no_colour_is_refused(tmp_path):
    with pytest.raises(ValueError, match="modality.background='nocolour' is not a colour"):
        Image(image_cfg(dataset="folder", background="nocolour"), patch=1, data=folder(tmp_path))


def test_image_modality_needs_a_continuous_process():
    with pytest.raises(ValueError, match=r"modality.process='masked' does not model pixels; choose one of \['flow'"):
        Image(image_cfg(process="masked"), patch=1)


# --- class names ------------------------------------------------------------------------------


def idx_set(path: Path, labels):
    write_idx(path / "train-images-idx3-ubyte.gz", np.zeros((len(labels), 4, 4)))
    write_idx(path / "train-labels-idx1-ubyte.gz", np.array(labels))


def test_idx_classes_come_from_the_user_or_classes_txt(tmp_path):
    idx_set(tmp_path, [0, 2, 1])
    digits = MNIST(str(tmp_path), "train", size=4)
    assert digits.classes == MNIST.DIGITS and digits[1]["caption"] == "the digit 2"
    (tmp_path / "classes.txt").write_text("T-shirt\ntrouser\npullover\n")
    named = MNIST(str(tmp_path), "train", size=4)
    assert named.classes == ("T-shirt", "trouser", "pullover") and named[1]["caption"] == "pullover"
    given = MNIST(str(tmp_path), "train", size=4, classes=["cat", "dog", "bird"])
    assert given.classes == ("cat", "dog", "bird") and given[2]["caption"] == "dog"
    with pytest.raises(ValueError, match=r"labels up to 2 but modality.classes names 2 classes"):
        MNIST(str(tmp_path), "train", size=4, classes=["cat", "dog"])
    (tmp_path / "classes.txt").write_text("one\n")
    with pytest.raises(ValueError, match=r"labels up to 2 but .*classes.txt names 1 classes"):
        MNIST(str(tmp_path), "train", size=4)


def test_user_classes_survive_resolve(tmp_path):
    idx_set(tmp_path, [0, 2, 1])
    modality = Image(image_cfg(dataset="mnist", size=4, classes=["cat", "dog", "bird"]), patch=1, data=folder(tmp_path))
    assert modality.resolve(modality.dataset("train"))["classes"] == ["cat", "dog", "bird"]
    shapes = Image(image_cfg(size=4, classes=["a", "b"]), patch=1)
    with pytest.raises(ValueError, match=r"modality.classes=\['a', 'b'\] does not match the shapes"):
        shapes.resolve(shapes.dataset("train"))


def test_folder_classes_follow_the_users_order(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        PIL.new("RGB", (2, 2)).save(tmp_path / name / "a.png")
    data = ImageFolder(str(tmp_path), size=2, classes=["bird", "dog", "cat"])  # no bird in this split
    assert data.classes == ("bird", "dog", "cat")
    assert sorted((p.parent.name, y) for p, y in data.items) == [("cat", 2), ("dog", 1)]
    with pytest.raises(ValueError, match=r"class folders \['cat'\] are not in modality.classes"):
        ImageFolder(str(tmp_path), size=2, classes=["dog", "bird"])
