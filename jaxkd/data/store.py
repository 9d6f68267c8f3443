"""Built data on disk: JSONL files under ``jaxkd/data/built/`` read back as ``datasets.Dataset``.

Files are written with sorted keys and one record per line so a rebuild from the same corpus is
byte-identical (the build is idempotent and the diff of a corpus change is readable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

BUILT_DIR = Path(__file__).resolve().parent / "built"
SPLIT_NAMES = ("train", "val", "test")


def dumps_jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_text_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds exactly it; True when the file changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `python -m jaxkd.data build` first")
    return [row for _, row in jsonl_lines(path)]


def _resolve(name: str, built_dir: str | Path | None) -> Path:
    built = Path(built_dir) if built_dir is not None else BUILT_DIR
    if name in SPLIT_NAMES:
        return built / f"{name}.jsonl"
    if name == "heldout":
        return built / "heldout_qa.jsonl"
    raise ValueError(f"unknown built data {name!r}; use one of {[*SPLIT_NAMES, 'all', 'heldout']}")


def load_records(split: str = "all", *, built_dir: str | Path | None = None) -> list[dict]:
    """Cleaned records of one split (or all, or the held-out QA items) as plain dicts."""
    if split == "all":
        return [r for name in SPLIT_NAMES for r in read_jsonl(_resolve(name, built_dir))]
    return read_jsonl(_resolve(split, built_dir))


def load_dataset(split: str = "all", *, built_dir: str | Path | None = None):
    """The same rows as a ``datasets.Dataset`` (Arrow in memory, built from the JSONL file)."""
    import datasets

    names = SPLIT_NAMES if split == "all" else (split,)
    paths = [_resolve(n, built_dir) for n in names]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `python -m jaxkd.data build` first")
    return datasets.Dataset.from_json([str(p) for p in paths], keep_in_memory=True)


def jsonl_lines(path: str | Path, hint: str = "") -> list[tuple[int, Any]]:
    """(line number, object) for each non-blank line of a JSON-lines file; a bad line is a
    ``ValueError`` naming ``path:line`` (then ``hint``)."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e}){hint}") from None
    return out


class JsonlCache:
    """One JSON object per line, each with a ``key``; later lines win. Appends as results come."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for _, row in jsonl_lines(self.path, hint="; delete the line or the file"):
                self.rows[row["key"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, rows: Sequence[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                self.rows[row["key"]] = row
