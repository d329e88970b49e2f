"""The import layers of docs/architecture.md hold, and the check catches an upward import.

``lint-imports`` (import-linter) reads the contracts in pyproject.toml: the layers from the
CLI down to the foundations, and no import circle among the modules of any package. CI
runs it too; this test also proves the check is not vacuous, by adding one upward import
to a copy of the code and watching the contract break.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(tree), "LANG": "C.UTF-8"}
    return subprocess.run([str(LINT), str(tree / "pyproject.toml"), "--no-cache"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for package in ("evomerge", "search_spaces", "evaluators"):
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is installed with the test extra")
def test_the_layers_hold_and_an_upward_import_breaks_them(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    ok = _lint(tree)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Contracts: 2 kept, 0 broken." in ok.stdout
    # the config (bottom) reaching up into the search loop: what the layers forbid
    config = tree / "evomerge" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _upward() -> None:\n    from evomerge.search import loop  # noqa\n")
    broken = _lint(tree)
    assert broken.returncode == 1
    text = " ".join(broken.stdout.split())
    assert "evomerge layers: CLI > views > search > plug-ins > merge engine > run dir > config > foundations BROKEN" in text
    assert "evomerge.config -> evomerge.search.loop" in text  # the import is named
    assert "Contracts: 0 kept, 2 broken." in text  # it also closes a circle (search imports config)


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is installed with the test extra")
def test_a_circle_between_sibling_modules_breaks_the_contract(tmp_path: Path) -> None:
    tree = _copy(tmp_path)
    # rundir already imports records; records importing rundir back closes a circle
    records = tree / "evomerge" / "records.py"
    records.write_text(records.read_text() + "\n\ndef _back() -> None:\n    from evomerge import rundir  # noqa\n")
    broken = _lint(tree)
    assert broken.returncode == 1
    assert "no import circles between the modules of any package BROKEN" in " ".join(broken.stdout.split())
