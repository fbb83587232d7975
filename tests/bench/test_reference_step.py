"""bench/reference_step.py on a tiny shape: runs without the facebookresearch/DiT checkout (that
contender skipped with a message), and the contenders it builds really have the same shape."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import reference_step  # noqa: E402

TINY = ["--presets", "64x2x2", "--tokens", "16", "--batch", "2", "--rounds", "2", "--warmup", "1", "--device", "cpu"]


def test_runs_without_the_reference_checkout(tmp_path, capsys):
    out = tmp_path / "ref.md"
    rows = reference_step.main([*TINY, "--dit-repo", str(tmp_path / "absent"), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"skipping facebookresearch/DiT: {tmp_path / 'absent' / 'models.py'} does not exist" in printed
    assert [(r["step"], r["contender"]) for r in rows] == [
        (step, name) for step in ("training", "sampling, guidance 4") for name in ("polydiff", "diffusers")
    ]
    for r in rows:
        assert 0 < r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["ratio"] > 0
    assert [r["ratio"] for r in rows if r["contender"] == "diffusers"] == [1.0, 1.0]  # the only reference
    # each contender's AdamW as its own training code builds it
    assert {(r["contender"], r["adamw"]) for r in rows} == {("polydiff", "fused"), ("diffusers", "torch default")}
    assert out.read_text().count("\n") == 2 + len(rows)


def test_contenders_have_the_same_shape():
    width, depth, heads, side = 64, 3, 2, 8
    poly = reference_step.Polydiff(width, depth, heads, side, "math")
    diff = reference_step.Diffusers(width, depth, heads, side)
    count = lambda m: sum(p.numel() for p in m.parameters())
    # diffusers gives every block its own timestep and label embedder (AdaLayerNormZero.emb); polydiff
    # has one, like the reference DiT. The rest matches up to polydiff's QK-norm scales (2 x head dim a block).
    per_block = count(diff.net.transformer_blocks[0].norm1.emb)
    assert count(diff) - (depth - 1) * per_block == count(poly) - depth * 2 * (width // heads)
    x, t, y = torch.randn(2, 4, side, side), torch.rand(2), torch.tensor([1, 2])
    assert poly(x, t, y).shape == diff(x, t, y).shape == x.shape
    assert poly.dit.pos == "sincos"  # the image modality's positions, like the references'
    plain = reference_step.Polydiff(width, depth, heads, side, "math", "plain")  # no QK-norm scales
    assert count(plain) == count(poly) - depth * 2 * (width // heads)
    assert plain.dit.pos == "sincos" and plain.name == "polydiff, no QK-norm"
    rope = reference_step.Polydiff(width, depth, heads, side, "math", "rope")
    assert rope.dit.pos == "rope" and rope.name == "polydiff, rotary positions"


def test_the_polydiff_variants_are_timed_but_are_no_reference(tmp_path):
    args = [*TINY, "--presets", "64x1x2", "--dit-repo", str(tmp_path), "--plain", "--rope", "--loop-adamw"]
    rows = reference_step.main(args)
    names = ["polydiff", "polydiff, no QK-norm", "polydiff, rotary positions", "polydiff, torch's default AdamW"]
    assert [r["contender"] for r in rows[:5]] == [*names, "diffusers"]
    assert [r["ratio"] for r in rows if r["contender"] == "diffusers"] == [1.0, 1.0]
    # every polydiff but the last trains with the fused AdamW of polydiff's trainer
    assert [r["adamw"] for r in rows[:5]] == ["fused"] * 3 + ["torch default"] * 2


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--tokens 15 is not a square"):
        reference_step.main([*TINY[:2], "--tokens", "15", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--presets 'XL'"):
        reference_step.main(["--presets", "XL", "--device", "cpu"])
