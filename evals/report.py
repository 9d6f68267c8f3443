"""The evaluation report, built from the caches of ``evals.run`` alone (no model is loaded).

``build_report(cfg, items)`` reads ``<cache_dir>/manifest_<name>.json`` (which cache rows the last run of
each model produced) and the JSONL caches, rescores every answer with ``jaxkd.rewards`` (the
scorers are cheap and deterministic, so a scorer fix shows up on the next rebuild), and writes
``<results_dir>/<name>.md``, ``.json`` and ``<name>_domain.png`` / ``<name>_failures.png``.

Intervals: record-level bootstrap (``evals.stats``; the items of one record are resampled
together), percentile, ``cfg.bootstrap_resamples`` resamples. Paired differences are vs
``cfg.baseline`` on the same items; the report states how many comparisons the paired tables
make and gives Bonferroni-adjusted intervals next to the unadjusted 95% ones.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from evals.stats import bonferroni_level, cluster_ratio_ci, paired_record_diff, record_bootstrap_ci

# Device nouns per device id. Own nouns tell an answer is about the asked device; the
# unambiguous ones (no common verb or generic sense: not "plug", "light", "ring", "box") are
# evidence that an answer is about another device.
DEVICE_NOUNS: dict[str, tuple[str, ...]] = {
    "anc_headphones": ("headphones", "headphone"), "atmos_soundbar_earc": ("soundbar",),
    "audio_glasses": ("glasses",), "bone_conduction_headphones": ("headphones", "headphone"),
    "computer_speakers": ("speakers", "speaker"), "fitness_tracker": ("tracker", "band"),
    "gaming_headset": ("headset",), "indoor_security_camera": ("camera",),
    "mesh_wifi_system": ("mesh", "node", "nodes", "router"), "neckband_earbuds": ("earbuds", "neckband", "buds"),
    "office_headset": ("headset",), "onear_wireless_headphones": ("headphones", "headphone"),
    "outdoor_battery_camera": ("camera",), "party_speaker": ("speaker",), "portable_bt_speaker": ("speaker",),
    "robot_vacuum": ("vacuum", "robot"), "rugged_outdoor_speaker": ("speaker",), "smart_display": ("display",),
    "smart_home_hub": ("hub",), "smart_lock": ("lock",), "smart_plug": ("plug",), "smart_ring": ("ring",),
    "smart_smoke_co_alarm": ("alarm", "detector"), "smart_speaker_assistant": ("speaker",),
    "smart_thermostat": ("thermostat",), "smart_tv": ("tv", "television"), "smartwatch": ("watch", "smartwatch"),
    "soundbar_wireless_sub": ("soundbar", "subwoofer", "sub"), "sport_earbuds": ("earbuds", "buds"),
    "streaming_box": ("box", "streamer"), "streaming_stick": ("stick", "streamer"),
    "true_wireless_earbuds": ("earbuds", "buds"), "video_doorbell": ("doorbell",),
    "wifi_multiroom_speaker": ("speaker",), "wifi_range_extender": ("extender", "repeater"),
    "wifi_router": ("router", "modem"), "wifi_smart_bulb": ("bulb", "light"), "zigbee_smart_bulb": ("bulb", "light"),
    "wired_headphones": ("headphones", "headphone"),
}
UNAMBIGUOUS = frozenset("""headphones headphone earbuds soundbar subwoofer tracker headset camera router modem
extender repeater vacuum doorbell thermostat smartwatch television bulb speaker speakers""".split())

FAILURES = ("missing_step", "wrong_step", "wrong_device", "unsafe_advice", "off_topic", "verbosity", "repetition",
            "truncated")
FAILURE_TEXT = {
    "missing_step": "half or more of the reference steps get no credit (step coverage)",
    "wrong_step": "advises what a reference step forbids (jaxkd.rewards.contradictions; only records whose "
                  "reference forbids something can fail it)",
    "wrong_device": "names another device type (an unambiguous noun not in the question or reference) and never its own",
    "unsafe_advice": "un-negated unsafe advice (jaxkd.rewards.UNSAFE_PATTERNS)",
    "off_topic": "no keyword or step credit and few words shared with the question / reference / device",
    "verbosity": "more words than verbosity_ratio x the reference steps' words",
    "repetition": "repeated word 3-grams at or above the threshold",
    "truncated": "stopped by the token budget, not by end-of-turn",
}

DOMAIN_METRICS = ("steps", "required", "actionable", "numbered", "language", "repetition", "unsafe", "words",
                  "truncated")
JUDGE_METRICS = ("judge_technical", "judge_completeness", "judge_utility", "judge_language")
PAIRED_DOMAIN = ("steps", "required", "language")
PAIRED_RETENTION = ("sanity_pass", "sanity_rougeL", "sanity_language", "ppl_nll")


# --------------------------------------------------------------------------------------------
# Per-answer scores and failure flags
# --------------------------------------------------------------------------------------------


def failure_flags(item: Mapping, answer: str, scores: Mapping, finish_reason: str, thresholds: Any) -> dict[str, bool]:
    """Which failure categories an answer falls in (several can hold at once); see FAILURE_TEXT."""
    from jaxkd.rewards import content_stems, contradictions, step_credits, words

    steps = item.get("reference_steps") or []
    credits = step_credits(answer, steps, item["question"]) if steps else []
    zero_share = (sum(c == 0 for c in credits) / len(credits)) if credits else 0.0
    ans_words = words(answer)
    ref_words = sum(len(words(s)) for s in steps)
    own = set(DEVICE_NOUNS.get(str(item.get("device")), ()))
    context = set(words(item["question"])) | {w for s in steps for w in words(s)}
    others = (set(ans_words) & UNAMBIGUOUS) - own - context
    names_own = bool(own & set(ans_words))
    ans_content = content_stems(answer)
    topic = content_stems(item["question"] + " " + " ".join(steps) + " " + " ".join(own))
    overlap = len(ans_content & topic) / len(ans_content) if ans_content else 0.0
    no_credit = not (scores.get("required") or 0) > 0 and not (scores.get("steps") or 0) > 0
    return {
        "missing_step": bool(credits) and zero_share >= thresholds.missing_share,
        "wrong_step": bool(contradictions(answer, steps)),
        "wrong_device": bool(others) and not names_own,
        "unsafe_advice": bool(scores.get("unsafe")),
        "off_topic": no_credit and overlap < thresholds.off_topic_overlap,
        "verbosity": ref_words > 0 and len(ans_words) > thresholds.verbosity_ratio * ref_words,
        "repetition": (scores.get("repetition") or 0) >= thresholds.repetition,
        "truncated": finish_reason == "length",
    }


def _score_domain(items: Sequence[Mapping], rows: Mapping[str, Mapping], thresholds: Any) -> list[dict]:
    from jaxkd.rewards import rule_scores, words

    out = []
    for it in items:
        row = rows[it["id"]]
        s = rule_scores(it, row["answer"])
        rec = {"id": it["id"], "record_id": it["record_id"], "category": it["category"], "device": it.get("device"),
               **{k: v for k, v in s.items() if k != "unsafe_sentences"}, "unsafe_sentences": s["unsafe_sentences"],
               "words": len(words(row["answer"])), "new_tokens": row["new_tokens"],
               "truncated": float(row["finish_reason"] == "length"), "finish_reason": row["finish_reason"]}
        rec["failures"] = failure_flags(it, row["answer"], s, row["finish_reason"], thresholds)
        out.append(rec)
    return out


def _score_sanity(sanity: Sequence[Mapping], rows: Mapping[str, Mapping]) -> list[dict]:
    from jaxkd.data.general import passes
    from jaxkd.rewards import language_signal, words
    from jaxkd.train.metrics import rouge_l

    answers = [rows[q["id"]]["answer"] for q in sanity]
    rl = rouge_l(answers, [q["reference"] for q in sanity]) if sanity else []
    return [{"id": q["id"], "category": q["category"], "sanity_pass": float(passes(a, q)), "sanity_rougeL": r,
             "sanity_language": language_signal(a, words(q["prompt"]) + words(q["reference"])),
             "finish_reason": rows[q["id"]]["finish_reason"]}
            for q, a, r in zip(sanity, answers, rl)]


# --------------------------------------------------------------------------------------------
# Loading the caches
# --------------------------------------------------------------------------------------------


class StaleCache(RuntimeError):
    """The caches do not hold what the config asks for; the message says what to run."""


def judge_scores(model_dir: Path, tag: str, judge_entry: Mapping[str, Any], judge: str,
                 dtype: str | None = None) -> dict[str, dict | None]:
    """item id -> ``tag``'s row in ``<model_dir>/judge.jsonl`` for the judge its manifest entry
    names (None where missing): the file also holds other judges' rows for the same answers.
    The entry must be the config's judge (``judge``) in the config's ``dtype``; otherwise the
    manifest was last judged under another config or override, and mixing its rows with another
    model's would compare two judges."""
    from evals.measure import JsonlCache

    have = judge_entry["weights"].partition(":dtype=")[2] or "float32"   # see jaxkd.judge.dtype_tag
    if judge_entry["model"] != judge or have != (dtype or "float32"):
        raise StaleCache(f"{tag}: the manifest's judge scores are {judge_entry['model']}'s ({have}), the config's "
                         f"judge is {judge} ({dtype or 'float32'}); run `python -m evals.run --config <this config> "
                         f"--judge-only`")
    jc = JsonlCache(Path(model_dir) / "judge.jsonl")
    return {i: jc.get(k) for i, k in judge_entry["keys"].items()}


