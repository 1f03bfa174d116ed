"""Test session setup: 8 fake CPU devices (for the sharding tests) before jax initialises, and the
fixtures several test modules share."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the tpu-aot extra) only compiles for abstract TPU topologies here: no metadata server.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Two xdist workers may both AOT-compile with libtpu: without this the second one fails on
# libtpu's single-process lockfile (/tmp/libtpu_lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(scope="session")
def torch():
  """The torch module; a test that takes it is skipped where the test extra is not installed."""
  return pytest.importorskip("torch")
