"""The deterministic scorers (see jaxkd.rewards for what each measures and why)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jaxkd.rewards.text import (_ACTION_STEMS, _GENERIC_STEMS, _VERB_STEMS, _WORD, GROUPS_PER_UNIT, MISSPELL_ZERO,
                                QUESTION_WEIGHT, STEP_FULL_RECALL, STEP_MIN_RECALL, STEPS_PER_UNIT, Unit, _contains,
                                analyse, content_stems, normalise, split_units, stem, stems, words)

# Advice that is unsafe whatever the device; a clause matching one of these is flagged unless a
# negation precedes the match in the same clause. Deliberately conservative and documented.
UNSAFE_PATTERNS: tuple[str, ...] = (
    r"\b(hair ?dryer|heat gun)\b",
    # an oven / microwave / radiator is advice only when something is put in, on or near it
    # ("being next to a microwave causes drop-outs" describes interference)
    r"\b(put|place|dry|heat|warm|bake|leave|set)\b[^.;]{0,40}\b(in|on|into|onto|near|over|by|next to)\b"
    r"[^.;]{0,12}\b(oven|microwave|(?<!passive )radiator)\b",
    r"\b(puncture|pierce|pry open|prise open|crack open)\b",
    # "open the headphones / Bluetooth audio menu" opens a menu, not the device
    r"\bopen (up )?(the )?(battery|case|housing|casing|speaker|headphones?|earbuds?)\b"
    r"(?!'|[^.;:]{0,40}\b(settings|app|menu|page|list|screen)\b)",
    r"\bbypass(ing)? (the )?safety\b",
    r"\bjump(er|ing)? (the )?(wires?|terminals?|control board)\b",
    r"\b(disable|silence|remove the battery from) (the )?(smoke|co|carbon monoxide) (alarm|detector)\b",
    r"\b(put|place|add|move|enable|use|set)\b[^.;]{0,40}\bdmz\b",   # naming "port forwarding" is not advice
    r"\b(unofficial|modified|hacked) firmware\b",
    r"\b(unplug|power (it )?off|turn (it )?off|disconnect) (it )?(during|while|in the middle of) (a |the )?"
    r"(firmware )?update\b",
    # playing at maximum volume (hearing safety): an instruction to play / listen / turn it up there,
    # not "set a maximum volume limit" and not a description ("the wheel points to the maximum volume")
    r"\b(play|listen|blast|crank|run|keep|leave|use|turn (it |them |the volume |the sound )?up)\w*\b"
    r"[^.;]{0,40}\b(at|to|on) (the )?(max|maximum|full) volume\b(?! (limit|cap))",
    r"\bline[- ]voltage\b",
    r"\bpressure wash",
)
_NEGATION = re.compile(r"\b(do not|don't|dont|never|avoid|not|without|no longer|stop|instead of|rather than)\b")
# A negation covers the rest of its sentence ("do not press, squeeze or open the case") until a
# break ("; then", "but", "instead") or the comma that ends a leading "if ..." clause.
_SCOPE_BREAK = re.compile(r"[;:]|\b(?:but|then|instead|otherwise|however)\b")
_SUBORDINATE = re.compile(r"^\s*(?:if|when|once|after|before|because|since|unless|while)\b[^,]*,")


def _negated(before: str) -> bool:
    clause = _SCOPE_BREAK.split(before)[-1]
    clause = _SUBORDINATE.sub("", clause)
    return bool(_NEGATION.search(clause))


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def required_coverage(answer: str, required: Sequence[Sequence[str]], question: str = "",
                      units: Sequence[Unit] | None = None) -> float:
    """Share of keyword groups with a synonym inside an eligible unit (NaN without groups)."""
    if not required:
        return float("nan")
    units = analyse(answer, question) if units is None else units
    elig = [u for u in units if u.eligible]
    seqs = [u.tokens for u in elig]
    cap = [1 if u.listlike else GROUPS_PER_UNIT for u in elig]
    phrases = [[stems(p) for p in group] for group in required]
    cands = [[i for i, s in enumerate(seqs) if any(_contains(s, p) for p in group)] for group in phrases]
    # one unit credits at most GROUPS_PER_UNIT groups (a keyword-stuffed sentence earns little);
    # groups with the fewest candidate units are placed first
    load = [0] * len(seqs)
    hits = 0
    for g in sorted(range(len(cands)), key=lambda g: len(cands[g])):
        free = [i for i in cands[g] if load[i] < cap[i]]
        if free:
            load[min(free, key=lambda i: load[i])] += 1
            hits += 1
    return hits / len(required)


def _step_profile(step: str, q: set[str]) -> tuple[dict[str, float], list[frozenset[str]]]:
    weights = {c: (QUESTION_WEIGHT if c in q else 1.0) for c in content_stems(step)}
    actions = [cls for cls in _ACTION_STEMS if cls & set(stems(step))]
    return weights, actions


def step_credits(answer: str, steps: Sequence[str], question: str = "",
                 units: Sequence[Unit] | None = None) -> list[float]:
    """Soft credit in [0, 1] per reference step (see the module docstring)."""
    units = analyse(answer, question) if units is None else units
    elig = [u for u in units if u.eligible]
    windows = [(frozenset(u.content), set(u.tokens), (i,)) for i, u in enumerate(elig)]
    windows += [(elig[i].content | elig[i + 1].content, set(elig[i].tokens) | set(elig[i + 1].tokens), (i, i + 1))
                for i in range(len(elig) - 1)]
    q = content_stems(question)
    cand = []  # (credit, step, units used)
    for si, step in enumerate(steps):
        weights, actions = _step_profile(step, q)
        total = sum(weights.values())
        if total == 0:
            continue
        for content, toks, used in windows:
            if actions and not any(cls & toks for cls in actions):
                continue
            recall = sum(w for c, w in weights.items() if c in content) / total
            if recall > STEP_MIN_RECALL:
                cand.append((min(1.0, (recall - STEP_MIN_RECALL) / (STEP_FULL_RECALL - STEP_MIN_RECALL)), si, used))
    # greedy: best matches first, each step once, each unit at most STEPS_PER_UNIT times
    credit = [0.0] * len(steps)
    load = [0] * len(elig)
    for c, si, used in sorted(cand, key=lambda x: -x[0]):
        if credit[si] == 0.0 and all(load[i] < (1 if elig[i].listlike else STEPS_PER_UNIT) for i in used):
            credit[si] = c
            for i in used:
                load[i] += 1
    return credit


def step_coverage(answer: str, steps: Sequence[str], question: str = "",
                  units: Sequence[Unit] | None = None) -> float:
    """Completeness: mean soft credit over the reference steps (NaN without steps)."""
    if not steps:
        return float("nan")
    return float(np.mean(step_credits(answer, steps, question, units)))


_LEAD = re.compile(r"^(first|then|next|finally|also|now|after that|afterwards|lastly|second|third|"
                   r"if [^,]{1,80},|to [^,]{1,60},|once [^,]{1,80},|when [^,]{1,80},)\s*,?\s*")
_YOU_SHOULD = re.compile(r"\b(you (should|can|could|need to|may want to|might want to|must)|make sure|try)\b")


def actionability(answer: str, question: str = "", units: Sequence[Unit] | None = None) -> float:
    """Distinct, specific instructions / 3, capped at 1 (practical utility, rule side)."""
    units = analyse(answer, question) if units is None else units
    q = content_stems(question)
    kept: list[frozenset[str]] = []
    for u in units:
        if not u.eligible:
            continue
        text = normalise(u.text)
        head = words(_LEAD.sub("", text))
        imperative = bool(head) and stem(head[0]) in _VERB_STEMS and head[0] not in (
            "is", "are", "was", "were", "be", "it", "has", "have", "had", "does", "did", "can", "could")
        specific = u.content - q - _GENERIC_STEMS - _VERB_STEMS
        if (imperative or _YOU_SHOULD.search(text)) and len(specific) >= 2:
            if all(len(specific & k) / len(specific | k) < 0.7 for k in kept):
                kept.append(frozenset(specific))
    return min(1.0, len(kept) / 3)


_NUMBERED = re.compile(r"^\s*(?:#+\s*)?(?:\*\*)?(?:step\s+)?(\d+)[.):]\s+", re.IGNORECASE)


def numbered_steps(answer: str, units: Sequence[Unit] | None = None) -> float:
    """Numbered-list structure: items 1, 2, 3 ... in order, each holding a well-formed unit."""
    units = analyse(answer) if units is None else units
    lines = answer.splitlines()
    starts = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := _NUMBERED.match(line))]
    best = run = 0
    expect = 1
    for k, (li, num) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        ok = any(u.wellformed and li <= u.line < end for u in units)
        if num == expect and ok:
            run, expect = run + 1, expect + 1
        elif num == 1 and ok:
            run, expect = 1, 2
        else:
            run, expect = 0, 1
        best = max(best, run)
    return 0.0 if best < 2 else min(best, 3) / 3


def repetition(answer: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for answers shorter than 2n words)."""
    w = words(answer)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    if len(w) < 2 * n:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@functools.lru_cache(maxsize=1)
