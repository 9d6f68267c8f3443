"""jaxkd.models.layout: which projection layout a Generator decodes with, and why."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from jaxkd.config import ModelConfig
from jaxkd.models import layout

# the 0.5B's shapes: its projections stream from memory, so "auto" measures
BIG = ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2)
TINY = ModelConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def figures(io_1: float, oi_1: float, io_many: float, oi_many: float) -> dict:
    def one(io, oi):
        return {"io": {"min_ms": io, "median_ms": io}, "oi": {"min_ms": oi, "median_ms": oi}}
    return {"rows_1": one(io_1, oi_1), f"rows_{layout.ROWS_MANY}": one(io_many, oi_many)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXKD_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXKD_WEIGHT_LAYOUT", raising=False)
    return tmp_path / "layout.json"


def test_auto_measures_once_then_reads_the_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(layout, "measure", lambda cfg, dtype: calls.append(1) or figures(1.4, 1.0, 0.78, 1.0))
    c = layout.choose(BIG, jnp.float32)
    assert (c.one_row, c.many_rows, c.source) == ("oi", "io", "measured") and c.needs_copy
    assert c.for_rows(1) == "oi" and c.for_rows(4) == "io"
    assert len(json.loads(cache.read_text())) == 1
    again = layout.choose(BIG, jnp.float32, "auto")
    assert (again.one_row, again.many_rows, again.source) == ("oi", "io", "cached") and len(calls) == 1
    # another dtype is another measurement
    layout.choose(BIG, jnp.bfloat16)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def test_io_needs_a_clear_margin(cache, monkeypatch):
    monkeypatch.setattr(layout, "measure", lambda cfg, dtype: figures(0.95, 1.0, 0.89, 1.0))
    c = layout.choose(BIG, jnp.float32)
    assert (c.one_row, c.many_rows) == ("oi", "io")  # 5% faster is a tie, 11% is not
    assert not layout.choose(BIG, jnp.float32, "oi").needs_copy


def test_a_corrupt_cache_is_measured_again(cache, monkeypatch):
    cache.write_text("{not json")
    monkeypatch.setattr(layout, "measure", lambda cfg, dtype: figures(1.0, 1.0, 1.0, 1.0))
    assert layout.choose(BIG, jnp.float32).source == "measured"
    assert json.loads(cache.read_text())


def test_overrides_small_models_and_bad_values(cache, monkeypatch):
    monkeypatch.setattr(layout, "measure", lambda cfg, dtype: pytest.fail("must not measure"))
    assert (layout.choose(TINY, jnp.float32).source, layout.choose(TINY, jnp.float32).many_rows) == ("small model", "oi")
    c = layout.choose(BIG, jnp.float32, "io")
    assert (c.one_row, c.many_rows, c.source) == ("io", "io", "argument")
    monkeypatch.setenv("JAXKD_WEIGHT_LAYOUT", "io")
    assert layout.choose(BIG, jnp.float32).source == "env"
    assert layout.choose(BIG, jnp.float32, "oi").source == "argument"  # an explicit argument wins
    monkeypatch.setenv("JAXKD_WEIGHT_LAYOUT", "fast")
    with pytest.raises(ValueError, match="'fast' \\(from env\\)"):
        layout.choose(BIG, jnp.float32)


def test_measure_times_both_layouts_at_both_row_counts():
    figs = layout.measure(TINY, jnp.float32, reps=1, layers=1)
    assert set(figs) == {"rows_1", f"rows_{layout.ROWS_MANY}"}
    for fig in figs.values():
        assert set(fig) == {"io", "oi"} and all(v["median_ms"] > 0 for v in fig.values())
