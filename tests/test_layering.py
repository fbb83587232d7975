"""Data flows one way: train/ and infer/ import the library packages, never the reverse (an import
circle modalities -> train -> modalities once hid in a function body)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("modalities", "diffusion", "backbones")
ENTRY_POINTS = ("train", "infer", "bench")


def imported_packages(path: Path) -> set[str]:
    """Top-level package names that `path` imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_packages_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from train.checkpoint import load_model\n")
    assert imported_packages(source) == {"os", "train"}


@pytest.mark.parametrize("package", LIBRARY)
def test_library_packages_never_import_entry_points(package):
    offenders = [
        f"{path.relative_to(ROOT)} imports {sorted(imported_packages(path) & set(ENTRY_POINTS))}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if imported_packages(path) & set(ENTRY_POINTS)
    ]
    assert not offenders, offenders
