""".ci/run: runs the README's test command (`make test`) and fails, naming the paths, when the
tests leave `git status --porcelain` non-empty. Checked in a scratch git repo with a stand-in
`make` on PATH (the real `make test` is what .ci/run itself runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def _run_ci(tmp_path: Path, make_body: str) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / ".gitignore").write_text(".jax_cache/\n")
    (repo / "kept.txt").write_text("committed\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "make"
    fake.write_text(f"#!/usr/bin/env bash\n[ \"$1\" = test ] || exit 97\n{make_body}\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(repo / ".ci" / "run")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_clean_run_passes_and_ignored_caches_are_fine(tmp_path):
    r = _run_ci(tmp_path, "mkdir -p .jax_cache && touch .jax_cache/x; exit 0")
    assert r.returncode == 0, r.stderr


def test_a_test_that_writes_into_the_checkout_fails_ci_naming_the_paths(tmp_path):
    r = _run_ci(tmp_path, "mkdir -p evals/results && touch evals/results/shot.png; "
                          "echo changed > kept.txt; exit 0")
    assert r.returncode == 1
    assert "?? evals/results/shot.png" in r.stderr and " M kept.txt" in r.stderr, r.stderr


def test_failing_tests_keep_their_exit_status(tmp_path):
    r = _run_ci(tmp_path, "exit 2")
    assert r.returncode == 2, r.stderr
