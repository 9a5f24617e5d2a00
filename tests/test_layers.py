"""The layers only point down: import-linter's contracts (pyproject.toml) over the installed ``locus`` package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str | None:
    exe = Path(sys.executable).with_name("lint-imports")
    return str(exe) if exe.exists() else shutil.which("lint-imports")


def test_import_linter_contracts_hold(tmp_path: Path) -> None:
    """The array code and the HTTP service never import training; training never imports the HTTP layer."""
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (it comes with the [dev] extra)")
    # The editable install maps service/ and training/ into locus.*; import-linter reads files, so lay the
    # package out as it is installed (the same mapping as [tool.setuptools.package-dir]).
    pkg = tmp_path / "locus"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "locus", pkg, ignore=ignore)
    shutil.copytree(REPO / "service", pkg / "service", ignore=ignore)
    shutil.copytree(REPO / "training", pkg / "training", ignore=ignore)
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    proc = subprocess.run(
        [exe, "--no-cache"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower() or "0 broken" in proc.stdout.lower()
