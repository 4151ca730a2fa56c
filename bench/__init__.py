"""Benchmarks: ``python -m bench.codec`` and friends."""
