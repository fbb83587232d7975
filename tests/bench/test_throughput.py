import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import load_bench

REPO = Path(__file__).resolve().parents[2]


def test_cpu_smoke_configuration_reports_one_json_line(capsys):
    # in this process, as the tests below: a fresh interpreter spends seconds importing torch
    argv = ["--preset", "dit_xs", "--tokens", "64", "--batch", "4", "--steps", "2", "--warmup", "1", "--grid", "4x4x4"]
    returned = load_bench("throughput").main(argv)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == returned
    assert result["mode"] == "train" and result["tokens"] == 64 and result["samples_per_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(64 * result["samples_per_s"], rel=0.01)


def test_sample_mode_and_bad_grid(capsys):
    bench = load_bench("throughput")
    argv = ["--preset", "dit_xs", "--tokens", "16", "--batch", "2", "--steps", "1", "--warmup", "0"]
    bench.main([*argv, "--sample", "--sample-steps", "3"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "sample" and result["sample_steps"] == 3
    with pytest.raises(SystemExit, match="holds 9 tokens, not --tokens 16"):
        bench.main([*argv, "--grid", "3x3"])


def start_compile_check():
    """tests/bench/compile_check.py in a process of its own, with an empty inductor cache (the first
    build a fresh machine pays, mostly g++), beside the tests before it."""
    cache = tempfile.mkdtemp(prefix="polydiff-inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(REPO / "tests" / "bench" / "compile_check.py")]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), [cache]


@pytest.mark.background(start=start_compile_check)
def test_compiled_and_eager_blocks_give_the_same_loss_and_gradients(background):
    done = background()
    if done.returncode == 77:  # compile_problem found no way to build kernels here (no C++ toolchain)
        if shutil.which(os.environ.get("CXX", "g++")) is not None:
            pytest.fail(f"a C++ compiler is installed, yet compile_problem says: {done.stdout}")
        pytest.skip(f"torch.compile unavailable: {done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("limit,cap", [(0, 64), (1, 64), (37, 64), (64, 64), (500, 64), (100, 100), (6, 7)])
def test_longest_clip_search_finds_the_limit_in_few_tries(limit, cap):
    tries = []

    def fits(n):
        tries.append(n)
        return n <= limit

    assert load_bench("throughput").largest_fitting(fits, cap) == min(limit, cap)
    assert len(tries) <= 2 * cap.bit_length() + 1


def test_longest_clip_mode_runs_on_cpu_up_to_its_cap():
    result = load_bench("throughput").main(
        ["--preset", "dit_xs", "--longest-clip", "2x2", "--layout", "factorized", "--max-frames", "3"]
    )
    assert result["mode"] == "longest_clip" and result["max_frames"] == 3 and result["max_tokens"] == 12
    assert result["hit_max_frames"] and result["batch"] == 1


def test_factorized_flops_count_the_keys_each_query_sees():
    bench = load_bench("throughput")
    args = bench.parse_args(["--tokens", "4096", "--grid", "16x16x16", "--layout", "factorized"])
    assert bench.attended_tokens(args) == (256 + 16) / 2
    assert bench.attended_tokens(bench.parse_args(["--tokens", "4096"])) == 4096
