"""Text units for the rule scorers: normalisation, Snowball stems, sentences / list items and
whether each is a well-formed sentence or an echo of the question (see jaxkd.rewards)."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

MIN_UNIT_WORDS = 4
MAX_UNIT_WORDS = 60
FUNCTION_RATIO = (0.05, 0.75)
ECHO_SHARE = 0.6
QUESTION_WEIGHT = 0.25
STEP_FULL_RECALL = 0.5
STEP_MIN_RECALL = 0.2
STEPS_PER_UNIT = 2
GROUPS_PER_UNIT = 2
MISSPELL_ZERO = 0.2

FUNCTION_WORDS = frozenset("""a an the and or but if then than that this these those to of in on at for from with by
as into onto over under about after before between through during without within until while when where which who
whom whose why how what whether is are was were be been being am it its it's itself you your yours you're you'll
i me my we our us they them their he she his her him can could will would should shall may might must do does did
done doing have has had having not no nor don't doesn't didn't can't won't isn't aren't so too very just also
only once again both each either any all some such other another same few more most own there here out up down off
per via one ones else even still yet though although because since let's""".split())
DETERMINERS = frozenset("a an the your my its their our his her".split())
_BAD_AFTER_DET = frozenset("""a an the and or but of to at for with by from is are was were be it you i we they
he she not nor than""".split())

# Verbs a troubleshooting sentence is built from (base forms; matched after stemming), plus
# auxiliaries. A unit without any of them is not a sentence for scoring purposes.
VERBS = frozenset("""be is are was were am been being do does did have has had can could will would should may
might must need want try make take give get go keep let put set use turn switch press hold push tap click select
choose open close enter exit leave check verify confirm ensure look see find inspect test note know read listen
watch wait restart reboot reset restore update upgrade install uninstall reinstall download remove delete forget
unpair pair repair connect reconnect disconnect plug unplug replug charge recharge power clean wipe dry move place
position mount hang raise lower lift adjust change disable enable toggle allow block add rename log sign assign
start stop run scan search tighten loosen insert eject seat reseat swap replace return contact call ask call
follow fix solve resolve help cause happen stay drop fail work appear show blink flash light glow beep sound play
pause mute unmute hear drain last fit wear rotate slide flip release shake tilt point face aim reduce increase
raise boost cut trim calibrate sync pick avoid prevent skip shut cool warm dock undock attach detach fasten align
hook configure save apply rejoin join share link unlink register mean indicate refer tell say explain describe
learn understand remember consider recommend suggest require include contain support come go bring keep turn
live sit control speak train retrain create cancel transfer expect group grant rely wake notice clear cache draw
schedule delete exclude cover store export back limit lock unlock accept deny open route send receive stream
record cast mirror measure track detect sense trigger wear replace refuse stretch press matter differ""".split())

# Action-verb classes: a step's action is matched by any verb of the same class.
ACTION_CLASSES: tuple[frozenset[str], ...] = tuple(frozenset(c.split()) for c in (
    "check verify confirm ensure inspect look see test make sure",
    "press push tap click hold select choose",
    "turn switch toggle power enable disable shut",
    "restart reboot power cycle",
    "reset restore factory",
    "update upgrade install reinstall download firmware",
    "remove delete forget unpair disconnect unplug take eject detach",
    "pair connect reconnect rejoin join plug link add",
    "charge recharge plug",
    "clean wipe dry rinse",
    "move place position mount hang raise lower lift relocate",
    "adjust change set lower raise reduce increase calibrate configure",
    "open go launch navigate enter",
    "wait leave let allow",
    "replace swap reseat insert",
    "contact call ask return",
    "close exit quit",
))

# Filler of answer openings ("to fix this issue, follow these steps") that says nothing.
GENERIC = frozenset("""follow step steps troubleshoot troubleshooting issue issues problem problems help resolve
fix try following sure way ways here some can may might need device experiencing""".split())


# --------------------------------------------------------------------------------------------
# Text processing
# --------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, typographic dashes/quotes unified, "wi-fi" -> "wifi", spaces collapsed."""
    text = text.lower().replace("\u2011", "-").replace("\u2013", "-").replace("\u2014", "-")
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"\bwi[- ]?fi\b", "wifi", text)
    return " ".join(text.split())


