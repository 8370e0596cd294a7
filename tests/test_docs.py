"""What a new user reads first: install hints that work, no placeholders, no dead references."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "cf-workflows-dispatcher"


def _texts() -> dict[Path, str]:
    paths = [ROOT / "README.md", ROOT / "relay" / "README.md", *ROOT.glob("docs/*.md")]
    paths += [p for p in (ROOT / "dispatcher").rglob("*.py")]
    return {p: p.read_text() for p in paths}


def test_every_install_hint_names_the_one_distribution() -> None:
    for path, text in _texts().items():
        for match in re.finditer(r"(?:pipx?|uv pip) install\s+'?([A-Za-z0-9_.\-/]+)\[", text):
            name = match.group(1)
            assert name in (DISTRIBUTION, ".") or name.startswith("/"), f"{path}: {match[0]}"
        # An extra spelled with the import name would install an unrelated package.
        assert "'dispatcher[" not in text, path


def test_no_placeholder_or_missing_reference_is_left() -> None:
    for path, text in _texts().items():
        assert "OWNER/REPO" not in text, path
        # DESIGN.md is the team's, not in the repository: cite the public source instead.
        assert "DESIGN.md" not in text, path


def test_the_unknown_instance_code_is_named_for_its_target() -> None:
    readme = (ROOT / "README.md").read_text()
    for sentence in re.findall(r"[^.]*10501[^.]*\.", readme):
        assert "wrangler" in sentence, sentence


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_lists_the_targets_a_user_needs() -> None:
    done = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[1] for line in done.stdout.splitlines() if line.strip()}
    assert {"demo", "test", "install", "lock", "upgrade", "test-latest", "bench"} <= listed
    # Each line says what the target does.
    assert all(len(line.split()) > 2 for line in done.stdout.splitlines() if line.strip())
