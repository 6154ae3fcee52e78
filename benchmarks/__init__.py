"""Benchmarks: each is `python -m benchmarks.NAME` from the repository root (with .venv's
Python) and prints one JSON line at the end. Ratios are measured against a baseline in the
same run, alternating, because these machines are shared and noisy."""