_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Word tokens of normalised text (hyphens and slashes split words; "don't" stays one)."""
    return _WORD.findall(normalise(text))


@functools.lru_cache(maxsize=None)
def _stemmer() -> Any:
    import snowballstemmer

    return snowballstemmer.stemmer("english")


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """Snowball English stem of one lower-case word."""
    return _stemmer().stemWord(word)


def stems(text: str) -> list[str]:
    return [stem(w) for w in words(text)]


def content_stems(text: str) -> set[str]:
    """Stems of the non-function words (numbers kept: "15 seconds" is a specific)."""
    return {stem(w) for w in words(text) if w not in FUNCTION_WORDS and (len(w) >= 2 or w.isdigit())}


_VERB_STEMS = frozenset(stem(v) for v in VERBS)
_ACTION_STEMS = tuple(frozenset(stem(v) for v in c) for c in ACTION_CLASSES)
_GENERIC_STEMS = frozenset(stem(w) for w in GENERIC)
_MARKUP = re.compile(r"^\s*(#+|[-*\u2022>]|\(?\d+[.)]|[a-z][.)](?=\s))\s*")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One sentence or list item of an answer, with what the scorers need to know about it."""

    text: str
    line: int                 # index of the source line (numbered-item blocks are lines)
    tokens: tuple[str, ...]   # stemmed word tokens, in order
    content: frozenset[str]   # content stems
    wellformed: bool
    echo: bool                # mostly a copy of the question
    listlike: bool = False    # 4+ comma-separated pieces: credits one keyword group / step only

    @property
    def eligible(self) -> bool:
        return self.wellformed and not self.echo


def is_wellformed(tokens_raw: Sequence[str], text: str = "") -> bool:
    """A sentence-like word sequence: length, function-word share, a verb, a capital first letter,
    no obvious garble (a doubled content word, a determiner before a function word), and not a
    comma-separated list of fragments (4+ pieces of under 3 words on average)."""
    n = len(tokens_raw)
    if not MIN_UNIT_WORDS <= n <= MAX_UNIT_WORDS:
        return False
    fw = sum(w in FUNCTION_WORDS for w in tokens_raw) / n
    if not FUNCTION_RATIO[0] <= fw <= FUNCTION_RATIO[1]:
        return False
    if not any(stem(w) in _VERB_STEMS for w in tokens_raw):
        return False
    for a, b in zip(tokens_raw, tokens_raw[1:]):
        if a == b and a not in FUNCTION_WORDS and not a.isdigit():   # "on on" is English
            return False
        if a in DETERMINERS and b in _BAD_AFTER_DET:
            return False
    first = re.search(r"[A-Za-z][A-Za-z]?", text)
    if first and first.group(0)[0].islower() and first.group(0)[-1].islower():
        return False   # sentences start with a capital ("eARC", "iPhone" pass)
    if _pieces(text) >= 4 and n / _pieces(text) < 3:
        return False
    return True


def _pieces(text: str) -> int:
    return sum(1 for p in re.split(r"[,;]", text) if p.strip())


def split_units(answer: str) -> list[tuple[int, str]]:
    """(line index, text) of each sentence / list item, markdown markers and emphasis removed."""
    out = []
    for li, line in enumerate(answer.splitlines()):
        line = _MARKUP.sub("", line.replace("**", "").replace("__", "").replace("`", ""))
        for sent in re.split(r"(?<=[.!?])\s+", line.strip()):
            if sent.strip():
                out.append((li, sent.strip()))
    return out


def analyse(answer: str, question: str = "") -> list[Unit]:
    """The answer's units with their well-formedness and echo flags."""
    q = content_stems(question) - _GENERIC_STEMS
    units = []
    for li, text in split_units(answer):
        raw = words(text)
        content = frozenset(stem(w) for w in raw if w not in FUNCTION_WORDS and (len(w) >= 2 or w.isdigit()))
        specific = content - _GENERIC_STEMS
        echo = bool(q) and bool(specific) and len(specific & q) / len(specific) >= ECHO_SHARE
        units.append(Unit(text=text, line=li, tokens=tuple(stem(w) for w in raw), content=content,
                          wellformed=is_wellformed(raw, text), echo=echo,
                          listlike=_pieces(text) >= 4))
    return units


def _contains(seq: Sequence[str], sub: Sequence[str]) -> bool:
    n = len(sub)
    return n > 0 and any(tuple(seq[i:i + n]) == tuple(sub) for i in range(len(seq) - n + 1))
