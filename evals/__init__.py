"""Evaluations and benchmarks (run as python -m evals.<name>)."""
