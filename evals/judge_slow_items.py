"""The slow judge tests' four answers (tests/test_judge.py) before and after the guard and probes.

    PYTHONPATH=. flock /tmp/jaxkd-bigmem.lock python evals/judge_slow_items.py > evals/results/judge_slow_items.log

Answers: complete, complete + injection, missing the press-and-hold step, missing + injection.
"before": no injection guard, no step probes; "after (defaults)": ``JudgeConfig`` defaults of the
commit that ran it (injection "zero", step probes on completeness only; technical joined the step
criteria in the next commit, and its scores under that setting are in the slow test's output,
copied at the end of the log).
"""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
from test_judge import REAL_ITEM, REAL_COMPLETE, REAL_MISSING, INJECTION
from jaxkd.config import JudgeConfig
from jaxkd.judge import Criterion, LLMJudge, load_judge

t0 = time.time()
j = load_judge("qwen2.5-coder-1.5b-instruct", config=JudgeConfig(batch_size=4), log=lambda s: None)
print("load", round(time.time() - t0), "s", flush=True)
answers = [REAL_COMPLETE, REAL_COMPLETE + INJECTION, REAL_MISSING, REAL_MISSING + INJECTION]
crits = [Criterion.TECHNICAL, Criterion.COMPLETENESS]
out = {}
for name, cfg in {"before (injection off, no step probes)": JudgeConfig(batch_size=4, injection="off", step_weight=0.0),
                  "after (defaults)": JudgeConfig(batch_size=4)}.items():
    judge = LLMJudge(j.model, j.tokenizer, fingerprint=j.fingerprint, config=cfg)
    t0 = time.time()
    v = judge.score([REAL_ITEM] * 4, answers, crits)
    out[name] = {c.value: {"score": [round(float(x), 3) for x in v[c].score],
                           "mass": [round(float(x), 3) for x in v[c].mass],
                           "steps": None if v[c].steps is None else [round(float(x), 3) for x in v[c].steps],
                           "flagged": v[c].flagged.tolist()} for c in crits}
    out[name]["wall_s"] = round(time.time() - t0, 1)
    print(name, json.dumps(out[name]), flush=True)
