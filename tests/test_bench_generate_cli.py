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


def test_report_gives_a_bf16_variant_its_own_roofline_and_token_agreement(tmp_path):
    """A variant whose batched steps read a bf16 copy is held to the f32 model's roofline and to
    its own (half the bytes), and the report counts the rows whose greedy tokens equal jaxkd's."""
    from evals.bench_report import write_markdown

    def run(rate, rows):
        cell = {"min": 1.0, "median": 1.0}
        return {"decode_s": cell, "prefill_s": cell, "wall_s": cell, "decode_tok_s_best": rate,
                "decode_tok_s_median": rate, "e2e_tok_s_median": rate, "first_row_tokens": rows[0][:40],
                "row_tokens": rows}

    same, other = [[1, 2, 3, 4]] * 2, [[1, 2, 3, 4], [1, 2, 9, 4]]
    res = {"machine": {"host": "h", "cpu": "c", "simd": [], "cores": 2, "ram_GiB": 1, "python": "3",
                       "versions": {}, "load_avg_at_start": [0, 0, 0]},
           "bandwidth": {"jax_GBps": 10.0, "array_GiB": 1, "jax_s": {"min": 0.1, "median": 0.1},
                         "numpy_GBps": 9.0, "best_GBps": 10.0},
           "command": "cmd", "date": "d", "total_s": 60, "src": {"jaxkd": "x"}, "reps": 5,
           "decode": {"model": "m",
                      "impls": {"jaxkd": {"weight_bytes_per_step": 2e9, "param_bytes": 2.5e9},
                                "baseline": {"weight_bytes_per_step": 2e9, "param_bytes": 2.5e9},
                                "jaxkd-bf16": {"weight_bytes_per_step": 2e9, "param_bytes": 2.5e9,
                                               "batched_dtype": "bfloat16", "weight_bytes_per_wide_step": 1e9}},
                      "runs": {"8": {"batch": 8, "new_tokens": 4, "prompt_lens": [5, 6],
                                     "jaxkd": run(20.0, same), "baseline": run(16.0, same),
                                     "jaxkd-bf16": run(32.0, other)}}}}
    res["matmuls"] = {"model": "m", "layers": 2, "vocab": 10, "peak_GFLOPs": {"float32": 200.0, "bfloat16": 380.0},
                      "runs": {"float32/8": {"dtype": "float32", "batch": 8, "layout": "io",
                                             "step_s": {"min": 0.1, "median": 0.2}, "GFLOPs_best": 60.0,
                                             "tok_s_bound_best": 80.0, "tok_s_bound_median": 40.0},
                               "bfloat16/8": {"dtype": "bfloat16", "batch": 8, "layout": "oi",
                                              "step_s": {"min": 0.1, "median": 0.1}, "GFLOPs_best": 90.0,
                                              "tok_s_bound_best": 80.0, "tok_s_bound_median": 80.0}}}
    path = tmp_path / "r.md"
    write_markdown(res, path)
    text = path.read_text()
    # f32 roofline at batch 8: 8 x 10 GB/s / 2 GB = 40 tok/s; the bf16 copy's: 80 tok/s
    assert "| 0.5B decode, batch 8, `jaxkd-bf16` (batched steps on a bf16 copy): >= 1.6x the previous code | " \
           "2.00x (medians) | yes |" in text
    assert "| 0.5B decode, batch 8, `jaxkd-bf16`: >= 50% of roofline | 80% of the f32 model's, 40% of its own " \
           "(bf16 bytes) (median) | no |" in text
    assert "| 8 | `jaxkd-bf16` | 80.0 | 40% | 1 of 2 | 2 |" in text
    assert "| 0.5B decode, batch 8: >= 1.6x the previous code | 1.25x (medians) | no |" in text
    # the compute side: each dtype's decode next to its own matmul floor
    assert "| 8 | float32 | io | 100.0 / 200.0 | 60 | 40.0 | `jaxkd` 20.00 | 50% |" in text
    assert "| 8 | bfloat16 | oi | 100.0 / 100.0 | 90 | 80.0 | `jaxkd-bf16` 32.00 | 40% |" in text
