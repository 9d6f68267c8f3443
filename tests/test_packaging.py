"""``jaxkd``, ``demo`` and ``evals`` install as packages: a script outside the checkout (another
working directory, no PYTHONPATH) can import all three.

Two views: the wheel built from this checkout's setup.cfg carries the three packages (checked by
importing from the unpacked wheel), and the environment's install (``make setup``: editable)
serves them to a process started in a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("jaxkd", "jaxkd.models", "demo", "demo.settings", "demo.stt", "demo.loadtest", "demo.probe",
           "demo.app", "evals", "evals.domain", "evals.stt_wer")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    return env


def _import_probe(cwd: Path, prefix: str = "") -> dict:
    """Import MODULES in a fresh interpreter started in ``cwd``; their files as JSON."""
    code = (prefix + "import importlib, json\n"
            f"mods = {MODULES!r}\n"
            "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)
    return {"rc": proc.returncode, "stderr": proc.stderr[-3000:],
            "files": json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}}


def _can_build_offline() -> bool:
    """setuptools here can build a wheel without fetching anything (bdist_wheel is built into
    setuptools >= 70.1; older ones need the wheel package)."""
    import importlib.util

    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not _can_build_offline(),
                    reason="this environment's setuptools cannot build a wheel offline (needs >= 70.1)")
def test_wheel_of_this_checkout_carries_jaxkd_demo_and_evals(tmp_path):
    src = tmp_path / "src"  # build from a copy so no build/ or egg-info lands in the checkout
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
    for pkg in ("jaxkd", "demo", "evals"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("jaxkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("demo/app.py", "demo/ui.py", "demo/probe.py", "evals/domain.py", "evals/stt_wer.py",
              "jaxkd/data/built/heldout_qa.jsonl"):
        assert f in names, f"{f} is missing from the wheel"
    assert not any(n.startswith(("tests/", "evals/results/")) for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _import_probe(elsewhere, prefix=f"import sys; sys.path.insert(0, {str(site)!r})\n")
    assert out["rc"] == 0, out["stderr"]
    for mod, file in out["files"].items():
        assert Path(file).is_relative_to(site), (mod, file)


def test_installed_packages_import_from_outside_the_checkout(tmp_path):
    where = subprocess.run([sys.executable, "-c", "import jaxkd; print(jaxkd.__file__)"], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, ("jaxkd is not installed in this environment (`make setup`): "
                                   + where.stderr[-2000:])
    installed = Path(where.stdout.strip()).resolve().parent.parent
    if installed != ROOT:
        pytest.skip(f"the environment's jaxkd is installed from another checkout ({installed}); "
                    f"this test checks the install of {ROOT} (a clean clone's `make test` does)")
    out = _import_probe(tmp_path)
    assert out["rc"] == 0, ("outside the checkout, importing jaxkd/demo/evals failed: refresh the "
                            "install from this checkout (`make setup`, or `pip install --no-deps -e .`)"
                            f"\n{out['stderr']}")
    for mod, file in out["files"].items():
        assert Path(file).resolve().is_relative_to(ROOT), (mod, file)
    # The demo's default config is found from anywhere (it is read from the checkout).
    proc = subprocess.run([sys.executable, "-c", "from demo.settings import load_demo_config; "
                           "print(load_demo_config().stt.model)"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "packaged:tiny.en", proc.stderr[-2000:]