def load_results(cfg: Any, items: Sequence[Mapping]) -> dict[str, dict]:
    """Per tag: scored domain items, sanity items, perplexity, efficiency, judge scores and the
    manifest entry, all from the caches."""
    from evals.measure import JsonlCache, manifest_path, model_dir, read_manifest
    from jaxkd.data.general import load_sanity_qa

    manifest = read_manifest(cfg)
    ids = [it["id"] for it in items]
    sanity = load_sanity_qa()
    if cfg.retention.sanity_limit:
        sanity = sanity[:cfg.retention.sanity_limit]
    res: dict[str, dict] = {}
    rerun = "run `python -m evals.run --config <this config>` (it regenerates only what is missing)"
    for m in cfg.models:
        e = manifest.get(m.tag)
        if e is None:
            raise StaleCache(f"no cached run of model {m.tag!r} in {manifest_path(cfg)}; {rerun}")
        if (e["model"], e["grounding"]) != (m.model, m.grounding):
            raise StaleCache(f"{m.tag}: the cache holds {e['model']} (grounding {e['grounding']}), the config asks "
                             f"for {m.model} (grounding {m.grounding}); {rerun}")
        if sorted(e["domain_keys"]) != sorted(ids):
            raise StaleCache(f"{m.tag}: the cached run answered {len(e['domain_keys'])} items, the config selects "
                             f"{len(ids)} (items.records changed?); {rerun}")
        d = model_dir(cfg, m.tag)
        gens = JsonlCache(d / "generations.jsonl")
        lost = [i for i, k in e["domain_keys"].items() if k not in gens]
        if lost:
            raise StaleCache(f"{m.tag}: generations.jsonl lacks answers for {lost[:3]}; {rerun}")
        dom_rows = {i: gens.get(k) for i, k in e["domain_keys"].items()}
        r: dict[str, Any] = {"entry": e, "domain": _score_domain(items, dom_rows, cfg.failures),
                             "answers": {i: row["answer"] for i, row in dom_rows.items()}}
        if cfg.retention.sanity and e.get("sanity_keys"):
            want = [q for q in sanity if q["id"] in e["sanity_keys"]]
            rows = {q["id"]: gens.get(e["sanity_keys"][q["id"]]) for q in want}
            if any(v is None for v in rows.values()) or len(want) != len(sanity):
                raise StaleCache(f"{m.tag}: sanity answers missing from the cache; {rerun}")
            r["sanity"] = _score_sanity(want, rows)
            r["sanity_answers"] = {q["id"]: rows[q["id"]]["answer"] for q in want}
        if cfg.retention.perplexity and e.get("ppl_key"):
            r["ppl"] = JsonlCache(d / "perplexity.jsonl").get(e["ppl_key"])
        if cfg.efficiency.enabled and e.get("efficiency_key"):
            r["efficiency"] = JsonlCache(d / "efficiency.jsonl").get(e["efficiency_key"])
        if cfg.judge.enabled:
            j = e.get("judge")
            if not j:
                raise StaleCache(f"{m.tag}: judge enabled but no judge scores cached; {rerun}")
            scores = judge_scores(d, m.tag, j, cfg.judge_model(), cfg.judge.dtype)
            if any(v is None for v in scores.values()):
                raise StaleCache(f"{m.tag}: judge scores missing from judge.jsonl; {rerun}")
            for rec in r["domain"]:
                row = scores[rec["id"]]
                for c, v in row["scores"].items():
                    rec[f"judge_{c}"] = v       # native scale: 0-10, language 0-5
                rec["judge_mass"] = min(row["mass"].values())
            r["judge"] = j
        res[m.tag] = r
    return res


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _ci(cfg: Any, values: Sequence[float], groups: Sequence[str], level: float | None = None) -> dict[str, Any]:
    mean, lo, hi = record_bootstrap_ci(values, groups, n=cfg.bootstrap_resamples, seed=cfg.seed,
                                       level=level or cfg.level)
    return {"mean": mean, "ci": [lo, hi], "n": int(np.isfinite(np.asarray(values, float)).sum())}


