"""bench/text_compare.py: continuous and discrete text checkpoints in one table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import text_compare  # noqa: E402


def test_one_table_holds_every_model_and_every_continuous_variant(tmp_path, text_run):
    masked = text_run().run_dir / "checkpoints" / "last"
    continuous = text_run(
        "modality=text_continuous", "sample.sampler=ddim", "modality.embed_dim=8", f"out_dir={tmp_path / 'c'}"
    ).run_dir
    continuous = continuous / "checkpoints" / "last"
    out, heldout = tmp_path / "table.md", tmp_path / "heldout.txt"
    heldout.write_text("the cat sat on the mat. " * 12)
    rows = text_compare.main(
        [
            "--ckpts",
            f"masked={masked}",
            f"cont={continuous}",
            "--n",
            "2",
            "--steps",
            "4",
            "--mc-timesteps",
            "2",
            "--reference",
            str(masked),
            "--out",
            str(out),
        ]
    )
    assert [r["model"] for r in rows] == ["masked"] + ["cont"] * 4
    assert [r["decoding"].split(", ", 1)[-1] for r in rows[1:]] == [v[0] for v in text_compare.VARIANTS]
    saved = json.loads(out.with_suffix(".cont.json").read_text())
    assert (
        rows[3]["real_word_share"] == saved["noclamp_argmax_real_word_share"]
        or saved["noclamp_argmax_real_word_share"] != saved["noclamp_argmax_real_word_share"]
    )  # NaN when no word
    assert rows[1]["generative_perplexity"] == saved["generative_perplexity"] > 1
    assert len({r["bits_per_char"] for r in rows[1:]}) == 1 and rows[0]["bits_per_char"] > 0
    markdown = out.read_text()
    assert markdown.count("\n| cont |") == 4 and "| masked |" in markdown
