"""The repository root must not shadow the libraries it uses (design.md, Layout).

`tokenizers/` holds recipes; as a Python package it would shadow Hugging Face's `tokenizers`,
which transformers imports. Likewise no top-level `datasets`, `evaluate`, `transformers` or
`deepspeed` package may exist. Checked from the repository root, where `python -c` and
`python script.py` put the current folder first on sys.path.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("tokenizers", "datasets", "transformers", "deepspeed")
RESERVED = (*LIBRARIES, "evaluate")


@pytest.mark.parametrize("name", LIBRARIES)
def test_library_imports_resolve_to_the_installed_package(name):
    code = f"import {name}, os; print(os.path.realpath({name}.__file__))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    location = Path(result.stdout.strip().splitlines()[-1])
    assert "site-packages" in location.parts, f"`import {name}` from the repo root found {location}"
    assert REPO not in location.parents or ".venv" in location.parts


@pytest.mark.parametrize("name", RESERVED)
def test_no_top_level_package_with_a_reserved_name(name):
    folder = REPO / name
    assert not (folder / "__init__.py").exists(), f"{folder} is a Python package and shadows `{name}`"
    assert not (folder.is_dir() and list(folder.rglob("*.py"))), f"{folder} holds Python files"
    if name in LIBRARIES:  # a top-level `evaluate.py` is the project's entry point (design.md)
        assert not (REPO / f"{name}.py").exists(), f"{name}.py at the repo root shadows `{name}`"


def test_tokenizers_folder_holds_no_python():
    python = {".py", ".pyc", ".pyx", ".so", ".pth"}
    found = [p for p in (REPO / "tokenizers").rglob("*") if p.suffix in python]
    assert not found, f"tokenizers/ holds recipes and the assets they build, never Python: found {found}"
    assert list((REPO / "tokenizers").glob("*.yaml")), "tokenizers/ should hold at least one recipe"
