"""The test suite, a package so that benchmarks/ can import `tests.reference` (run from the
repository root: `python -m pytest`)."""
