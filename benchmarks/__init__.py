"""Benchmarks, JAX against PyTorch (the PyTorch side from tests/reference/). Run each from the
repository root as a module, e.g. `python -m benchmarks.jbu --help`."""
