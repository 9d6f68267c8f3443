"""``python -m jaxkd.data build|stats``: build the cleaned corpus and splits; report counts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxkd.config import ConfigError, load
from jaxkd.data.build import BuildConfig, build, summary_lines
from jaxkd.data.schema import CORPUS_DIR, CorpusError
from jaxkd.data.stats import RESULTS_DIR, compute_stats, plot, print_tables, to_markdown
from jaxkd.data.store import BUILT_DIR, write_text_if_changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="raw YAML -> validated -> cleaned -> splits (idempotent)")
    b.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    b.add_argument("--out", type=Path, default=BUILT_DIR)
    b.add_argument("--config", type=Path, default=None, help="YAML with clean: / split: sections")
    b.add_argument("--set", dest="overrides", action="append", default=[],
                   help="override, e.g. --set clean.content_threshold=0.6 --set split.seed=3")
    b.add_argument("--strict", action="store_true",
                   help="exit 1 when there are lint warnings (soft schema rules)")
    b.add_argument("--check", action="store_true",
                   help="exit 1 if the build would change any file (use in CI)")
    s = sub.add_parser("stats", help="counts per device/category/issue/source/split, table + PNG")
    s.add_argument("--built", type=Path, default=BUILT_DIR)
    s.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    if args.command == "build":
        try:
            cfg = load(BuildConfig, args.config, args.overrides)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        out = args.out
        if args.check:
            import tempfile
            import shutil
            tmp = Path(tempfile.mkdtemp())
            if out.exists():
                shutil.copytree(out, tmp, dirs_exist_ok=True)
            out = tmp
        try:
            manifest = build(args.corpus, out, cfg)
        except CorpusError as e:
            print(e, file=sys.stderr)
            return 2
        print(manifest["summary_text"])
        print("\n".join(summary_lines(manifest)))
        if args.strict and manifest["checks"]["lint_warnings"]:
            print(f"{len(manifest['checks']['lint_warnings'])} lint warning(s), see above",
                  file=sys.stderr)
            return 1
        if args.check and manifest["changed_files"]:
            print(f"built data is out of date: {manifest['changed_files']}; run "
                  "`python -m jaxkd.data build` and commit jaxkd/data/built/", file=sys.stderr)
            return 1
        return 0

    stats = compute_stats(args.built)
    print_tables(stats)
    manifest_path = args.built / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_if_changed(args.out / "data_stats.md", to_markdown(stats, manifest))
    plot(stats, args.out / "data_stats.png")
    print(f"wrote {args.out / 'data_stats.md'} and {args.out / 'data_stats.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
