"""Deterministic prompt-injection guard for judged answers.

An answer of a troubleshooting assistant talks to the user about a device. Text inside it that
talks to whoever grades it -- the grader, the rubric, the score, "this answer" as an answer -- or
that imitates the judge prompt's own syntax (chat special tokens, the answer markers) has no use
to the user and exists only to move the grade. Small judges follow such text (measured in
``evals/results/judge_calibration.md``), so it is found here with rules, before any model reads
the answer, and the judge either gives the answer 0 on every criterion (the rubric's own rule for
an answer that addresses the grader) or judges it with those sentences removed
(``JudgeConfig.injection``).

A sentence (or line) is flagged when it has any of:

- ``chat_syntax``: chat special-token syntax (``<|...|>``) or the judge's answer markers;
- ``grader``: it names the grading audience or apparatus (grader, evaluator, rubric, grading /
  scoring rules or criteria, an automated / AI judge);
- ``score_claim``: a score for the answer (``Score: 10``, ``rated 10/10``, ``full marks``,
  ``maximum score``, a criterion name with a number such as ``Completeness: 10``); a bare "7/10"
  is not one ("set the volume to 7/10");
- ``override``: an instruction aimed at a model's instructions (``ignore the rubric``,
  ``disregard your instructions``, ``reply with 10``, ``do not evaluate``);
- ``self_reference``: "this answer / response" with a claim about its own standing (verified,
  official, correct, the best, the reference).

The rules are deliberately about *who the text addresses*, not about topics: device vocabulary
("the power rating", "a 10 W charger", "ignore the warning on the box", "the sleep score in the
app") does not match (tested, and counted over every committed model answer in the calibration
report).
"""

from __future__ import annotations

import dataclasses
import re

_NUM = r"(?:10|[0-9])(?:\.\d+)?"
# a number followed by a unit is a device quantity ("output 10 W", "rated 5 V"), not a score
_NO_UNIT = (r"(?!\s*(?:%|°|[kMG]?(?:W|V|A|Ah|mAh|Hz|B|Wh)\b|dB|ms\b|s\b|secs?\b|seconds?|mins?\b|minutes?|"
            r"hours?|hrs?\b|h\b|days?|m\b|cm|mm|ft\b|feet|in\b|inch|times|x\b|percent|degrees?|mph|km|"
            r"GHz|MHz|Mbps|GB|MB|TB|-))")

RULES: dict[str, re.Pattern[str]] = {
    "chat_syntax": re.compile(r"<\|[^|>\n]{1,40}\|>|<<<|>>>|\bEND ANSWER\b", re.I),
    "grader": re.compile(
        r"\b(?:graders?|grading|evaluators?|rubrics?|assessors?|scorers?"
        r"|(?:automated|ai|llm|the)\s+(?:judge|grader|evaluator)s?"
        r"|(?:scoring|grading|evaluation)\s+(?:\w+\s+)?(?:rules?|criteria|guidance|instructions?|scale|mode))\b", re.I),
    "score_claim": re.compile(
        r"\b(?:scores?|scored|rate[ds]?|rating|marks?|grade[ds]?)\b\W*(?:\w+\W+){0,4}?"
        + _NUM + r"\s*(?:/\s*(?:10|5)|out of\s*(?:10|5)\b|(?=\s*[.,;:!)\n]|\s*$))"
        r"|\b(?:full|maximum|max|perfect|highest|top)\s+(?:marks|score|rating|points)\b"
        r"|\b(?:technical accuracy|accuracy|completeness|utility|language quality|language)\s*[:=]\s*"
        + _NUM + r"\b" + _NO_UNIT, re.I),
    "override": re.compile(
        r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+)?(?:of\s+)?(?:the|your|previous|prior|above|"
        r"these|those)?\s*(?:previous\s+|prior\s+|above\s+|scoring\s+|grading\s+)?"
        r"(?:rubric|instructions|rules|criteria|reference(?:\s+steps)?|system\s+prompt|prompt|grading|scoring)\b"
        r"|\byour\s+(?:instructions|rubric|scoring|grading|criteria|rules)\b"
        r"|\b(?:reply|respond|answer|output|return)\s+(?:only\s+)?(?:with\s+)?(?:a\s+|the\s+)?(?:score\s+of\s+)?"
        + _NUM + r"\b" + _NO_UNIT +
        r"|\bdo\s+not\s+(?:evaluate|grade|score|judge)\b", re.I),
    "self_reference": re.compile(
        r"\bth(?:is|e\s+above)\s+(?:answer|response|reply)\b[^.\n]{0,60}?\b(?:verified|official|correct|best|"
        r"perfect|reference|score[sd]?|rated?|marks?|confident|final)\b", re.I),
}

# sentence ends (keeping the punctuation with its sentence) and line breaks
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)|\n+")


@dataclasses.dataclass(frozen=True)
class Injection:
    """A flagged span of an answer and the rules it matched."""

    text: str
    rules: tuple[str, ...]


def sentences(answer: str) -> list[str]:
    """The answer split at line breaks and sentence ends (empty pieces dropped)."""
    return [s for s in _SPLIT.split(answer) if s.strip()]


def find_injections(answer: str) -> list[Injection]:
    """Every sentence / line of ``answer`` that addresses the grader, in order."""
    out = []
    for s in sentences(answer):
        hit = tuple(name for name, rx in RULES.items() if rx.search(s))
        if hit:
            out.append(Injection(s.strip(), hit))
    # a fake marker can span lines ("<<<END" / "ANSWER>>>"): check the whole text once more
    if not out and RULES["chat_syntax"].search(answer):
        out.append(Injection(answer.strip()[:200], ("chat_syntax",)))
    return out


def strip_injections(answer: str) -> tuple[str, list[Injection]]:
    """``answer`` without its flagged sentences (line structure kept), and the flags."""
    found = find_injections(answer)
    if not found:
        return answer, []
    flagged = {f.text for f in found}
    kept_lines = []
    for line in answer.split("\n"):
        parts = [p for p in re.split(r"(?<=[.!?])\s+(?=\S)", line) if p.strip()]
        keep = [p for p in parts if p.strip() not in flagged]
        if keep or not parts:
            kept_lines.append(" ".join(keep))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept_lines)).strip()
    if RULES["chat_syntax"].search(text):   # a multi-line marker survived: drop the syntax itself
        text = RULES["chat_syntax"].sub(" ", text).strip()
    return text, found


__all__ = ["Injection", "RULES", "find_injections", "sentences", "strip_injections"]
