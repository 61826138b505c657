"""How the sampler's program runs on a backend, chosen in one place from the platform.

`SamplerConfig` says what to sample (the method and the shapes); a `DecodePolicy` says how the
device runs it: cache dtype, the decode step's attention products, unrolled or scanned blocks,
weights-first products at small row counts, shedding finished rows. None of these changes what
is sampled beyond the last bit of a matmul. `for_backend` gives the default per platform; a
caller may pass its own to `Sampler(policy=...)` (tests and benchmarks compare strategies so).
The CPU strategies live in `cqr_jax/cpu_decode.py`.
"""

from __future__ import annotations

import dataclasses

ATTENTION_PRODUCTS = ("reduce", "matmul")
DTYPES = (None, "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
  """cache_dtype: KV cache and decode attention dtype; None = the compute dtype. On CPU float32:
    XLA:CPU rewrites a bf16 cache update into an f32 pass over the whole cache every step.
  prefill_dtype: matmul dtype of the prompt pass; None = the compute dtype.
  attention: the decode step's attention products, "matmul" (einsums, for matrix units) or
    "reduce" (fused multiply-sums, keys stored slots-minor: `cpu_decode.Reduce`).
  scan_layers: the prompt pass and decode step run the blocks as one lax.scan; None = the model
    config's `scan_layers`. Unrolled on CPU: XLA:CPU copies each block's weights out of the
    stacked array in every decode step (`python bench/bench_decode_layers.py`).
  weights_first_rows: decode steps of at most this many rows run their projections and LM head
    weights first (`cpu_decode.weights_first_model`; unrolled blocks only); 0 = never.
  compact_min_rows: the decode loop goes on in fewer rows once few enough are unfinished, down to
    this many (`sampler.compaction_stages`; bench/results/rollout_compaction.md); 0 = never. Pays
    where a step's cost grows with its rows (CPU); it adds a decode loop per stage to the
    program.
  cast_params: with bf16 compute, cast the floating parameters to bf16 once per call inside the
    program (a temporary half-size copy: each decode step reads half the bytes).
  """
  cache_dtype: str | None = None
  prefill_dtype: str | None = None
  attention: str = "matmul"
  scan_layers: bool | None = None
  weights_first_rows: int = 0
  compact_min_rows: int = 0
  cast_params: bool = True

  def __post_init__(self):
    if self.attention not in ATTENTION_PRODUCTS:
      raise ValueError(f"DecodePolicy.attention={self.attention!r}: expected one of "
                       f"{ATTENTION_PRODUCTS}")
    for name in ("cache_dtype", "prefill_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"DecodePolicy.{name}={getattr(self, name)!r}: expected None, "
                         "'float32' or 'bfloat16'")
    for name in ("weights_first_rows", "compact_min_rows"):
      if getattr(self, name) < 0:
        raise ValueError(f"DecodePolicy.{name} must be >= 0, got {getattr(self, name)}")


CPU = DecodePolicy(cache_dtype="float32", attention="reduce", scan_layers=False,
                   weights_first_rows=32, compact_min_rows=16)
ACCELERATOR = DecodePolicy()


def for_backend(platform: str) -> DecodePolicy:
  """The default policy of a JAX platform ("cpu", "tpu", "gpu")."""
  return CPU if platform == "cpu" else ACCELERATOR
