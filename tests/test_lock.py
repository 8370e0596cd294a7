"""The install is decided by uv.lock: drift between it and pyproject.toml is one clear line.

These run the real pinned uv (the one `make` bootstrapped into .tools/uv, or a uv of that
version on PATH) on a copy of the project, offline, so no registry is asked: the metadata
they need is in the uv cache that `make install` filled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = (ROOT / "Makefile").read_text()
UV_VERSION = re.search(r"^UV_VERSION := (\S+)$", MAKEFILE, re.M)


def _uv() -> str | None:
    private = ROOT / ".tools" / "uv" / "bin" / "uv"
    if private.exists():
        return str(private)
    found = shutil.which("uv")
    if found is None or UV_VERSION is None:
        return None
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    return found if UV_VERSION.group(1) in version else None


UV = _uv()
needs_uv = pytest.mark.skipif(UV is None, reason="the pinned uv is not installed: make install")


def _project_copy(tmp_path: Path) -> Path:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "dispatcher").mkdir()
    (tmp_path / "dispatcher" / "__init__.py").touch()
    return tmp_path


def _check_lock(project: Path) -> subprocess.CompletedProcess[str]:
    assert UV is not None
    env = {**os.environ, "UV_OFFLINE": "1", "UV_PYTHON_DOWNLOADS": "never"}
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "check-lock.sh"), UV],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_uv
def test_the_committed_lock_matches_pyproject(tmp_path: Path) -> None:
    done = _check_lock(_project_copy(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


@needs_uv
def test_a_range_edited_without_relocking_fails_with_one_line(tmp_path: Path) -> None:
    project = _project_copy(tmp_path)
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    floor = re.search(r'"orjson>=([0-9.]+)"', text)
    assert floor is not None
    pyproject.write_text(text.replace(floor.group(0), f'"orjson>={floor.group(1)},<4"'))
    done = _check_lock(project)
    if "network was disabled" in done.stderr or "not found in the cache" in done.stderr:
        # Offline, uv can only re-resolve from what its cache holds; a fresh cache (CI)
        # holds the wheels of one platform, not the metadata a full re-resolve needs.
        pytest.skip("the uv cache cannot re-resolve offline: " + done.stderr.splitlines()[-1])
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "uv.lock does not match pyproject.toml: run 'make lock' and commit uv.lock"
    ]


def _recipes() -> dict[str, list[str]]:
    recipes: dict[str, list[str]] = {}
    target = ""
    for line in MAKEFILE.splitlines():
        if line.startswith("\t"):
            recipes.setdefault(target, []).append(line.strip())
        elif re.match(r"^[$(). a-zA-Z_/-]+:", line):
            target = line.split(":", 1)[0]
    return recipes


def test_every_install_in_the_makefile_comes_from_the_lock() -> None:
    recipes = _recipes()
    commands = [command for lines in recipes.values() for command in lines]
    # The one pip install is the pinned, hash-checked uv itself.
    pips = [c for c in commands if "pip install" in c]
    assert len(pips) == 1
    assert "--require-hashes" in " ".join(recipes["$(UV_PRIVATE)"])
    assert "SYNC := $(UV) sync --frozen" in MAKEFILE
    assert any("$(SYNC)" in c for c in recipes["$(STAMP)"])
    assert any("check-lock.sh" in c for c in recipes["$(STAMP)"])
    # Every target that runs the project's tools depends on the locked venv.
    for target in ("lint", "typecheck", "pytest", "demo", "bench", "bench-quick", "bench-rate"):
        assert re.search(rf"^{re.escape(target)}: \$\(STAMP\)", MAKEFILE, re.M), target


def test_the_bootstrap_pins_uv_with_a_hash_for_every_platform() -> None:
    text = (ROOT / "tools" / "uv-requirements.txt").read_text()
    assert UV_VERSION is not None
    assert f"uv=={UV_VERSION.group(1)} " in text
    hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", text)
    assert len(hashes) >= 10  # linux x86_64/aarch64, macOS, Windows wheels and the sdist
    assert len(set(hashes)) == len(hashes)


def test_ci_runs_the_readme_commands_with_an_empty_uv_cache() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme
    assert "make test" in readme
    assert "UV_CACHE_DIR=$(mktemp -d)" in ci
    order = [ci.index(s) for s in ("directory check-lock", "directory demo", "directory test")]
    assert order == sorted(order)
