"""XLA compiler options for the heavy programs: the updates, the log-prob passes, the sampler."""

from __future__ import annotations

import os

import jax

# LLVM optimisation level of XLA:CPU's generated kernels (XLA's default is 3).
CPU_LLVM_OPT_LEVEL = 1


def compiler_options() -> dict[str, int] | None:
  """On XLA:CPU, LLVM at -O1 instead of XLA's default -O3: these programs spend their run time
  in matmul library calls, which LLVM does not generate, while compile time grows with every fused
  kernel LLVM optimises: shorter compiles at the same step time (bench/results/compile.md). Other
  backends, or an
  `XLA_FLAGS` that sets `--xla_backend_optimization_level` itself: None (XLA's choice)."""
  if jax.default_backend() != "cpu":
    return None
  if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
    return None
  return {"xla_backend_optimization_level": CPU_LLVM_OPT_LEVEL}
