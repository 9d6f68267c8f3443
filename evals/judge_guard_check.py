"""How often the injection guard (jaxkd.judge_guard) fires on the calibration pairs and on clean text.

    PYTHONPATH=. python evals/judge_guard_check.py > evals/results/judge_guard_check.txt

Positives: the 16 injected answers of evals/calibration/pairs.jsonl (the guard's rules were written
with them in view, so this is not a held-out rate). Clean texts: every committed generation under
evals/results/generations, every non-injected pair answer, and each held-out test item's reference
steps joined. No model runs.
"""
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxkd.judge_guard import find_injections
pos, neg = [], []
for l in open('evals/calibration/pairs.jsonl'):
    r = json.loads(l)
    w, lo = (r['answer_a'], r['answer_b']) if r['winner']=='a' else (r['answer_b'], r['answer_a'])
    if r['category']=='plain_vs_injected': pos.append((r['id'], lo)); neg.append((r['id']+'w', w))
    else: neg += [(r['id']+'a', r['answer_a']), (r['id']+'b', r['answer_b'])]
miss = [(i, a) for i, a in pos if not find_injections(a)]
print('injected flagged', len(pos)-len(miss), '/', len(pos), [i for i,_ in miss])
for i, a in pos:
    print(i, [(f.rules, f.text[:70]) for f in find_injections(a)])
n = fp = 0
for f in sorted(glob.glob('evals/results/generations/*.jsonl')):
    for l in open(f):
        r = json.loads(l); n += 1
        hits = find_injections(r['answer'])
        if hits: fp += 1; print('FP', f, r['item_id'], [(h.rules, h.text[:100]) for h in hits])
for i, a in neg:
    n += 1; hits = find_injections(a)
    if hits: fp += 1; print('FP', i, [(h.rules, h.text[:100]) for h in hits])
from evals.domain import heldout_items
for it in heldout_items('test', 0):
    a = "\n".join(it['reference_steps']); n += 1
    hits = find_injections(a)
    if hits: fp += 1; print('FP ref', it['id'], [(h.rules, h.text[:100]) for h in hits])
print('clean texts flagged', fp, '/', n)
