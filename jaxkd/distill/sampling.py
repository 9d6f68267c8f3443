"""Domain-aware sampling: draw more training examples from the subdomains where the student lags.

Every N steps the trainer measures, on the validation split, the student-vs-teacher gap of each
subdomain (device type or issue type), e.g. the mean KL(teacher || student) on the teacher's
answers. ``gaps_to_weights`` turns gaps into sampling weights:

    w_d  proportional to  prior_d * exp((gap_d - mean_gap) / (tau * std_gap))

then bounds them: no subdomain drops below ``floor`` times its prior share (every subdomain keeps
being seen) nor rises above ``cap`` times it (one hard subdomain cannot take over), renormalised
so the weights sum to one. ``DomainSampler`` draws example indices by those weights; its draws
depend only on (seed, draw count, weights), so its state is two numbers and a dict and a resumed
run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np


def per_domain_mean(values: Sequence[float], domains: Sequence[str]) -> dict[str, float]:
    """Mean of per-example ``values`` grouped by each example's domain label."""
    if len(values) != len(domains):
        raise ValueError(f"{len(values)} values for {len(domains)} domain labels")
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for v, d in zip(values, domains):
        if not np.isfinite(v):
            raise ValueError(f"non-finite gap {v} for domain {d!r}")
        sums[d] += float(v)
        counts[d] += 1
    return {d: sums[d] / counts[d] for d in sorted(sums)}


def _bounded_normalise(raw: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``clip(c * raw, lo, hi)`` with the scale c chosen so the result sums to one.

    The sum is monotone in c, so c is found by bisection in log space.
    """
    if lo.sum() > 1 + 1e-9 or hi.sum() < 1 - 1e-9:
        raise ValueError("bounds admit no distribution: sum(floor) > 1 or sum(cap) < 1")

    def total(log_c: float) -> float:
        return float(np.clip(np.exp(log_c) * raw, lo, hi).sum())

    a, b = -80.0, 80.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if total(mid) < 1.0 else (a, mid)
    w = np.clip(np.exp(0.5 * (a + b)) * raw, lo, hi)
    return w / w.sum()


def gaps_to_weights(gaps: Mapping[str, float], prior: Mapping[str, float], *, tau: float = 1.0,
                    floor: float = 0.25, cap: float = 4.0) -> dict[str, float]:
    """Sampling weights over the domains of ``prior`` (any positive sizes, normalised here).

    Domains missing from ``gaps`` (not measured yet) keep their prior share's exponent of zero.
    """
    if tau <= 0:
        raise ValueError(f"domain_sampling.tau must be > 0, got {tau}")
    if not 0 <= floor <= 1 <= cap:
        raise ValueError(f"need 0 <= floor <= 1 <= cap, got floor={floor}, cap={cap}")
    names = sorted(prior)
    p = np.array([float(prior[d]) for d in names])
    if (p <= 0).any():
        raise ValueError("every domain needs a positive prior (example count)")
    p = p / p.sum()
    g = np.array([float(gaps.get(d, np.nan)) for d in names])
    measured = np.isfinite(g)
    z = np.zeros_like(g)
    if measured.sum() >= 2:
        mu, sd = g[measured].mean(), g[measured].std()
        z[measured] = (g[measured] - mu) / (sd + 1e-8) if sd > 1e-12 else 0.0
    raw = p * np.exp(np.clip(z / tau, -30, 30))
    w = _bounded_normalise(raw, floor * p, np.minimum(cap * p, 1.0))
    return dict(zip(names, w.tolist()))


class DomainSampler:
    """Draws example indices: a domain by weight, then an example of it uniformly.

    Deterministic in (seed, number of draws so far, current weights): draw i uses its own
    generator seeded with (seed, i), so ``get_state``/``set_state`` resume exactly.

    ``fixed``: domains drawn with a set share whatever the weights say (general replay rows):
    ``set_weights`` spreads the rest, ``1 - sum(fixed)``, over the other domains by their weights.
    """

    def __init__(self, domains: Sequence[str], *, seed: int,
                 weights: Mapping[str, float] | None = None, fixed: Mapping[str, float] | None = None):
        if not domains:
            raise ValueError("DomainSampler needs at least one example")
        self._seed = int(seed)
        by_domain: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(domains):
            by_domain[d].append(i)
        self.names = sorted(by_domain)
        self._members = [np.asarray(by_domain[d], np.int64) for d in self.names]
        self.counts = {d: len(m) for d, m in zip(self.names, self._members)}
        self.fixed = dict(fixed or {})
        missing = set(self.fixed) - set(self.names)
        if missing or any(not 0 < v < 1 for v in self.fixed.values()) or sum(self.fixed.values()) >= 1 \
                or len(self.fixed) >= len(self.names):
            raise ValueError(f"fixed shares {self.fixed} need domains with examples (known: {self.names}), "
                             "each in (0, 1), summing below 1, and at least one other domain")
        self._draws = 0
        self.set_weights(weights or self.prior())

    def prior(self) -> dict[str, float]:
        """Shares by example count, over the domains whose share is not fixed."""
        free = {d: c for d, c in self.counts.items() if d not in self.fixed}
        total = sum(free.values())
        return {d: c / total for d, c in free.items()}

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self._w.tolist()))

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Weights of the free domains (any scale; fixed domains' entries are ignored)."""
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ValueError(f"weights for unknown domains {sorted(unknown)}; known: {self.names}")
        free = [d not in self.fixed for d in self.names]
        w = np.array([float(weights.get(d, 0.0)) if f else 0.0 for d, f in zip(self.names, free)])
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"domain weights must be finite, >= 0 and not all 0: {dict(weights)}")
        w = w / w.sum() * (1.0 - sum(self.fixed.values()))
        self._w = w + np.array([self.fixed.get(d, 0.0) for d in self.names])

    def next_indices(self, n: int) -> np.ndarray:
        out = np.empty(n, np.int64)
        for j in range(n):
            rng = np.random.default_rng((self._seed, self._draws))
            d = rng.choice(len(self.names), p=self._w)
            members = self._members[d]
            out[j] = members[rng.integers(len(members))]
            self._draws += 1
        return out

    def get_state(self) -> dict:
        return {"seed": self._seed, "draws": self._draws, "weights": self.weights}

    def set_state(self, state: Mapping) -> None:
        if int(state["seed"]) != self._seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self._seed}")
        self._draws = int(state["draws"])
        self.set_weights(state["weights"])
