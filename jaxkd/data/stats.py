"""Counts of the built data per device, category, issue, source and split: a rich table in the
terminal, a Markdown file and a PNG bar chart (``evals/results/data_stats.{md,png}``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jaxkd.data.schema import CATEGORIES, DEVICES, ISSUES, REPO_ROOT, SOURCES
from jaxkd.data.splits import SPLITS
from jaxkd.data.store import BUILT_DIR, load_records

RESULTS_DIR = REPO_ROOT / "evals" / "results"
FACETS = ("device", "category", "issue", "source")


def compute_stats(built_dir: str | Path = BUILT_DIR) -> dict:
    """``{facet: {value: {split: n_records}}}`` plus question and held-out totals."""
    records = load_records("all", built_dir=built_dir)
    heldout = load_records("heldout", built_dir=built_dir)
    order = {"device": list(DEVICES), "category": list(CATEGORIES), "issue": list(ISSUES),
             "source": list(SOURCES)}
    table: dict[str, dict[str, dict[str, int]]] = {}
    for facet in FACETS:
        counts = Counter((r[facet], r["split"]) for r in records)
        present = {r[facet] for r in records}
        table[facet] = {v: {s: counts[(v, s)] for s in SPLITS} for v in order[facet] if v in present}
    held = Counter(h["category"] for h in heldout)
    return {
        "facets": table,
        "splits": {s: sum(r["split"] == s for r in records) for s in SPLITS},
        "records": len(records),
        "questions": sum(len(r["questions"]) for r in records),
        "heldout": len(heldout),
        "heldout_by_category": {c: held[c] for c in CATEGORIES if held[c]},
        "devices_missing": [d for d in DEVICES if d not in table["device"]],
    }


def to_markdown(stats: dict, manifest: dict | None = None) -> str:
    lines = ["# Data statistics", "",
             "Written by `python -m jaxkd.data stats` from the built data in `jaxkd/data/built/`.", "",
             f"- records: {stats['records']} (train {stats['splits']['train']}, val "
             f"{stats['splits']['val']}, test {stats['splits']['test']})",
             f"- questions (user phrasings): {stats['questions']}",
             f"- held-out QA questions: {stats['heldout']} "
             f"({', '.join(f'{c} {n}' for c, n in stats['heldout_by_category'].items())})"]
    if manifest is not None:
        c, k = manifest["counts"], manifest["checks"]
        lines += [f"- raw records {c['raw_records']}; symptom clusters {c['clusters']} (largest "
                  f"{c['largest_cluster']})",
                  f"- cross-split near-duplicate pairs: {k['cross_split_near_duplicates']}; held-out "
                  f"max Jaccard to a train question: {k['heldout_max_jaccard_to_train_question']}",
                  f"- lint warnings (soft schema rules, listed in `jaxkd/data/built/manifest.json`): "
                  f"{len(k.get('lint_warnings', []))}",
                  f"- dedup removals: see `jaxkd/data/built/dedup_report.md`"]
    if stats["devices_missing"]:
        lines.append(f"- devices without records: {', '.join(stats['devices_missing'])}")
    for facet in FACETS:
        lines += ["", f"## Per {facet}", "", f"| {facet} | train | val | test | total |",
                  "|---|---:|---:|---:|---:|"]
        for value, row in stats["facets"][facet].items():
            lines.append(f"| {value} | {row['train']} | {row['val']} | {row['test']} | "
                         f"{sum(row.values())} |")
    return "\n".join(lines) + "\n"


def print_tables(stats: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for facet in FACETS:
        t = Table(title=f"records per {facet}")
        for col in (facet, *SPLITS, "total"):
            t.add_column(col, justify="left" if col == facet else "right")
        for value, row in stats["facets"][facet].items():
            t.add_row(value, *(str(row[s]) for s in SPLITS), str(sum(row.values())))
        console.print(t)
    console.print(f"records {stats['records']}, questions {stats['questions']}, "
                  f"held-out QA {stats['heldout']}, splits {stats['splits']}")


def plot(stats: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(16, 12), gridspec_kw={"height_ratios": [3, 2]})
    colors = {"train": "#4c72b0", "val": "#dd8452", "test": "#55a868"}
    for ax, facet in zip(axes.ravel(), ("device", "issue", "category", "source")):
        rows = stats["facets"][facet]
        names = list(rows)
        left = [0] * len(names)
        for split in SPLITS:
            vals = [rows[n][split] for n in names]
            ax.barh(names, vals, left=left, color=colors[split], label=split)
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_title(f"records per {facet}")
        ax.set_xlabel("records")
        ax.tick_params(axis="y", labelsize=7 if len(names) > 20 else 9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=3)
    fig.suptitle(f"jaxkd corpus: {stats['records']} records, {stats['questions']} questions, "
                 f"{stats['heldout']} held-out QA")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
