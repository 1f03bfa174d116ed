"""Hand-written kernels (Pallas TPU / GPU) with pure-JAX reference implementations."""

from hiwin_jax.kernels.adaptive_conv import adaptive_conv, adaptive_conv_sharded

__all__ = ["adaptive_conv", "adaptive_conv_sharded"]
