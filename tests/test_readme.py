"""The README's set-up commands are what CI runs, and its test command works as printed from a
fresh copy of the repository (a bare `pytest` once collected nothing: the test folders shadowed
the packages of the same names)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The commands of the README's first code block (comments stripped): install, then test."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_ci_runs_the_readme_commands_verbatim():
    install, test = readme_commands()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and test in ci, f".ci/run must run {install!r} and {test!r} as printed"
    assert ci.index(install) < ci.index(test)


def start_fresh_copy_collect():
    """The README's test command with --collect-only, in a copy of the files git tracks, started in the
    background (tests/conftest.py): collecting imports every test module, seconds of one core."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None  # the test skips
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    clone = Path(tempfile.mkdtemp(prefix="polydiff-copy-"))
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    _, test = readme_commands()
    argv = shlex.split(test)
    if argv[0] == "python":  # the interpreter of the environment polydiff is installed in, as on a user's shell
        argv[0] = sys.executable
    argv += ["--collect-only", "-q", "-p", "no:cacheprovider"]
    return subprocess.Popen(argv, cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), [clone]


@pytest.mark.background(start=start_fresh_copy_collect)
def test_readme_test_command_collects_in_a_fresh_copy(background):
    done = background()
    if done is None:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = sum(int(n) for n in re.findall(r"^tests/\S+\.py: (\d+)$", done.stdout, re.M))  # -qq listing
    assert collected > 100, done.stdout[-2000:]


def test_readme_links_resolve_inside_the_repository():
    """Users have only the repository: every relative link of the README points at a file in it."""
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