def _paired_row(cfg: Any, res: Mapping[str, dict], ref: str, t: str, paired_metrics: Sequence[str],
                ret_metrics: Sequence[str], adj: float) -> dict[str, Any]:
    """``t`` minus ``ref`` on the items (and sanity prompts, perplexity blocks) both answered:
    the difference, its record-level bootstrap interval, and the Bonferroni-adjusted one."""
    kw = dict(n=cfg.bootstrap_resamples, seed=cfg.seed)
    row: dict[str, Any] = {}
    a = {d["id"]: d for d in res[ref]["domain"]}
    common = [d for d in res[t]["domain"] if d["id"] in a]
    for k in paired_metrics:
        xa, xb, g = [a[d["id"]].get(k, np.nan) for d in common], [d.get(k, np.nan) for d in common], \
            [d["record_id"] for d in common]
        mean, lo, hi, n = paired_record_diff(xa, xb, g, level=cfg.level, **kw)
        _, alo, ahi, _ = paired_record_diff(xa, xb, g, level=adj, **kw)
        row[k] = {"diff": mean, "ci": [lo, hi], "ci_adjusted": [alo, ahi], "n": n}
    for k in ret_metrics:
        if k == "ppl_nll":
            pa, pb = res[ref]["ppl"], res[t]["ppl"]
            if pa["token_ids_sha256"] != pb["token_ids_sha256"]:
                row[k] = {"diff": pb["nll_sum"] / pb["n_tokens"] - pa["nll_sum"] / pa["n_tokens"], "ci": None,
                          "ci_adjusted": None, "n": None, "note": "different tokenizers: not paired"}
                continue
            ba, bb = np.asarray(pa["blocks"], float), np.asarray(pb["blocks"], float)
            mean, lo, hi = cluster_ratio_ci(bb[:, 0] - ba[:, 0], ba[:, 1], level=cfg.level, **kw)
            _, alo, ahi = cluster_ratio_ci(bb[:, 0] - ba[:, 0], ba[:, 1], level=adj, **kw)
            row[k] = {"diff": mean, "ci": [lo, hi], "ci_adjusted": [alo, ahi], "n": int(ba[:, 1].sum())}
        else:
            sa = {x["id"]: x for x in res[ref]["sanity"]}
            cm = [x for x in res[t]["sanity"] if x["id"] in sa]
            xa, xb, g = [sa[x["id"]][k] for x in cm], [x[k] for x in cm], [x["id"] for x in cm]
            mean, lo, hi, n = paired_record_diff(xa, xb, g, level=cfg.level, **kw)
            _, alo, ahi, _ = paired_record_diff(xa, xb, g, level=adj, **kw)
            row[k] = {"diff": mean, "ci": [lo, hi], "ci_adjusted": [alo, ahi], "n": n}
    return row


