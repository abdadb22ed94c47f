"""Test set-up: 8 forced host CPU devices (for sharding tests), fp32, the tests dir on sys.path."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

# fp32 parity tests mean fp32: no TF32 matmuls when the suite runs on a GPU.
jax.config.update("jax_default_matmul_precision", "highest")