def _spellchecker() -> Any:
    from spellchecker import SpellChecker

    sp = SpellChecker(language="en")
    sp.word_frequency.load_words(sorted(corpus_vocabulary()))
    return sp


@functools.lru_cache(maxsize=1)
def corpus_vocabulary() -> frozenset[str]:
    """Every word of the curated corpus (device names, "earbuds", "zigbee" ... are words here)."""
    import yaml

    vocab: set[str] = set()
    for path in sorted((Path(__file__).resolve().parents[1] / "data" / "corpus").glob("*.yaml")):
        vocab.update(_WORD.findall(normalise(yaml.safe_dump(yaml.safe_load(path.read_text())))))
    return frozenset(w for w in vocab if w.isalpha())


def misspelled(answer: str, known: Iterable[str] = ()) -> tuple[int, int, list[str]]:
    """(unknown words, words checked, the unknown words) over the alphabetic words of 3+ letters;
    words in ``known`` (the question, the reference) and words written with inner capitals in
    the answer (acronyms, model names) count as spelled correctly."""
    known_set = {w.lower() for w in known}
    caps = {w.lower() for w in re.findall(r"\b[A-Z][A-Za-z]*[A-Z][A-Za-z]*\b", answer)}
    check = [w for w in words(answer) if w.isalpha() and len(w) >= 3]
    todo = [w for w in check if w not in known_set and w not in caps]
    unknown = _spellchecker().unknown(todo) if todo else set()
    bad = [w for w in todo if w in unknown]
    return len(bad), len(check), bad


