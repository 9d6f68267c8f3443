"""One evaluation of a set of models on the same items with the same decoding, one report.

    python -m evals.run --config configs/eval.yaml            # every model, judge on
    python -m evals.run --config configs/eval_cpu.yaml        # the subset run on the 2-core CPU
    python -m evals.run --config configs/eval_cpu.yaml --report-only   # rebuild from the caches
    python -m evals.run --config configs/eval_cpu.yaml models.1.model=/path/to/run   # overrides

Per model (each in a fresh process, so peak RSS is its own and memory is returned):
  domain      answers to the held-out items (``items``: the first N test records, interleaved
              across categories; every phrasing of a chosen record), greedy unless ``sampling``
              says otherwise; rule scores from ``jaxkd.rewards``
  retention   perplexity on the general English sample (jaxkd/data/general/text.txt) and answers
              to the general QA / chat sanity set (accept-substring pass, ROUGE-L to the
              reference, offline language signal)
  efficiency  prefill / decode tok/s at each batch size (min and median of >= 5 reps), peak
              RSS, parameters, on-disk weight bytes, the machine
Then, if ``judge.enabled``, one judge (``jaxkd.judge``; by default a preset that is not under
test) scores every domain answer: technical (task success), completeness, utility 0-10,
language 0-5. ``evals.report`` writes ``<results_dir>/<name>.{md,json}`` and plots.

Caches (``cache_dir``/<tag>/*.jsonl) are keyed by the weights identity (``evals.identity``: a
hash of file metadata, the packaged asset's sha256, a run's step and run.json) plus the prompt and
the decoding settings; ``cache_dir/manifest_<name>.json`` records, per tag, the keys of the last run, and
is all ``--report-only`` needs besides the caches (no model is loaded).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from evals.measure import model_dir, read_manifest, update_manifest
from jaxkd.config import ConfigError, SamplingConfig, _frozen, from_dict, to_dict

DEFAULT_JUDGES = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@_frozen
class EvalModel:
    """One model under evaluation."""

    tag: str                                     # name in the report and the cache directory
    model: str                                   # preset, run dir (runs/<name>), .gguf or HF dir
    grounding: Literal["none", "reference"] = "none"   # reference: the record's steps in the prompt
    step: int | None = None                      # run dirs: checkpoint step (None: the latest)
    role: str = ""                               # for people: "base student", "KD student", ...

    def __post_init__(self) -> None:
        if not _TAG.match(self.tag):
            raise ConfigError(f"models: tag {self.tag!r} may only hold letters, digits, '_', '.', '-'")
        if not self.model:
            raise ConfigError(f"models.{self.tag}.model is empty: give a preset, run dir, .gguf or HF dir")


@_frozen
class Contrast:
    """A paired comparison besides the baseline's: ``model`` minus ``vs`` on the same items (an
    ablation against the run it varies)."""

    model: str
    vs: str


@_frozen
class ItemsConfig:
    split: Literal["train", "val", "test"] = "test"
    records: int = 0          # first N records of the split, category-interleaved (0: all)

    def __post_init__(self) -> None:
        if self.records < 0:
            raise ConfigError(f"items.records must be >= 0 (0 = all), got {self.records}")


@_frozen
class JudgeSection:
    enabled: bool = False
    model: str | None = None          # None: the first of DEFAULT_JUDGES that is not under test
    allow_model_under_test: bool = False
    batch_size: int = 8
    max_answer_tokens: int = 512
    dtype: str | None = None          # the judge model's param / matmul dtype (jaxkd.config.JudgeConfig)


@_frozen
class RetentionConfig:
    perplexity: bool = True
    ppl_window: int = 512             # tokens scored per forward pass (non-overlapping windows)
    ppl_block: int = 32               # scored tokens per bootstrap unit
    ppl_max_tokens: int = 0           # 0: the whole text
    sanity: bool = True
    sanity_limit: int = 0             # first N sanity prompts (0: all 61)
    sanity_max_new_tokens: int = 64
    sanity_system_prompt: Literal["served", "none"] = "served"   # served: the model's own prompt

    def __post_init__(self) -> None:
        for k in ("ppl_window", "ppl_block", "sanity_max_new_tokens"):
            if getattr(self, k) <= 1:
                raise ConfigError(f"retention.{k} must be > 1, got {getattr(self, k)}")


@_frozen
class EfficiencyConfig:
    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1, 8)
    reps: int = 5
    new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.reps < 5:
            raise ConfigError(f"efficiency.reps must be >= 5 (min and median of at least 5), got {self.reps}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"efficiency.batch_sizes must be positive integers, got {list(self.batch_sizes)}")
        if self.new_tokens < 2:
            raise ConfigError(f"efficiency.new_tokens must be >= 2, got {self.new_tokens}")


@_frozen
class FailureConfig:
    """Thresholds of the failure categories (evals.report.failure_flags documents each)."""

    missing_share: float = 0.5        # missing step: this share of reference steps or more get no credit
    repetition: float = 0.2           # repetition: repeated word 3-grams share at least this
    verbosity_ratio: float = 2.0      # verbosity: answer words > ratio x reference-step words
    off_topic_overlap: float = 0.15   # off-topic: no rule credit and under this share of on-topic words


@_frozen
class EvalConfig:
    baseline: str                                 # tag of the base student: paired differences vs it
    models: tuple[EvalModel, ...]
    name: str = "eval_report"                     # <results_dir>/<name>.{md,json}, <name>_*.png
    results_dir: str = "evals/results"
    cache_dir: str = "evals/results/eval_cache"
    items: ItemsConfig = ItemsConfig()
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=160, temperature=0.0)
    batch_size: int = 8
    max_seq_len: int = 1024
    judge: JudgeSection = JudgeSection()
    retention: RetentionConfig = RetentionConfig()
    efficiency: EfficiencyConfig = EfficiencyConfig()
    failures: FailureConfig = FailureConfig()
    bootstrap_resamples: int = 4000
    level: float = 0.95
    seed: int = 0
    notes: tuple[str, ...] = ()                   # printed under "Notes" in the report (observations)
    contrasts: tuple[Contrast, ...] = ()          # extra paired comparisons (counted in the Bonferroni m)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models: give at least one model")
        tags = [m.tag for m in self.models]
        dup = sorted({t for t in tags if tags.count(t) > 1})
        if dup:
            raise ConfigError(f"models: tags must be unique, repeated: {dup}")
        if self.baseline not in tags:
            raise ConfigError(f"baseline {self.baseline!r} is not a model tag; tags: {tags}")
        for c in self.contrasts:
            bad = [t for t in (c.model, c.vs) if t not in tags]
            if bad or c.model == c.vs:
                raise ConfigError(f"contrasts: {{model: {c.model}, vs: {c.vs}}} needs two different model tags"
                                  + (f"; not tags: {bad}" if bad else "") + f"; tags: {tags}")
        if not _TAG.match(self.name):
            raise ConfigError(f"name {self.name!r} may only hold letters, digits, '_', '.', '-'")
        if self.batch_size <= 0 or self.max_seq_len <= self.sampling.max_new_tokens:
            raise ConfigError(f"batch_size must be > 0 and max_seq_len ({self.max_seq_len}) > "
                              f"sampling.max_new_tokens ({self.sampling.max_new_tokens})")
        if not 0.5 < self.level < 1:
            raise ConfigError(f"level must be in (0.5, 1), got {self.level}")
        if self.bootstrap_resamples < 1000:
            raise ConfigError(f"bootstrap_resamples must be >= 1000, got {self.bootstrap_resamples}")
        if self.judge.enabled and self.judge.model is not None and not self.judge.allow_model_under_test:
            same = [m.tag for m in self.models if m.model == self.judge.model]
            if same:
                raise ConfigError(f"judge.model {self.judge.model!r} is also under test ({same}); pick "
                                  f"another judge or set judge.allow_model_under_test: true")

    def judge_model(self) -> str:
        """The judge: ``judge.model``, else the first default preset not under test."""
        if self.judge.model:
            return self.judge.model
        under = {m.model for m in self.models}
        for c in DEFAULT_JUDGES:
            if c not in under:
                return c
        if self.judge.allow_model_under_test:
            return DEFAULT_JUDGES[0]
        raise ConfigError(f"judge.model unset and every default judge {list(DEFAULT_JUDGES)} is under test; "
                          f"set judge.model (or judge.allow_model_under_test: true)")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """The eval config at ``path`` with ``key=value`` overrides (``models.1.model=...`` indexes
    the model list); errors name the file and the key."""
    from jaxkd.config import read_yaml

    data = read_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        import yaml

        node: Any = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {part!r} is not an index of a {len(node)}-entry list")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    try:
        return from_dict(EvalConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------


def select_items(split: str, records: int, items: Sequence[Mapping] | None = None) -> list[dict]:
    """Held-out items of the first ``records`` records of ``split`` (0: all), records taken in
    turn from each category (sorted), every item of a chosen record, in record order."""
    if items is None:
        from jaxkd.data.store import load_records

        ids = {r["id"] for r in load_records(split)}
        items = [it for it in load_records("heldout") if it["record_id"] in ids]
    by_rec: dict[str, list[dict]] = defaultdict(list)
    for it in sorted(items, key=lambda r: r["id"]):
        by_rec[it["record_id"]].append(dict(it))
    by_cat: dict[str, list[str]] = defaultdict(list)
    for rid in sorted(by_rec):
        by_cat[by_rec[rid][0]["category"]].append(rid)
    order = [by_cat[c][i] for i in range(max((len(v) for v in by_cat.values()), default=0))
             for c in sorted(by_cat) if i < len(by_cat[c])]
    chosen = order[:records] if records > 0 else order
    return [it for rid in chosen for it in by_rec[rid]]


# --------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------


def _messages(system: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def run_model(cfg: EvalConfig, m: EvalModel, items: Sequence[Mapping], *, loader: Callable[[str], Any] | None = None,
              identity: Callable[..., dict] | None = None, log: Callable[[str], None] = print,
              command: str = "") -> dict[str, Any]:
    """Answers, retention and throughput of one model, from cache where the key matches; the
    model is loaded only if something is missing. Returns (and stores) its manifest entry."""
    from evals.domain import item_messages
    from evals.identity import weights_identity
    from evals.measure import (GEN_VERSION, JsonlCache, cache_key, count_params, generate_missing, machine_info,
                               now, peak_rss_gib, perplexity, text_token_ids, throughput)
    from jaxkd.data.general import load_general_text, load_sanity_qa
    from jaxkd.serving import served_system_prompt

    ident = (identity or weights_identity)(m.model, m.step)
    wid = ident["id"]
    system = served_system_prompt(m.model)
    sampling = to_dict(cfg.sampling)
    d = model_dir(cfg, m.tag)
    gens, ppl_cache, eff_cache = JsonlCache(d / "generations.jsonl"), JsonlCache(d / "perplexity.jsonl"), \
        JsonlCache(d / "efficiency.jsonl")
    state: dict[str, Any] = {"loaded": None}

    def loaded():
        if state["loaded"] is None:
            t0 = time.perf_counter()
            if loader is not None:
                state["loaded"] = loader(m.model)
            else:
                from jaxkd.serving import load_model

                state["loaded"] = load_model(m.model, step=m.step)
            state["load_s"] = time.perf_counter() - t0
            log(f"[{m.tag}] loaded {state['loaded'].name} in {state['load_s']:.0f}s")
        return state["loaded"]

    prov = {"tag": m.tag, "model": m.model, "weights": wid, "command": command, "date": now()}
    # domain answers
    dom_msgs = [item_messages(it, m.grounding, system or "") for it in items]
    dom_keys = {it["id"]: cache_key(kind="domain", w=wid, messages=msg, sampling=sampling, v=GEN_VERSION)
                for it, msg in zip(items, dom_msgs)}
    # sanity answers
    sanity = load_sanity_qa()
    if cfg.retention.sanity_limit:
        sanity = sanity[:cfg.retention.sanity_limit]
    s_sampling = {**sampling, "max_new_tokens": cfg.retention.sanity_max_new_tokens}
    s_system = system if cfg.retention.sanity_system_prompt == "served" else None
    s_msgs = [_messages(s_system, q["prompt"]) for q in sanity] if cfg.retention.sanity else []
    s_keys = {q["id"]: cache_key(kind="sanity", w=wid, messages=msg, sampling=s_sampling, v=GEN_VERSION)
              for q, msg in zip(sanity, s_msgs)}
    missing = [k for k in [*dom_keys.values(), *s_keys.values()] if k not in gens]
    if missing:
        from jaxkd.models.generate import chat_ids

        lm = loaded()
        log(f"[{m.tag}] generating {len(missing)} answers")
        for kind, its, msgs, keys, samp in (("domain", items, dom_msgs, dom_keys, cfg.sampling),
                                            ("sanity", sanity, s_msgs, s_keys,
                                             SamplingConfig(**s_sampling))):
            reqs = [(keys[it["id"]], chat_ids(lm.tokenizer, msg), {"kind": kind, "item_id": it["id"]})
                    for it, msg in zip(its, msgs) if keys.get(it["id"]) in missing]
            generate_missing(lm, reqs, samp, gens, batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                             provenance=prov, log=log)
    # perplexity on the general text
    ppl_key = None
    if cfg.retention.perplexity:
        text = load_general_text()
        r = cfg.retention
        ppl_key = cache_key(kind="ppl", w=wid, text=__import__("hashlib").sha256(text.encode()).hexdigest(),
                            window=r.ppl_window, block=r.ppl_block, max_tokens=r.ppl_max_tokens)
        if ppl_key not in ppl_cache:
            lm = loaded()
            ids = text_token_ids(lm.tokenizer, text, r.ppl_max_tokens)
            t0 = time.perf_counter()
            res = perplexity(lm.model, ids, window=r.ppl_window, block=r.ppl_block)
            log(f"[{m.tag}] perplexity {res['perplexity']:.3f} over {res['n_tokens']} tokens "
                f"({time.perf_counter() - t0:.0f}s)")
            ppl_cache.add([{"key": ppl_key, **res, "token_ids_sha256": cache_key(ids=ids), "provenance": prov}])
    # throughput
    eff_key = None
    if cfg.efficiency.enabled:
        e = cfg.efficiency
        machine = machine_info()
        eff_key = cache_key(kind="efficiency", w=wid, node=machine["node"], cpu=machine["cpu"],
                            batch_sizes=list(e.batch_sizes), reps=e.reps, new_tokens=e.new_tokens,
                            prompts=[dom_keys[it["id"]] for it in items[:max(e.batch_sizes)]])
        if eff_key not in eff_cache:
            from jaxkd.models.generate import chat_ids

            lm = loaded()
            log(f"[{m.tag}] throughput at batch {list(e.batch_sizes)}, {e.reps} reps")
            prompts = [chat_ids(lm.tokenizer, msg) for msg in dom_msgs[:max(e.batch_sizes)]]
            tp = throughput(lm, prompts, batch_sizes=e.batch_sizes, reps=e.reps, new_tokens=e.new_tokens,
                            max_seq_len=cfg.max_seq_len, log=log)
            eff_cache.add([{"key": eff_key, "throughput": tp, "params": count_params(lm.model),
                            "disk_bytes": ident.get("bytes", 0), "peak_rss_gib": peak_rss_gib(),
                            "load_s": state.get("load_s"), "machine": machine, "provenance": prov}])
    entry = {"model": m.model, "grounding": m.grounding, "step": m.step, "role": m.role, "weights": ident,
             "system_prompt": system, "name": state["loaded"].name if state["loaded"] is not None else None,
             "sampling": sampling, "domain_keys": dom_keys, "sanity_keys": s_keys, "sanity_sampling": s_sampling,
             "ppl_key": ppl_key, "efficiency_key": eff_key, "command": command, "date": now()}
    update_manifest(cfg, m.tag, entry)
    return entry


# --------------------------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------------------------


def run_judge(cfg: EvalConfig, items: Sequence[Mapping], *, judge: Any = None, judge_id: str | None = None,
              log: Callable[[str], None] = print) -> dict[str, str]:
    """Judge every model's domain answers with one judge; scores cached per tag in
    ``judge.jsonl`` keyed by (judge weights, rubric, answer key). Returns {tag: judge key prefix}.
    ``judge``: anything with ``LLMJudge.score``'s signature (tests pass a fake)."""
    from evals.identity import weights_identity
    from evals.measure import JsonlCache, cache_key, now
    from jaxkd.judge import CRITERIA, RUBRIC_VERSION, Criterion, dtype_tag

    name = cfg.judge_model()
    jid = judge_id or weights_identity(name)["id"] + dtype_tag(cfg.judge.dtype)
    manifest = read_manifest(cfg)
    by_id = {it["id"]: it for it in items}
    out = {}
    for m in cfg.models:
        entry = manifest.get(m.tag)
        if entry is None:
            raise RuntimeError(f"no manifest entry for {m.tag}: run its answers first")
        gens = JsonlCache(model_dir(cfg, m.tag) / "generations.jsonl")
        jc = JsonlCache(model_dir(cfg, m.tag) / "judge.jsonl")
        keys = {i: cache_key(kind="judge", judge=jid, rubric=RUBRIC_VERSION, answer=k)
                for i, k in entry["domain_keys"].items()}
        todo = [i for i in entry["domain_keys"] if keys[i] not in jc]
        if todo:
            if judge is None:
                from jaxkd.config import JudgeConfig
                from jaxkd.judge import load_judge

                judge = load_judge(name, config=JudgeConfig(model=name, batch_size=cfg.judge.batch_size,
                                                            max_answer_tokens=cfg.judge.max_answer_tokens,
                                                            dtype=cfg.judge.dtype),
                                   cache_dir=Path(cfg.cache_dir) / "judgements", log=log)
            log(f"[judge {name}] {m.tag}: {len(todo)} answers")
            v = judge.score([by_id[i] for i in todo], [gens.get(entry["domain_keys"][i])["answer"] for i in todo],
                            list(Criterion))
            rows = []
            for j, i in enumerate(todo):
                rows.append({"key": keys[i], "item_id": i, "judge": name, "judge_weights": jid,
                             "rubric": RUBRIC_VERSION, "date": now(),
                             "scores": {c.value: float(v[c].score[j]) for c in v},
                             "max": {c.value: CRITERIA[c].max_score for c in v},
                             "mass": {c.value: float(v[c].mass[j]) for c in v}})
            jc.add(rows)
        entry["judge"] = {"model": name, "weights": jid, "rubric": RUBRIC_VERSION, "keys": keys}
        update_manifest(cfg, m.tag, entry)
        out[m.tag] = jid
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the caches (no model)")
    p.add_argument("--only", default=None, help="run this model tag only (in this process), no report")
    p.add_argument("--judge-only", action="store_true", help="run the judge stage only (in this process)")
    p.add_argument("--in-process", action="store_true", help="run every model in this process")
    p.add_argument("--tags", nargs="+", default=None,
                   help="restrict the run / report to these model tags (the baseline must be among them)")
    p.add_argument("overrides", nargs="*", help="key=value (models.<i>.<key>=... for a model)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.tags:
            import dataclasses

            unknown = [t for t in args.tags if t not in {m.tag for m in cfg.models}]
            if unknown:
                raise ConfigError(f"--tags {unknown}: not model tags of {args.config}")
            cfg = dataclasses.replace(cfg, models=tuple(m for m in cfg.models if m.tag in args.tags),
                                      contrasts=tuple(c for c in cfg.contrasts
                                                      if {c.model, c.vs} <= set(args.tags)))
        judge_name = cfg.judge_model() if cfg.judge.enabled else None
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "evals.run", "--config", args.config,
                                                 *(["--only", args.only] if args.only else []),
                                                 *(["--tags", *args.tags] if args.tags else []), *args.overrides])
    items = select_items(cfg.items.split, cfg.items.records)
    if args.report_only:
        from evals.report import build_report

        print(build_report(cfg, items, config_path=args.config, command=command, tags_arg=args.tags))
        return 0
    if args.only:
        m = {x.tag: x for x in cfg.models}.get(args.only)
        if m is None:
            print(f"--only {args.only!r}: not a model tag of {args.config}", file=sys.stderr)
            return 2
        run_model(cfg, m, items, command=command)
        return 0
    if args.judge_only:
        run_judge(cfg, items)
        return 0
    print(f"{len(items)} items of {len({it['record_id'] for it in items})} records ({cfg.items.split}); "
          f"models: {[m.tag for m in cfg.models]}" + (f"; judge: {judge_name}" if judge_name else ""))
    for m in cfg.models:
        t0 = time.perf_counter()
        if args.in_process:
            run_model(cfg, m, items, command=command)
        else:
            rc = subprocess.call([sys.executable, "-m", "evals.run", "--config", args.config, "--only", m.tag,
                                  *(["--tags", *args.tags] if args.tags else []), *args.overrides])
            if rc:
                print(f"model {m.tag} failed (exit {rc})", file=sys.stderr)
                return rc
        print(f"[{m.tag}] done in {time.perf_counter() - t0:.0f}s", flush=True)
    if cfg.judge.enabled:
        if args.in_process:
            run_judge(cfg, items)
        elif subprocess.call([sys.executable, "-m", "evals.run", "--config", args.config, "--judge-only",
                              *(["--tags", *args.tags] if args.tags else []), *args.overrides]):
            return 1
    from evals.report import build_report

    print(build_report(cfg, items, config_path=args.config, command=command, tags_arg=args.tags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
