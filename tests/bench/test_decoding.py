"""bench/decoding.py on a tiny text model: one row per sampler and step count, reproducible."""

import json
from pathlib import Path

import pytest
from conftest import TINY_TEXT, compose_cfg

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def decoding(monkeypatch, capsys):
    """decoding(*argv) -> the bench's (stdout, stderr), run in this process: a fresh interpreter
    would spend seconds importing torch for each call."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from decoding import main

    def run(*argv):
        capsys.readouterr()
        main([str(a) for a in argv])
        return capsys.readouterr()

    return run


def rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One tiny text model for every test here: the bench only reads it."""
    from train.train import train

    out = tmp_path_factory.mktemp("decoding")
    return train(compose_cfg([*TINY_TEXT, f"out_dir={out}", "name=t"])).run_dir / "checkpoints" / "last"


def test_sweeps_every_sampler_and_step_count(ckpt, tmp_path, decoding):
    table = tmp_path / "table.md"
    # the model scores its own samples (an ELBO bound): enough to exercise the reference path
    common = ["--ckpt", ckpt, "--reference", ckpt, "--n", 3, "--batch", 2, "--mc-timesteps", 2]
    run = decoding(*common, "--steps", 2, 5, "--out", table)
    found, out = rows(run.out), run.out
    # 32 tokens make 4 blocks of the default 8: two steps cannot finish them, and that row is skipped
    assert [(r["sampler"], r["steps"]) for r in found] == [
        (s, k) for s in ("ancestral", "confidence", "blocks") for k in (2, 5) if (s, k) != ("blocks", 2)
    ]
    assert "skipped blocks at 2 steps: steps=2 is fewer than the 4 blocks" in run.err
    for r in found:
        # ancestral may skip calls where no token changes; the others call once per step
        assert r["network_calls"] <= r["steps"] if r["sampler"] == "ancestral" else r["network_calls"] == r["steps"]
        assert r["sequences_per_s"] > 0 and r["generative_perplexity"] > 1
        assert 0 < r["unigram_entropy_bits"] <= r["data_unigram_entropy_bits"] + 2
    markdown = table.read_text().splitlines()
    assert markdown[0].startswith("| sampler | cache | steps |") and len(markdown) == 2 + len(found)
    assert f"5 rows for {ckpt} (1 skipped: blocks@2); table written to {table}" in out

    again = rows(decoding(*common, "--steps", 5, "--samplers", "confidence").out)[0]
    first = next(r for r in found if (r["sampler"], r["steps"]) == ("confidence", 5))
    for key in ("generative_perplexity", "unigram_entropy_bits", "example"):
        assert again[key] == first[key]  # same seed, same samples, same scores


def test_caches_give_the_same_samples_with_fewer_evaluations(ckpt, decoding):
    argv = ["--samplers", "ancestral", "--caches", "off", "batch", "row", "--steps", 128, "--n", 16, "--batch", 16]
    off, batch, row = rows(decoding("--ckpt", ckpt, *argv).out)
    assert (off["cache"], batch["cache"], row["cache"]) == ("off", "batch", "row")
    assert off["same_samples"] is None and batch["same_samples"] is True and row["same_samples"] is True
    # 32 tokens a sequence change in at most 32 of the 128 steps; calls are 8 sequences, padded
    assert off["evaluations_per_sequence"] == 128
    assert row["evaluations_per_sequence"] < 0.6 * batch["evaluations_per_sequence"] <= 0.6 * 128


def test_unknown_sampler_and_bad_counts_are_named(ckpt, decoding):
    with pytest.raises(SystemExit, match=r"dpmpp_2m.*'confidence'"):
        decoding("--ckpt", ckpt, "--samplers", "dpmpp_2m")
    with pytest.raises(SystemExit, match="--steps"):
        decoding("--ckpt", ckpt, "--steps", 0)
