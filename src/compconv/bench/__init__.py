"""Benchmarks: timing harness (``timing``), per-layer and whole-model suites (``suites``), CLI (``cli``)."""
