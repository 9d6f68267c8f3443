"""Domain-aware sampling: lagging subdomains get up-weighted, within bounds, reproducibly."""

import numpy as np
import pytest

from jaxkd.distill.sampling import DomainSampler, gaps_to_weights, per_domain_mean

PRIOR = {"earbuds": 100, "speakers": 100, "smart_home": 100, "networking": 100}


def test_planted_lagging_domain_is_upweighted():
    gaps = {"earbuds": 0.2, "speakers": 0.25, "smart_home": 1.5, "networking": 0.22}
    w = gaps_to_weights(gaps, PRIOR, tau=1.0, floor=0.25, cap=4.0)
    assert max(w, key=w.get) == "smart_home"
    assert w["smart_home"] > 0.25 * 1.5  # clearly above its uniform share
    assert abs(sum(w.values()) - 1) < 1e-9


def test_floor_and_cap_bound_the_weights():
    gaps = {"earbuds": 0.0, "speakers": 0.0, "smart_home": 100.0, "networking": 0.0}
    w = gaps_to_weights(gaps, PRIOR, tau=0.01, floor=0.5, cap=2.0)
    for d in PRIOR:
        assert 0.5 * 0.25 - 1e-9 <= w[d] <= 2.0 * 0.25 + 1e-9, (d, w[d])
    assert w["smart_home"] == pytest.approx(0.5)  # pinned at its cap
    assert abs(sum(w.values()) - 1) < 1e-9


def test_equal_gaps_keep_the_prior():
    prior = {"a": 10, "b": 30, "c": 60}
    w = gaps_to_weights({"a": 0.7, "b": 0.7, "c": 0.7}, prior)
    np.testing.assert_allclose([w["a"], w["b"], w["c"]], [0.1, 0.3, 0.6], atol=1e-12)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="tau"):
        gaps_to_weights({}, PRIOR, tau=0)
    with pytest.raises(ValueError, match="floor"):
        gaps_to_weights({}, PRIOR, floor=2.0)
    with pytest.raises(ValueError, match="non-finite gap"):
        per_domain_mean([1.0, float("nan")], ["a", "b"])


def test_sampler_follows_weights_and_resumes_exactly():
    domains = ["a"] * 50 + ["b"] * 50
    s = DomainSampler(domains, seed=3, weights={"a": 0.9, "b": 0.1})
    first = s.next_indices(40)
    state = s.get_state()
    rest = s.next_indices(400)
    frac_a = np.mean(np.concatenate([first, rest]) < 50)
    assert 0.85 < frac_a < 0.95

    resumed = DomainSampler(domains, seed=3)
    resumed.set_state(state)
    np.testing.assert_array_equal(resumed.next_indices(400), rest)

    other_seed = DomainSampler(domains, seed=4, weights={"a": 0.9, "b": 0.1})
    assert not np.array_equal(other_seed.next_indices(40), first)


def test_per_domain_mean_groups():
    assert per_domain_mean([1, 3, 10], ["x", "x", "y"]) == {"x": 2.0, "y": 10.0}
