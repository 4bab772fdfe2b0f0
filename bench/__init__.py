"""Benchmarks of selfcheckd: `python -m bench` (see bench/__main__.py, docs/benchmarks.md)."""
