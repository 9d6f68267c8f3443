"""The slow judge tests' four answers (tests/test_judge.py) under the old and the new judge settings.

    flock /tmp/jaxkd-bigmem.lock python -m evals.judge_slow_items   # -> evals/results/judge_slow_items.json

One load of the 1.5B judge; the answers are complete, complete + injection, missing the
press-and-hold step, missing + injection. "before": no injection guard, no step probes (the
rubric expectation alone, as the judge was); "completeness probes": guard "zero", step probes on
completeness only; "defaults": ``JudgeConfig()``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_judge import INJECTION, REAL_COMPLETE, REAL_ITEM, REAL_MISSING  # noqa: E402

from jaxkd.config import JudgeConfig  # noqa: E402
from jaxkd.judge import Criterion, LLMJudge, load_judge  # noqa: E402

SETTINGS = {"before": dict(injection="off", step_weight=0.0),
            "completeness probes": dict(step_criteria=("completeness",)),
            "defaults": {}}


def main() -> int:
    t0 = time.time()
    base = load_judge("qwen2.5-coder-1.5b-instruct", config=JudgeConfig(batch_size=4), log=lambda s: None)
    print("load", round(time.time() - t0), "s", flush=True)
    answers = [REAL_COMPLETE, REAL_COMPLETE + INJECTION, REAL_MISSING, REAL_MISSING + INJECTION]
    crits = [Criterion.TECHNICAL, Criterion.COMPLETENESS]
    out = {"answers": ["complete", "complete + injection", "missing a step", "missing + injection"]}
    for name, kw in SETTINGS.items():
        judge = LLMJudge(base.model, base.tokenizer, fingerprint=base.fingerprint, config=JudgeConfig(batch_size=4, **kw))
        t0 = time.time()
        v = judge.score([REAL_ITEM] * 4, answers, crits)
        out[name] = {c.value: {"score": [round(float(x), 3) for x in v[c].score],
                               "mass": [round(float(x), 3) for x in v[c].mass],
                               "steps": None if v[c].steps is None else [round(float(x), 3) for x in v[c].steps],
                               "flagged": v[c].flagged.tolist()} for c in crits}
        out[name]["wall_s"] = round(time.time() - t0, 1)
        print(name, json.dumps(out[name]), flush=True)
    (ROOT / "evals" / "results" / "judge_slow_items.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