def summarise(cfg: Any, res: Mapping[str, dict]) -> dict[str, Any]:
    tags = [m.tag for m in cfg.models]
    base = cfg.baseline
    judged = cfg.judge.enabled
    metrics = DOMAIN_METRICS + (JUDGE_METRICS if judged else ())
    out: dict[str, Any] = {"domain": {}, "per_category": {}, "per_device": {}, "retention": {}, "paired": {},
                           "failures": {}}
    for t in tags:
        dom = res[t]["domain"]
        groups = [d["record_id"] for d in dom]
        out["domain"][t] = {k: _ci(cfg, [d.get(k, np.nan) for d in dom], groups) for k in metrics}
        for key, field in (("per_category", "category"), ("per_device", "device")):
            by: dict[str, list[dict]] = defaultdict(list)
            for d in dom:
                by[str(d[field])].append(d)
            out[key][t] = {g: {"items": len(v), "records": len({d["record_id"] for d in v}),
                               **{k: float(np.nanmean([d[k] for d in v])) for k in ("steps", "required", "language")},
                               **({"steps_ci": _ci(cfg, [d["steps"] for d in v], [d["record_id"] for d in v])["ci"]}
                                  if key == "per_category" else {})}
                           for g, v in sorted(by.items())}
        ret: dict[str, Any] = {}
        if "sanity" in res[t]:
            s = res[t]["sanity"]
            for k in ("sanity_pass", "sanity_rougeL", "sanity_language"):
                ret[k] = _ci(cfg, [x[k] for x in s], [x["id"] for x in s])
            ret["sanity_truncated"] = float(np.mean([x["finish_reason"] == "length" for x in s]))
        if res[t].get("ppl"):
            p = res[t]["ppl"]
            b = np.asarray(p["blocks"], float)
            mean, lo, hi = cluster_ratio_ci(b[:, 0], b[:, 1], n=cfg.bootstrap_resamples, seed=cfg.seed, level=cfg.level)
            ret["ppl_nll"] = {"mean": mean, "ci": [lo, hi], "n": p["n_tokens"]}
            ret["perplexity"] = {"value": p["perplexity"], "ci": [float(np.exp(lo)), float(np.exp(hi))],
                                 "tokens": p["n_tokens"]}
        out["retention"][t] = ret
        counts = Counter(f for d in dom for f, on in d["failures"].items() if on)
        out["failures"][t] = {f: counts.get(f, 0) for f in FAILURES} | {"answers": len(dom)}
    # paired differences: every model vs the baseline, then the configured contrasts
    paired_metrics = list(PAIRED_DOMAIN) + ([m for m in JUDGE_METRICS] if judged else [])
    ret_metrics = [k for k in PAIRED_RETENTION if all(k in out["retention"][t] for t in tags)]
    others = [t for t in tags if t != base]
    pairs = [(base, t) for t in others] + [(c.vs, c.model) for c in cfg.contrasts]
    m_total = len(pairs) * (len(paired_metrics) + len(ret_metrics))
    out["comparisons"] = m_total
    adj = bonferroni_level(cfg.level, m_total) if m_total else cfg.level
    out["bonferroni_level"] = adj
    rows = {pair: _paired_row(cfg, res, *pair, paired_metrics, ret_metrics, adj) for pair in pairs}
    out["paired"] = {t: rows[(base, t)] for t in others}
    out["contrasts"] = [{"model": c.model, "vs": c.vs, "diffs": rows[(c.vs, c.model)]} for c in cfg.contrasts]
    return out


