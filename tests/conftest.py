"""Test session setup: 8 fake CPU devices (before jax is imported), offline hub, f32 matmuls."""

import os

# LLVM optimisation level 0 for XLA:CPU's generated kernels. The suite's models are tiny, so its
# time is compile time (~45 ms of LLVM per fused kernel on a 2-core machine); at level 0 that
# drops by about a third (tests/test_partial_training.py, test_multihost.py, train/test_steps.py
# on 2 workers: 652 -> ~410 test-seconds), while matmuls, which are library calls, run as fast
# (SmolLM2 logits and 32-token greedy rollouts: same time). The main job's pipeline run, which
# trains SmolLM2 (train/test_main_job.py), is its own process at the library's level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# XLA:CPU compiles every fusion with LLVM (~45 ms each on a 2-core machine), so tests that
# rebuild the same tiny models and steps pay for the same programs again. scripts/test.sh points
# CQR_JAX_TEST_XLA_CACHE at a fresh folder for the run (shared by its xdist workers, removed
# after it): a persistent compilation cache that turns those repeats into loads.
if os.environ.get("CQR_JAX_TEST_XLA_CACHE"):
  jax.config.update("jax_compilation_cache_dir", os.environ["CQR_JAX_TEST_XLA_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable order otherwise): with `-n 2 --dist loadfile` (scripts/test.sh)
  the longest file then overlaps the rest of the suite instead of running after it."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
