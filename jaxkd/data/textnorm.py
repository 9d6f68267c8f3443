"""Text normalisation, shingling, MinHash and a light English check shared by cleaning and splits."""

from __future__ import annotations

import functools
import re
import unicodedata
import zlib
from typing import Iterable

import numpy as np
from datasketch import MinHash

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2032": "'",
                         "\u2013": "-", "\u2014": " - ", "\u2212": "-", "\u2026": "..."})
_INVISIBLE = re.compile(r"[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalise(text: str) -> str:
    """NFKC, straight quotes and dashes, no invisible/control characters, single spaces, stripped."""
    text = unicodedata.normalize("NFKC", text).translate(_QUOTES)
    text = _INVISIBLE.sub("", text)
    text = _CONTROL.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def match_key(text: str) -> str:
    """Lower case, only letters and digits separated by single spaces: the key for matching."""
    return _NON_WORD.sub(" ", normalise(text).lower()).strip()


def char_shingles(text: str, k: int = 5) -> set[str]:
    """Character k-grams of ``match_key(text)`` (robust to typos and small rewordings)."""
    key = match_key(text)
    if len(key) <= k:
        return {key} if key else set()
    return {key[i:i + k] for i in range(len(key) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


@functools.lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple:
    return MinHash(num_perm=num_perm, seed=seed).permutations


def _crc32(data: bytes) -> int:
    return zlib.crc32(data)


def minhash(shingles: Iterable[str], num_perm: int, seed: int = 1) -> MinHash:
    """MinHash of a shingle set (CRC32 base hash: deterministic across runs, fast in C)."""
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_crc32,
                permutations=_permutations(num_perm, seed), scheme="affine32")
    m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
    return m


# The 120 most frequent English function words; an English sentence of 8+ words almost always
# contains several of them, while other languages written in Latin script contain almost none.
_STOPWORDS = frozenset("""
a about after again all also am an and any are as at be because been before being between both
but by can could did do does doing don down during each even few for from further get got had
has have having he her here him his how i if in into is it its just like me more most my no nor
not now of off on once only or other our out over own same she should so some such than that the
their them then there these they this those through to too under until up very was we were what
when where which while who why will with would you your yours im ive dont doesnt cant wont its
""".split())


# Frequent function words of other languages written in Latin script (none is an English word).
_FOREIGN = frozenset("""
le la les des du une est et pas ne je mon ma mes qui pour avec sur dans ce cette il elle nous vous
sont au aux der das und ist nicht ein eine mein meine ich mit dem sich auf für es wird zu von el
los las del y mi mis que se por para está muy il lo gli della di che non è mio mia sono o os da
do das dos não meu minha com em é het een en niet ik mijn op voor si al cosa
""".split()) - _STOPWORDS


def english_score(text: str) -> tuple[float, float, float]:
    """(share of letters in ASCII, share of words that are English / other-language function words)."""
    letters = [c for c in text if c.isalpha()]
    ascii_share = (sum(c.isascii() for c in letters) / len(letters)) if letters else 0.0
    words = re.findall(r"[^\W\d_]+", normalise(text).lower().replace("'", ""))
    n = max(len(words), 1)
    return (ascii_share, sum(w in _STOPWORDS for w in words) / n,
            sum(w in _FOREIGN for w in words) / n)


def looks_english(text: str, *, min_ascii: float = 0.9, min_foreign_words: int = 2) -> bool:
    """Heuristic: Latin ASCII script, and other languages' function words do not outnumber
    English ones. Terse English (search queries, forum shorthand) has few function words of
    either kind and passes; French, German, Spanish, Italian, Portuguese and Dutch do not."""
    ascii_share, english, foreign = english_score(text)
    if ascii_share < min_ascii:
        return False
    words = len(re.findall(r"[^\W\d_]+", text))
    return not (foreign * words >= min_foreign_words and foreign > english)


def pairwise_jaccard(sets: list[set[str]]) -> np.ndarray:
    """Exact Jaccard for all pairs, [n, n] float32 (dense; fine for a few thousand texts)."""
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, s in enumerate(sets):
        for sh in s:
            rows.append(i)
            cols.append(vocab.setdefault(sh, len(vocab)))
    from scipy.sparse import csr_matrix

    x = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(sets), len(vocab)))
    inter = (x @ x.T).toarray()
    sizes = np.asarray([len(s) for s in sets], np.float32)
    union = sizes[:, None] + sizes[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float32)