def failure_examples(cfg: Any, res: Mapping[str, dict], items: Sequence[Mapping], chars: int = 320) -> dict[str, dict]:
    """One example per failure category: the first flagged answer, models in config order."""
    by_id = {it["id"]: it for it in items}
    out = {}
    for f in FAILURES:
        for m in cfg.models:
            hit = next((d for d in res[m.tag]["domain"] if d["failures"][f]), None)
            if hit is not None:
                ans = res[m.tag]["answers"][hit["id"]]
                out[f] = {"tag": m.tag, "item": hit["id"], "device": hit["device"],
                          "question": by_id[hit["id"]]["question"],
                          "answer": ans if len(ans) <= chars else ans[:chars] + " [...]",
                          "steps": hit["steps"], "words": hit["words"], "unsafe_sentences": hit["unsafe_sentences"]}
                if f == "wrong_step":
                    from jaxkd.rewards import contradictions

                    out[f]["contradicting"] = contradictions(ans, by_id[hit["id"]].get("reference_steps") or [])
                break
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _fmt(s: Mapping | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None or not np.isfinite(s["mean"]):
        return "-"
    return f"{s['mean']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"


def _fmt_diff(d: Mapping | None, digits: int = 3) -> str:
    if not d:
        return "-"
    if d.get("ci") is None:
        return f"{d['diff']:+.{digits}f} ({d.get('note', 'no CI')})"
    lo, hi = d["ci"]
    alo, ahi = d["ci_adjusted"]
    star = " *" if (alo > 0 or ahi < 0) else ""
    return (f"{d['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] "
            f"(adj. [{alo:+.{digits}f}, {ahi:+.{digits}f}]){star}")


def _machines(res: Mapping[str, dict]) -> list[dict]:
    seen, out = set(), []
    for r in res.values():
        mach = (r.get("efficiency") or {}).get("machine")
        if mach and json.dumps(mach, sort_keys=True) not in seen:
            seen.add(json.dumps(mach, sort_keys=True))
            out.append(mach)
    return out


def build_report(cfg: Any, items: Sequence[Mapping], *, config_path: str = "", command: str | None = None,
                 tags_arg: Sequence[str] | None = None) -> Path:
    """Write ``<results_dir>/<name>.{md,json}`` and the plots from the caches; returns the .md path."""
    from jaxkd.data.store import load_records

    res = load_results(cfg, items)
    summ = summarise(cfg, res)
    examples = failure_examples(cfg, res, items)
    tags = [m.tag for m in cfg.models]
    roles = {m.tag: m.role for m in cfg.models}
    out_dir = Path(cfg.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        all_items = load_records("heldout")
        n_all, n_all_rec = len(all_items), len({it["record_id"] for it in all_items})
    except Exception:  # noqa: BLE001 - tests run on synthetic items
        n_all = n_all_rec = None
    n_rec = len({it["record_id"] for it in items})
    cats = Counter(it["category"] for it in items)
    commands = sorted({r["entry"].get("command") for r in res.values() if r["entry"].get("command")})
    L = [f"# Evaluation report: {', '.join(tags)}", ""]
    sel = f" --tags {' '.join(tags_arg)}" if tags_arg else ""
    L += [f"Rebuild: `python -m evals.run --config {config_path}{sel} --report-only` (reads the caches in "
          f"`{cfg.cache_dir}`, loads no model). The caches were filled by: "
          + ("; ".join(f"`{c}`" for c in commands) or "(unknown)") + ".", ""]
    L += [f"Items: {len(items)} held-out questions of {n_rec} records (split `{cfg.items.split}`"
          + (f"; the held-out set has {n_all} questions of {n_all_rec} records" if n_all else "")
          + f"), the first {n_rec} records taken in turn from each category, every phrasing of each: "
          + ", ".join(f"{c} {n}" for c, n in sorted(cats.items())) + ". "
          f"Decoding: {json.dumps(to_plain(cfg.sampling))}, same for every model; each model is prompted with "
          f"the system prompt it is served with (a run: the one it was trained with).", ""]
    if cfg.notes:
        L += ["Notes:", ""] + [f"- {n}" for n in cfg.notes] + [""]
    L += ["Models:", ""]
    for m in cfg.models:
        e = res[m.tag]["entry"]
        w = e["weights"]
        L.append(f"- `{m.tag}` ({m.role or 'model'}): `{m.model}`" + (f", grounding {m.grounding}" if m.grounding !=
                                                                     "none" else "")
                 + (f", step {w['step']}" if w.get("kind") == "run" else "")
                 + f"; weights id `{w['id'][:12]}` ({w.get('kind')})" + (f"; loaded as {e['name']}" if e.get("name") else ""))
    # domain table
    L += ["", "## Domain (held-out troubleshooting questions)", "",
          f"Means with {cfg.level:.0%} record-level bootstrap intervals ({cfg.bootstrap_resamples} resamples of "
          f"the {n_rec} records; a record's phrasings stay together). Rule scores from `jaxkd.rewards` "
          "(word-boundary, stemmed, credited only inside well-formed sentences that are not copies of the "
          "question): steps = reference-step coverage, required = keyword-group coverage, actionable = "
          "distinct specific instructions / 3, numbered = numbered-list structure, language = offline "
          "language signal (well-formed share x spelling), repetition = repeated 3-gram share, unsafe = share "
          "with un-negated unsafe advice, words = answer length, truncated = share stopped by the token budget."
          + (" Judge columns (`jaxkd.judge`, judge "
             f"`{cfg.judge_model()}`" + (f" in {cfg.judge.dtype}" if cfg.judge.dtype else "")
             + "): technical accuracy (task success), completeness, utility on 0-10, "
             "language on 0-5, expectations over the judge's score-token distribution." if cfg.judge.enabled else
             " The LLM judge was not run (judge.enabled: false)."), ""]
    metrics = list(DOMAIN_METRICS) + (list(JUDGE_METRICS) if cfg.judge.enabled else [])
    L += ["| model | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for t in tags:
        cells = [_fmt(summ["domain"][t][k], 1 if k in ("words",) or k.startswith("judge") else 3) for k in metrics]
        L.append(f"| {t} | {summ['domain'][t]['steps']['n']} | " + " | ".join(cells) + " |")
    others = [t for t in tags if t != cfg.baseline]
    contrasts = summ.get("contrasts", [])
    n_pairs = len(others) + len(contrasts)
    pm = list(PAIRED_DOMAIN) + (list(JUDGE_METRICS) if cfg.judge.enabled else [])
    if others:
        L += ["", f"### Paired differences vs `{cfg.baseline}` (same items; record-level bootstrap)", "",
              f"{summ['comparisons']} comparisons in the paired tables (domain and retention): "
              + (f"{n_pairs} pairs of models ({len(others)} vs the baseline, {len(contrasts)} contrast(s) below)"
                 if contrasts else f"{len(others)} model(s)")
              + f" x {summ['comparisons'] // max(n_pairs, 1)} metrics. Each cell: difference [unadjusted "
              f"{cfg.level:.0%} CI] (adj. [Bonferroni {summ['bonferroni_level']:.4f} CI]); * = the adjusted "
              "interval excludes 0.", ""]
        L += ["| model | " + " | ".join(pm) + " |", "|---|" + "---|" * len(pm)]
        for t in others:
            L.append(f"| {t} | " + " | ".join(_fmt_diff(summ["paired"][t].get(k)) for k in pm) + " |")
    if contrasts:
        L += ["", "### Contrasts (ablations: the model minus the run it varies; same items, intervals as above)", "",
              "| model - vs | " + " | ".join(pm) + " |", "|---|" + "---|" * len(pm)]
        for c in contrasts:
            L.append(f"| `{c['model']}` - `{c['vs']}` | " + " | ".join(_fmt_diff(c["diffs"].get(k)) for k in pm)
                     + " |")
    # breakdowns
    cats_all = sorted({c for t in tags for c in summ["per_category"][t]})
    L += ["", "### Per category (step coverage mean [record-bootstrap CI]; items / records)", "",
          "| category | items / records | " + " | ".join(tags) + " |", "|---|---|" + "---|" * len(tags)]
    for c in cats_all:
        first = summ["per_category"][tags[0]].get(c, {})
        L.append(f"| {c} | {first.get('items', 0)} / {first.get('records', 0)} | " + " | ".join(
            (lambda s: "-" if not s else f"{s['steps']:.3f} (1 record)" if s["records"] < 2 else
             f"{s['steps']:.3f} [{s['steps_ci'][0]:.2f}, {s['steps_ci'][1]:.2f}]")(
                summ["per_category"][t].get(c)) for t in tags) + " |")
    devs = sorted({d for t in tags for d in summ["per_device"][t]})
    L += ["", "### Per device (step coverage / keyword coverage means; too few records for intervals)", "",
          "| device | items | " + " | ".join(tags) + " |", "|---|---|" + "---|" * len(tags)]
    for dv in devs:
        first = summ["per_device"][tags[0]].get(dv, {})
        L.append(f"| {dv} | {first.get('items', 0)} | " + " | ".join(
            (lambda s: f"{s['steps']:.2f} / {s['required']:.2f}" if s else "-")(summ["per_device"][t].get(dv))
            for t in tags) + " |")
    # retention
    L += ["", "## Retention (general language)", ""]
    if any(summ["retention"][t] for t in tags):
        L += ["Perplexity: the general English sample `jaxkd/data/general/text.txt` (not about electronics), "
              f"tokenised by each model's tokenizer, scored in non-overlapping windows of {cfg.retention.ppl_window} "
              f"tokens (each window's first token is context only); interval: bootstrap over "
              f"{cfg.retention.ppl_block}-token blocks. Sanity set: `jaxkd/data/general/sanity_qa.jsonl` "
              f"({len(next(iter(res.values())).get('sanity', []))} prompts, greedy, "
              f"{cfg.retention.sanity_max_new_tokens} new tokens, system prompt: "
              f"{cfg.retention.sanity_system_prompt}); pass = the answer contains an accepted string, rougeL = "
              "ROUGE-L F1 to the reference answer, language = offline language signal. Fluency on the domain "
              "answers is the language column above" + (" and judge_language" if cfg.judge.enabled else "") + ".", "",
              "| model | perplexity [CI] | tokens | sanity pass | sanity ROUGE-L | sanity language | sanity truncated |",
              "|---|---|---|---|---|---|---|"]
        for t in tags:
            r = summ["retention"][t]
            p = r.get("perplexity")
            L.append(f"| {t} | " + (f"{p['value']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] | {p['tokens']}" if p
                                    else "- | -") + " | " + " | ".join(_fmt(r.get(k)) for k in
                                                                      ("sanity_pass", "sanity_rougeL", "sanity_language"))
                     + f" | {r.get('sanity_truncated', float('nan')):.2f} |")
        rm = [k for k in PAIRED_RETENTION if any(k in summ["paired"].get(t, {}) for t in others)]
        if others and rm:
            L += ["", f"Deltas vs `{cfg.baseline}` (ppl_nll = mean token NLL in nats; its exp is the perplexity "
                      "ratio; intervals as above):", "",
                  "| model | " + " | ".join(rm) + " |", "|---|" + "---|" * len(rm)]
            for t in others:
                L.append(f"| {t} | " + " | ".join(_fmt_diff(summ["paired"][t].get(k)) for k in rm) + " |")
            for c in contrasts:
                L.append(f"| `{c['model']}` - `{c['vs']}` | " + " | ".join(_fmt_diff(c["diffs"].get(k)) for k in rm)
                         + " |")
    else:
        L.append("Not run (retention.perplexity and retention.sanity off).")
    # failures
    L += ["", "## Failure analysis (domain answers)", "",
          "Counts of answers per category (an answer can fall in several): "
          + "; ".join(f"**{f}** = {FAILURE_TEXT[f]}" for f in FAILURES)
          + f". Thresholds: {json.dumps(to_plain(cfg.failures))}. Rule-based and approximate, "
          "meant to point at answers to read.", "",
          "| model | answers | " + " | ".join(FAILURES) + " |", "|---|---|" + "---|" * len(FAILURES)]
    for t in tags:
        f = summ["failures"][t]
        L.append(f"| {t} | {f['answers']} | " + " | ".join(str(f[k]) for k in FAILURES) + " |")
    L += ["", "One example per category (the first flagged answer, models in config order):", ""]
    for f in FAILURES:
        ex = examples.get(f)
        if not ex:
            L.append(f"- **{f}**: none flagged")
            continue
        ans = ex["answer"].replace("\n", " / ")
        L.append(f"- **{f}** (`{ex['tag']}`, `{ex['item']}`, steps {ex['steps']:.2f}, {ex['words']} words): "
                 f"Q: \"{ex['question']}\" A: \"{ans}\""
                 + (f" Unsafe sentence: \"{ex['unsafe_sentences'][0]}\"" if f == "unsafe_advice" and
                    ex["unsafe_sentences"] else "")
                 + (f" Contradicts the reference: \"{ex['contradicting'][0]}\"" if ex.get("contradicting") else ""))
    L += ["", f"![step coverage vs language vs length]({cfg.name}_failures.png)", ""]
    # efficiency
    machines = _machines(res)
    L += ["## Efficiency", ""]
    if machines:
        L += ["Prefill tok/s = real prompt tokens / time to the first token; decode tok/s = batch x "
              f"(new tokens - 1) / time after the first token, {cfg.efficiency.new_tokens} new tokens per row with "
              f"end-of-turn ignored; one untimed warm-up, then min and median of {cfg.efficiency.reps} reps; "
              "prompts = the first held-out prompts (chat-formatted, the model's system prompt). Peak RSS = "
              "the process that loaded the model and ran answers, perplexity and these reps. Disk = weight "
              "bytes loading needs (a packaged preset: its GGUF file, dequantised at load; a run: its checkpoint "
              "items plus its base model's file). The machine is shared: "
              "the 1-minute load average during the reps is shown.", ""]
        for mach in machines:
            L.append(f"Machine: {mach['node']}, {mach['cpu']}, {mach['cores']} cores, {mach['mem_gib']} GiB, "
                     f"jax {mach['jax']} ({mach['backend']}), Python {mach['python']}.")
        bs = [str(b) for b in cfg.efficiency.batch_sizes]
        head = [f"{k} b{b} min / median" for k in ("prefill", "decode") for b in bs]
        L += ["", "| model | params | disk GB | peak RSS GiB | load s | " + " | ".join(head) + " | load avg |",
              "|---|---|---|---|---|" + "---|" * len(head) + "---|"]
        for t in tags:
            e = res[t].get("efficiency")
            if not e:
                L.append(f"| {t} | - |")
                continue
            tp = e["throughput"]
            cells = [f"{tp[b][k]['min']:.1f} / {tp[b][k]['median']:.1f}" if k == "prefill_tok_s" else
                     f"{tp[b][k]['min']:.2f} / {tp[b][k]['median']:.2f}"
                     for k in ("prefill_tok_s", "decode_tok_s") for b in bs]
            la = [tp[b]["loadavg_1m"] for b in bs]
            L.append(f"| {t} | {e['params'] / 1e6:.1f}M | {e['disk_bytes'] / 1e9:.2f} | {e['peak_rss_gib']:.2f} | "
                     + (f"{e['load_s']:.0f}" if e.get("load_s") is not None else "-") + " | " + " | ".join(cells)
                     + f" | {min(x['min'] for x in la):.1f}-{max(x['max'] for x in la):.1f} |")
    else:
        L.append("Not measured (efficiency.enabled: false).")
    L += ["", f"![domain scores]({cfg.name}_domain.png)", ""]
    md = out_dir / f"{cfg.name}.md"
    md.write_text("\n".join(L) + "\n")
    data = {"config": config_path, "command": command, "commands": commands, "items": {
                "split": cfg.items.split, "records": n_rec, "n": len(items), "ids": [it["id"] for it in items],
                "heldout_total": n_all, "heldout_records": n_all_rec},
            "sampling": to_plain(cfg.sampling), "baseline": cfg.baseline, "summary": summ,
            "failure_examples": examples, "machines": machines,
            "models": {t: {"role": roles[t], "model": res[t]["entry"]["model"], "grounding": res[t]["entry"]["grounding"],
                           "weights": res[t]["entry"]["weights"], "name": res[t]["entry"].get("name"),
                           "efficiency": res[t].get("efficiency"), "perplexity": res[t].get("ppl", {}) and
                           {k: v for k, v in res[t]["ppl"].items() if k != "blocks"},
                           "items": [{k: v for k, v in d.items() if k != "unsafe_sentences"} for d in res[t]["domain"]],
                           "sanity": res[t].get("sanity")} for t in tags}}
    (out_dir / f"{cfg.name}.json").write_text(json.dumps(data, indent=1, default=_json_default))
    _plot_domain(cfg, summ, out_dir / f"{cfg.name}_domain.png")
    _plot_failures(cfg, res, out_dir / f"{cfg.name}_failures.png")
    return md


def to_plain(obj: Any) -> Any:
    from jaxkd.config import to_dict

    return to_dict(obj)


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON: {type(x).__name__}")


def _plot_domain(cfg: Any, summ: Mapping, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["steps", "required", "actionable", "language"]
    tags = [m.tag for m in cfg.models]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(tags), 1)
    for j, t in enumerate(tags):
        s = [summ["domain"][t][m] for m in metrics]
        means = [x["mean"] for x in s]
        err = np.array([[x["mean"] - x["ci"][0], x["ci"][1] - x["mean"]] for x in s]).T
        ax.bar(np.arange(len(metrics)) + j * width, means, width, yerr=err, capsize=3, label=t)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(tags) - 1) / 2, metrics)
    ax.set_ylabel(f"mean ({cfg.level:.0%} record bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_failures(cfg: Any, res: Mapping[str, dict], path: Path) -> None:
    """Step coverage (y) vs answer length (x), colour = offline language score, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [m.tag for m in cfg.models]
    fig, axes = plt.subplots(1, len(tags), figsize=(3.6 * len(tags) + 0.8, 3.4), sharey=True, squeeze=False)
    sc = None
    for ax, t in zip(axes[0], tags):
        dom = res[t]["domain"]
        x = [d["words"] for d in dom]
        y = [d["steps"] for d in dom]
        c = [d["language"] for d in dom]
        trunc = np.asarray([d["finish_reason"] == "length" for d in dom])
        for mask, marker in ((~trunc, "o"), (trunc, "x")):
            if mask.any():
                sc = ax.scatter(np.asarray(x)[mask], np.asarray(y)[mask], c=np.asarray(c)[mask], cmap="viridis",
                                vmin=0, vmax=1, marker=marker, s=22)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("answer words (x = truncated)")
    axes[0][0].set_ylabel("step coverage")
    if sc is not None:
        fig.colorbar(sc, ax=axes[0].tolist(), label="language signal")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


__all__ = ["DEVICE_NOUNS", "FAILURES", "StaleCache", "build_report", "failure_flags", "load_results", "summarise"]