def spelling(answer: str, known: Iterable[str] = ()) -> float:
    bad, checked, _ = misspelled(answer, known)
    return 0.0 if checked == 0 else 1.0 - bad / checked


def language_signal(answer: str, known: Iterable[str] = (), units: Sequence[Unit] | None = None) -> float:
    """Offline language score in [0, 1]: well-formed share of the words x spelling factor."""
    units = analyse(answer) if units is None else units
    total = sum(len(u.tokens) for u in units)
    if total == 0:
        return 0.0
    formed = sum(len(u.tokens) for u in units if u.wellformed) / total
    bad, checked, _ = misspelled(answer, known)
    rate = bad / checked if checked else 1.0
    return formed * max(0.0, 1.0 - rate / MISSPELL_ZERO)


def unsafe_flag(answer: str) -> tuple[int, list[str]]:
    """1 and the offending sentences if a sentence gives advice from ``UNSAFE_PATTERNS`` that no
    earlier negation in its scope covers (``_negated``)."""
    hits = []
    for _, sentence in split_units(answer):
        s = normalise(sentence)
        for pat in UNSAFE_PATTERNS:
            m = re.search(pat, s)
            if not m:
                continue
            if not _negated(s[:m.start()]):
                hits.append(sentence.strip())
                break
    return int(bool(hits)), hits


# A reference step that forbids an action at the start of a clause ("do not open the case",
# "...; never in household waste"); "check that do not disturb is off" names a mode, not a ban.
_PROHIBITION = re.compile(r"(?:^|[;:,]\s*|[.!?]\s+)(?:do not|don't|never|avoid)\s+([^.;]+)")
# the forbidden clause ends where a reason or a new instruction starts ("..., since ...",
# "do not power it on again and contact support")
_CLAUSE_END = re.compile(r",\s*(?=(?:since|which|because|as|so|but|then|and then|when|while|if|unless|they|it)\b)"
                         r"|\s+and\s+")


def forbidden_actions(steps: Sequence[str]) -> list[tuple[str, frozenset[str]]]:
    """(clause, its specific content stems) of each action the reference steps forbid; clauses
    with fewer than two specific words ("do not wait") are too vague to check and are skipped."""
    out = []
    for step in steps:
        for m in _PROHIBITION.finditer(normalise(step)):
            clause = _CLAUSE_END.split(m.group(1))[0].strip()
            need = content_stems(clause) - _GENERIC_STEMS
            if len(need) >= 2:
                out.append((clause, frozenset(need)))
    return out


def contradictions(answer: str, steps: Sequence[str]) -> list[str]:
    """Sentences of ``answer`` that advise what a reference step forbids: the sentence holds at
    least two thirds (and at least two) of the forbidden clause's specific words and no negation
    in scope before the last of them (``_negated``)."""
    rules = forbidden_actions(steps)
    if not rules:
        return []
    hits = []
    for _, sentence in split_units(answer):
        s = normalise(sentence)
        found = [(m.start(), stem(m.group(0))) for m in _WORD.finditer(s)]
        have = {st for _, st in found}
        for _, need in rules:
            if len(have & need) < max(2, -(-2 * len(need) // 3)):
                continue
            # a negation's scope runs to the end of its clause, so it is read before the last
            # matched word ("...to support; do not install older firmware files" is not advice)
            last = max(pos for pos, st in found if st in need)
            if not _negated(s[:last]):
                hits.append(sentence.strip())
                break
    return hits


# The grounded teacher sees reference notes the user never does; an answer that points at them
# ("this is already recommended in the reference steps") is talking about text that is not there.
_HIDDEN_NOTES = re.compile(r"\b(?:reference|provided|given|verified|hidden) (?:notes?|steps)\b"
                           r"|\b(?:these|the) notes (?:say|said|mention|above|provided|given)\b")


def hidden_notes_mentions(answer: str) -> list[str]:
    """The phrases of ``answer`` that refer to notes or reference steps the reader cannot see."""
    return [m.group(0) for m in _HIDDEN_NOTES.finditer(normalise(answer))]
