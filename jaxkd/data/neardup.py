"""Near-duplicate search: MinHash LSH (datasketch) for candidates, exact shingle Jaccard to confirm.

LSH is probabilistic: with datasketch's default band layout, a pair right at the threshold is a
candidate only about half the time. The index therefore picks the band layout itself: the most
rows per band such that a pair at exactly ``threshold`` is missed with probability <= ``max_miss``
(1e-6), i.e. ``(1 - t**r)**b <= max_miss``, and then keeps only candidates whose *exact* Jaccard
reaches ``threshold``. Extra candidates cost a set intersection each; misses cannot happen above
the threshold except with that tiny probability.
"""

from __future__ import annotations

from datasketch import MinHashLSH

from jaxkd.data.textnorm import char_shingles, jaccard, minhash

MAX_MISS = 1e-6
PRESCREEN_SLACK = 0.3  # > 6 standard deviations of a 128-permutation MinHash estimate


def lsh_bands(threshold: float, num_perm: int, max_miss: float = MAX_MISS) -> tuple[int, int]:
    """(bands, rows): the most rows per band whose miss chance at ``threshold`` is <= max_miss."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1.0 - threshold ** rows) ** bands <= max_miss:
            return bands, rows
    raise ValueError(f"no LSH band layout reaches miss chance {max_miss} at threshold {threshold} "
                     f"with {num_perm} permutations; use more permutations")


class NearDupIndex:
    """Insert texts under unique keys; ``query`` returns ``[(key, jaccard)]`` at >= threshold."""

    def __init__(self, threshold: float, *, num_perm: int = 128, shingle_chars: int = 5):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.k = shingle_chars
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self._lsh = MinHashLSH(num_perm=num_perm, params=(self.bands, self.rows))
        self._shingles: dict[str, set[str]] = {}
        self._sketches: dict[str, object] = {}
        self._last: tuple[str, set[str], object] | None = None

    def __len__(self) -> int:
        return len(self._shingles)

    def _sketch(self, text: str) -> tuple[set[str], object]:
        if self._last is not None and self._last[0] == text:  # query() then add() of one text
            return self._last[1], self._last[2]
        sh = char_shingles(text, self.k)
        mh = minhash(sh, self.num_perm)
        self._last = (text, sh, mh)
        return sh, mh

    def _confirm(self, sh: set[str], mh, key: str) -> float | None:
        # The MinHash estimate (std <= 0.045 at 128 permutations) screens out clear non-matches
        # cheaply; anything within PRESCREEN_SLACK of the threshold gets the exact Jaccard.
        if mh.jaccard(self._sketches[key]) < self.threshold - PRESCREEN_SLACK:
            return None
        sim = jaccard(sh, self._shingles[key])
        return sim if sim >= self.threshold else None

    def query(self, text: str) -> list[tuple[str, float]]:
        sh, mh = self._sketch(text)
        if not sh:
            return []
        hits = []
        for key in self._lsh.query(mh):
            sim = self._confirm(sh, mh, key)
            if sim is not None:
                hits.append((key, sim))
        return sorted(hits, key=lambda kv: (-kv[1], kv[0]))

    def add(self, key: str, text: str) -> None:
        if key in self._shingles:
            raise KeyError(f"near-duplicate index already holds key {key!r}")
        sh, mh = self._sketch(text)
        self._shingles[key] = sh
        self._sketches[key] = mh
        if sh:
            self._lsh.insert(key, mh)

    def pairs(self) -> list[tuple[str, str, float]]:
        """All confirmed pairs ``(a, b, jaccard)`` with a < b among the inserted texts."""
        out = []
        for a, sh in self._shingles.items():
            if not sh:
                continue
            for b in self._lsh.query(self._sketches[a]):
                if a < b:
                    sim = self._confirm(sh, self._sketches[a], b)
                    if sim is not None:
                        out.append((a, b, sim))
        return sorted(out)
