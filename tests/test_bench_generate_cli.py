"""evals.bench_generate refuses bad variant arguments before it measures anything."""

from __future__ import annotations

import pytest

from evals import bench_generate


@pytest.mark.parametrize("argv, message", [
    (["--env", "jaxkd-io"], "--env takes NAME=KEY=VALUE"),
    (["--env", "jaxkd-io=JAXKD_WEIGHT_LAYOUT"], "--env takes NAME=KEY=VALUE"),
    (["--env", "jaxkd=JAXKD_WEIGHT_LAYOUT=io"], "with new names"),
    (["--env", "a=X=1", "a=Y=2"], "with new names"),
    (["--xla-flags", "a=--flag", "--env", "a=X=1"], "with new names"),
    (["--reps", "3"], "at least 5 repetitions"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, monkeypatch):
    monkeypatch.setattr(bench_generate, "measure_bandwidth", lambda reps: pytest.fail("measured"))
    with pytest.raises(SystemExit, match=message):
        bench_generate.main(argv)
