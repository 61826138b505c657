"""The rollout engine: batched KV-cache generation with n samples per prompt (method.md 4.4-4.5).

One jitted program per (prompt bucket, generation bucket, batch) shape and `DecodePlan`:
prefill of the B left-padded prompts (once per prompt, not per sample; sampler_kv), then a
`lax.while_loop` of single-token decode steps for the B * n rows (prompt-major: sample row
i * n + j is sample j of prompt i) that updates the cache in place and stops early once every
row has emitted an EOS, carrying a `LoopState`. Where the policy says so (CPU), the loop goes on
in fewer rows once enough have ended (`compaction_stages`). How the device runs all this is
the `DecodePolicy`'s (cqr_jax/decode_policy.py). The model's parameters are passed as its
current `nnx.State` (no copy; the trainer updates them every step) and the graph definition is
static. Sampling settings (temperature, top-p value, EOS ids) are traced, so changing them does
not recompile.

Stop strings are found on the host after generation (they do not end the device loop; EOS does).
Log-probs are log softmax(logits / T) at the sampled token (T = 1 for greedy), method.md 4.5.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cqr_jax import decode_policy, sampler_kv, sampling_ops, shared_prefix, sharding
from cqr_jax.decode_policy import DecodePolicy
from cqr_jax.compile_options import compiler_options

log = logging.getLogger(__name__)

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Sampling settings; defaults are the paper's rollout (method.md 4.4: T 0.7, top-p 1, no top-k,
  1,536 prompt / 1,024 response tokens, n = 8).

  prompt_len_buckets / gen_len_buckets: padded lengths to compile for (increasing; empty = 16,
    32, 64, 128, 160, 192, 224, 256, 320, ... capped by the maximum, which is always a bucket).
    batch_buckets: prompt counts to pad to (empty = the count itself); the padded count is then
    rounded up to a multiple of the mesh's data x fsdp size.
  eos_ids: empty = the tokenizer's eos plus the model config's eos ids. ignore_eos: generate
    max_new_tokens for every row (benchmarks).
  compute_dtype: matmul operand dtype for generation (Decoder `compute_dtype=`); None = the
    model config's.
  shared_prefix_min: when a call's prompts (two or more) begin with the same tokens (a
    template's instructions), the prompt pass runs that prefix once (`cqr_jax.shared_prefix`)
    and decode steps read its cache once for all rows, if it spans at least this many tokens;
    0 = off. Same tokens as without it. Each distinct prefix length compiles its own program
    (one per template in a run).

  How the device runs the call (cache dtype, attention products, scanned blocks, shedding
  finished rows) is the `Sampler`'s `DecodePolicy` (cqr_jax/decode_policy.py), not a setting
  of what is sampled.
  """
  max_prompt_len: int = 1536
  max_new_tokens: int = 1024
  temperature: float = 0.7
  top_p: float = 1.0
  top_k: int = 0
  n: int = 8
  prompt_len_buckets: tuple[int, ...] = ()
  gen_len_buckets: tuple[int, ...] = ()
  batch_buckets: tuple[int, ...] = ()
  truncate_prompt_left: bool = False
  stop_strings: tuple[str, ...] = ()
  eos_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  compute_dtype: str | None = None
  shared_prefix_min: int = 64

  def __post_init__(self):
    if self.max_prompt_len < 1:
      raise ValueError(f"SamplerConfig.max_prompt_len must be >= 1, got {self.max_prompt_len}")
    if self.max_new_tokens < 1:
      raise ValueError(f"SamplerConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.n < 1:
      raise ValueError(f"SamplerConfig.n must be >= 1, got {self.n}")
    if self.shared_prefix_min < 0:
      raise ValueError(f"SamplerConfig.shared_prefix_min must be >= 0, got "
                       f"{self.shared_prefix_min}")
    sampling_ops.check_sampling_args(self.temperature, self.top_k, self.top_p)
    for name in ("prompt_len_buckets", "gen_len_buckets", "batch_buckets"):
      b = tuple(getattr(self, name))
      if any(x < 1 for x in b) or list(b) != sorted(set(b)):
        raise ValueError(f"SamplerConfig.{name} must be strictly increasing positive ints, got {b}")
    if any(not s for s in self.stop_strings):
      raise ValueError("SamplerConfig.stop_strings must not contain an empty string")
    if self.compute_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"SamplerConfig.compute_dtype={self.compute_dtype!r}: expected None, "
                       "'float32' or 'bfloat16'")


@dataclasses.dataclass
class Rollouts:
  """B prompts x n samples, prompt-major: row r is sample r % n of prompt r // n.

  prompt_ids: [N, P] int32, left-padded with pad_id (P = the prompt bucket).
  prompt_mask: [N, P] bool.
  completion_ids: [N, G] int32 (G = max_new_tokens of the call), pad_id after the end.
  completion_mask: [N, G] bool: 1 up to and including the first EOS (or the token that completes
    a stop string, or the last token when the length ran out), 0 after (method.md 4.5).
  logprobs: [N, G] f32: log softmax(logits / T) at the sampled token (T = 1 if greedy); 0 where
    the mask is 0.
  finish_reasons: N of "eos" | "stop" | "length".
  texts: N decoded completions (special tokens skipped, stop string and after removed), or ""
    without a tokenizer.
  prompt_truncated: [B] bool, prompts cut from the left (config.truncate_prompt_left).
  """
  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  completion_ids: np.ndarray
  completion_mask: np.ndarray
  logprobs: np.ndarray
  finish_reasons: list[str]
  texts: list[str]
  n: int
  prompt_truncated: np.ndarray

  @property
  def num_prompts(self) -> int:
    return len(self.prompt_truncated)

  @property
  def prompt_index(self) -> np.ndarray:
    """[N] index of the prompt each sample row belongs to (r // n)."""
    return np.arange(len(self.finish_reasons)) // self.n

  @property
  def completion_lengths(self) -> np.ndarray:
    return self.completion_mask.sum(-1).astype(np.int32)

  def completion_tokens(self, r: int) -> list[int]:
    """Sample r's completion ids (masked part only)."""
    return self.completion_ids[r, :self.completion_lengths[r]].tolist()

  @staticmethod
  def concat(parts: Sequence["Rollouts"], pad_id: int) -> "Rollouts":
    """The rollouts of several calls, prompt-major in order; prompts left-padded to the widest."""
    if len(parts) == 1:
      return parts[0]
    if len({r.n for r in parts}) != 1 or len({r.completion_ids.shape[1] for r in parts}) != 1:
      raise ValueError("Rollouts.concat: the calls differ in n or in max_new_tokens")
    width = max(r.prompt_ids.shape[1] for r in parts)

    def left_pad(x, fill):
      return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)

    return Rollouts(
        np.concatenate([left_pad(r.prompt_ids, pad_id) for r in parts]),
        np.concatenate([left_pad(r.prompt_mask, False) for r in parts]),
        np.concatenate([r.completion_ids for r in parts]),
        np.concatenate([r.completion_mask for r in parts]),
        np.concatenate([r.logprobs for r in parts]),
        [x for r in parts for x in r.finish_reasons], [x for r in parts for x in r.texts],
        parts[0].n, np.concatenate([r.prompt_truncated for r in parts]))

  def take(self, prompts: Sequence[int]) -> "Rollouts":
    """The rollouts of these prompts (indices into 0..B-1), in that order, with their n rows."""
    prompts = np.asarray(prompts, np.int64)
    rows = (prompts[:, None] * self.n + np.arange(self.n)).reshape(-1)
    return Rollouts(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
                    self.completion_mask[rows], self.logprobs[rows],
                    [self.finish_reasons[r] for r in rows], [self.texts[r] for r in rows],
                    self.n, self.prompt_truncated[prompts])


# ------------------------------------------------------------------------------------ host side
def _default_buckets(maximum: int, smallest: int = 16) -> tuple[int, ...]:
  """16, 32, 64, 128, then quarter-octave steps (160, 192, 224, 256, 320, 384, ...), capped by
  `maximum`: at most a fifth of a row is padding beyond 128 tokens, ~17 shapes up to 1,536.
  Prefill and the update are compute-bound, so padded tokens cost as much as real ones."""
  out, b = [], smallest
  while b < 128:
    out.append(b)
    b *= 2
  while b < maximum:
    out += [b, b + b // 4, b + b // 2, b + 3 * b // 4]
    b *= 2
  return tuple(x for x in out if x < maximum) + (maximum,)


def bucket(length: int, buckets: Sequence[int], what: str) -> int:
  """The smallest bucket >= length (ValueError naming `what` if none)."""
  for b in buckets:
    if b >= length:
      return b
  raise ValueError(f"{what}={length} exceeds the largest bucket {buckets[-1]}")


def _is_chat(p: Any) -> bool:
  return (isinstance(p, (list, tuple)) and len(p) > 0 and isinstance(p[0], Mapping))


def encode_prompts(prompts: Sequence[Any], tokenizer=None, vocab_size: int | None = None
                   ) -> list[list[int]]:
  """Token-id prompts as lists; chat message lists go through the tokenizer's chat template
  (add_generation_prompt=True). Raises ValueError naming prompts[i] on bad input."""
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not hasattr(
      prompts, "__len__"):
    raise ValueError(f"prompts must be a list of token-id lists or chat message lists, "
                     f"got {type(prompts).__name__}")
  if len(prompts) == 0:
    raise ValueError("prompts is empty: nothing to generate from")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      raise ValueError(f"prompts[{i}] is a str; pass token ids or a chat message list "
                       f"([{{'role': 'user', 'content': ...}}])")
    if _is_chat(p):
      if tokenizer is None:
        raise ValueError(f"prompts[{i}] is a chat message list but the Sampler has no tokenizer")
      for j, m in enumerate(p):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
          raise ValueError(f"prompts[{i}][{j}] must be a dict with 'role' and 'content', got {m!r}")
      enc = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True)
      ids = enc["input_ids"] if isinstance(enc, Mapping) or hasattr(enc, "keys") else enc
      ids = [int(t) for t in ids]
    else:
      arr = np.asarray(p)
      if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"prompts[{i}] must be a 1-D list of int token ids, got shape "
                         f"{arr.shape} dtype {arr.dtype}")
      ids = arr.astype(np.int64).tolist()
    if not ids:
      raise ValueError(f"prompts[{i}] is empty (0 tokens)")
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
      bad = next(t for t in ids if t < 0 or t >= vocab_size)
      raise ValueError(f"prompts[{i}] has token id {bad} outside the vocabulary [0, {vocab_size})")
    out.append(ids)
  return out


def find_stop(token_ids: Sequence[int], stop_strings: Sequence[str], tokenizer
              ) -> tuple[int, str] | None:
  """(k, text) for the shortest prefix token_ids[:k] whose text contains a stop string, and that
  text cut before the earliest stop string; None if no stop string occurs."""
  def decode(ids):
    return tokenizer.decode(list(ids), skip_special_tokens=True)

  def first_hit(text):
    hits = [text.find(s) for s in stop_strings]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else -1

  if first_hit(decode(token_ids)) < 0:
    return None
  lo, hi = 1, len(token_ids)  # containment is monotone in the prefix length
  while lo < hi:
    mid = (lo + hi) // 2
    if first_hit(decode(token_ids[:mid])) >= 0:
      hi = mid
    else:
      lo = mid + 1
  text = decode(token_ids[:lo])
  return lo, text[:first_hit(text)]


# ---------------------------------------------------------------------------------- device side
def _as_graph_state(model_or_state) -> tuple[Any, Any]:
  if isinstance(model_or_state, nnx.Module):
    return nnx.split(model_or_state)
  if isinstance(model_or_state, tuple) and len(model_or_state) == 2:
    return model_or_state
  raise TypeError("generate() takes an nnx.Module or a (graphdef, state) pair, got "
                  f"{type(model_or_state).__name__}")


def _cast_floats(state, dtype):
  def cast(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, state)


def compaction_stages(rows: int, min_rows: int, multiple: int) -> tuple[int, ...]:
  """The row counts a call's decode loop runs at: `rows`, then each smaller count of the form
  2^k or 3 * 2^k (48, 32, 24, 16, 12, 8, ...) that is a multiple of `multiple` (the mesh's
  data-parallel size) and at least `min_rows` (0 = `rows` only). Steps of 3/4 and 2/3 keep a
  stage's padding (finished rows kept to fill it) under a third of its rows."""
  if min_rows <= 0:
    return (rows,)
  ladder = {c for k in range(rows.bit_length()) for c in (1 << k, 3 << k)}
  return (rows, *sorted((c for c in ladder if min_rows <= c < rows and c % multiple == 0),
                        reverse=True))


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """The static settings of one generation program (its jit cache key besides the shapes):
  what `Sampler.generate` derives from the call, its `SamplerConfig` and its `DecodePolicy`.

  stages: the row counts the decode loop runs at (the first B * n; `compaction_stages`);
  weights_first: per stage, whether its steps run weights first (`cpu_decode`); shared: the
  prompts' common prefix length (`cqr_jax.shared_prefix.split_prompts`), 0 = none."""
  n: int
  gen_len: int
  top_k: int
  pad_id: int
  compute_dtype: str
  prefill_dtype: str
  cache_dtype: str
  param_dtype: str | None
  attention: str
  scan: bool
  shared: int
  stages: tuple[int, ...]
  weights_first: tuple[bool, ...]


class LoopState(NamedTuple):
  """The decode loop's carry. Rows are the stage's (R <= B * n); `rows_idx` [R] maps them to the
  call's B * n rows (None while all rows run, in order). Outputs are over all B * n rows."""
  step: jax.Array           # int32: tokens generated so far
  rows_idx: Any             # [R] int32 or None
  positions_r: jax.Array    # [R] position of the row's first generated token
  logits_rv: jax.Array      # [R, V] float32: predicts the next token
  cache: Any                # sampler_kv cache state
  tokens_ng: jax.Array      # [B * n, G] int32
  logprobs_ng: jax.Array    # [B * n, G] float32
  lengths_n: jax.Array      # [B * n] int32
  done_n: jax.Array         # [B * n] bool
  eos_n: jax.Array          # [B * n] bool


def _decode_loop(decode, floor, c: LoopState, key, max_steps, temperature, top_p, eos_e,
                 plan: DecodePlan, rows: int) -> LoopState:
  """Decode steps while some row is unfinished, more than `floor` of them, and steps are left."""
  def cond(c):
    return (c.step < max_steps) & (jnp.sum(~c.done_n) > floor)

  def body(c):
    i, idx = c.step, c.rows_idx
    sub = (lambda x: x) if idx is None else (lambda x: x[idx])
    uniform_r = sub(jax.random.uniform(jax.random.fold_in(key, i), (rows,), jnp.float32))
    tok_r, lp_r = sampling_ops.select_tokens(None, c.logits_rv, temperature, top_k=plan.top_k,
                                             top_p=top_p, uniform_b=uniform_r)
    done_r = sub(c.done_n)
    tok_r = jnp.where(done_r, plan.pad_id, tok_r)
    lp_r = jnp.where(done_r, 0.0, lp_r)
    hit_r = ~done_r & jnp.any(tok_r[:, None] == eos_e[None, :], axis=-1)
    if idx is None:
      tokens = jax.lax.dynamic_update_slice(c.tokens_ng, tok_r[:, None], (0, i))
      logp = jax.lax.dynamic_update_slice(c.logprobs_ng, lp_r[:, None], (0, i))
      lengths = c.lengths_n + (~done_r).astype(jnp.int32)
      eos, done = c.eos_n | hit_r, c.done_n | hit_r
    else:
      tokens = c.tokens_ng.at[idx, i].set(tok_r)
      logp = c.logprobs_ng.at[idx, i].set(lp_r)
      lengths = c.lengths_n.at[idx].add((~done_r).astype(jnp.int32))
      eos = c.eos_n.at[idx].set(c.eos_n[idx] | hit_r)
      done = c.done_n.at[idx].set(done_r | hit_r)
    logits, cache = decode(tok_r, c.positions_r + i, c.cache, i)
    return LoopState(i + 1, idx, c.positions_r, logits, cache, tokens, logp, lengths, done, eos)

  return jax.lax.while_loop(cond, body, c)


def _generate_program(graphdef, state, prompt_ids_bp, prompt_mask_bp, key, max_steps,
                      temperature, top_p, eos_e, plan: DecodePlan):
  """Prefill + decode loops. temperature, top_p (None = off) and the eos ids eos_e [E] (-1 =
  unused slot) are traced. Returns tokens [B*n, G], logprobs [B*n, G], lengths [B*n],
  eos_hit [B*n], steps run, and the row count of the last stage that ran a step.

  The decode loop runs at plan.stages[0] rows until at most stages[1] rows are unfinished, then
  keeps those (and finished ones to fill up) in stages[1] rows, and so on: finished rows stop
  costing matmuls. The kept rows' caches are gathered (each gets its own copy of its prompt's
  slots); each row keeps its own random draws, so the tokens are those of one loop.
  Traced under a mesh (`jax.set_mesh`), every per-row array and cache keeps its rows on
  ("data", "fsdp") (`sharding.constrain_rows`); without one, nothing is constrained."""
  if plan.param_dtype is not None:
    state = _cast_floats(state, jnp.dtype(plan.param_dtype))
  model = nnx.merge(graphdef, state)
  n, stages = plan.n, plan.stages
  rows = prompt_ids_bp.shape[0] * n
  constrain = sharding.constrain_rows
  prefill, decode = sampler_kv.make_steps(model, plan, n=n, weights_first=plan.weights_first[0])
  mask_bp = prompt_mask_bp.astype(bool)
  positions_bp = jnp.maximum(jnp.cumsum(mask_bp, axis=-1) - 1, 0).astype(jnp.int32)
  logits_rv, cache = prefill(prompt_ids_bp, positions_bp, mask_bp)
  loop = functools.partial(_decode_loop, key=key, max_steps=max_steps, temperature=temperature,
                           top_p=top_p, eos_e=eos_e, plan=plan, rows=rows)
  c = LoopState(
      step=jnp.int32(0), rows_idx=None,
      positions_r=jnp.repeat(positions_bp[:, -1] + 1, n, axis=0), logits_rv=constrain(logits_rv),
      cache=cache, tokens_ng=constrain(jnp.full((rows, plan.gen_len), plan.pad_id, jnp.int32)),
      logprobs_ng=constrain(jnp.zeros((rows, plan.gen_len), jnp.float32)),
      lengths_n=constrain(jnp.zeros((rows,), jnp.int32)),
      done_n=constrain(jnp.repeat(~mask_bp[:, -1], n, axis=0)),  # padding rows start done
      eos_n=constrain(jnp.zeros((rows,), bool)))
  rows_end = rows
  for k, r_k in enumerate(stages):
    if k:  # keep r_k rows, the unfinished first; each gets its own copy of its prompt's slots
      done_r = c.done_n if c.rows_idx is None else c.done_n[c.rows_idx]
      order = jnp.argsort(done_r, stable=True)[:r_k]
      idx = order if c.rows_idx is None else c.rows_idx[order]
      c = c._replace(rows_idx=idx, positions_r=constrain(c.positions_r[order]),
                     logits_rv=constrain(c.logits_rv[order]),
                     cache=sampler_kv.keep_rows(c.cache, cache, idx, order, n, plan.scan))
      decode = sampler_kv.make_steps(model, plan, n=1, weights_first=plan.weights_first[k])[1]
    floor = stages[k + 1] if k + 1 < len(stages) else 0
    runs = (c.step < max_steps) & (jnp.sum(~c.done_n) > floor)
    rows_end = jnp.where(runs, r_k, rows_end)
    c = loop(decode, floor, c)
  return c.tokens_ng, c.logprobs_ng, c.lengths_n, c.eos_n, c.step, jnp.int32(rows_end)


# Number of times the generation program was traced (each is a compilation): tests and the
# trainer use it to check that step 2 onward reuses the compiled shapes.
TRACE_COUNT = [0]


def _traced_program(*args, **kw):
  TRACE_COUNT[0] += 1
  return _generate_program(*args, **kw)


@functools.cache
def jitted_program():
  """The jitted generation program (created on first use, once the backend is known)."""
  return jax.jit(_traced_program, static_argnums=(0,), static_argnames=("plan",),
                 compiler_options=compiler_options())


def _to_host(tree):
  """Device outputs to numpy; on several processes every process gets the full arrays."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


class Sampler:
  """Generates rollouts from a Decoder (its `forward` through cqr_jax/sampler_kv.py).

  Args:
    config: SamplerConfig.
    tokenizer: HF tokenizer (chat prompts, decoded texts, stop strings, default eos / pad ids).
    mesh: a jax Mesh with axes ("data", "fsdp", "tensor"), or None for the default device. Prompt
      rows are sharded over data x fsdp; parameters stay as the model placed them.
    model_eos_ids: extra EOS ids (generate() also adds the model config's unless
      config.eos_ids is set).
    pad_id: padding id of prompts and of completions after their end; default the tokenizer's
      pad, else the first EOS id, else 0.
    policy: how the device runs the program (`DecodePolicy`); None = the default of the
      backend in use (`decode_policy.for_backend`).
  """

  def __init__(self, config: SamplerConfig = SamplerConfig(), tokenizer=None, *, mesh=None,
               model_eos_ids: Sequence[int] = (), pad_id: int | None = None,
               policy: DecodePolicy | None = None):
    self.config = config
    self.policy = policy
    self.tokenizer = tokenizer
    self.mesh = mesh
    eos = tuple(config.eos_ids)
    if not eos:
      tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
      eos = tuple(sorted({*([tok_eos] if tok_eos is not None else []), *model_eos_ids}))
    self.eos_ids = () if config.ignore_eos else tuple(int(e) for e in eos)
    if pad_id is None:
      pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    self.pad_id = int(pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0))
    self.prompt_buckets = (tuple(config.prompt_len_buckets)
                           or _default_buckets(config.max_prompt_len))
    if self.prompt_buckets[-1] < config.max_prompt_len:
      self.prompt_buckets += (config.max_prompt_len,)
    self.gen_buckets = tuple(config.gen_len_buckets) or _default_buckets(config.max_new_tokens)
    if self.gen_buckets[-1] < config.max_new_tokens:
      self.gen_buckets += (config.max_new_tokens,)
    self.num_compiles = 0
    self.last_timing: dict[str, float] = {}

  # ---------------------------------------------------------------- helpers
  @property
  def data_parallel_size(self) -> int:
    return sharding.data_parallel_size(self.mesh)

  def eos_ids_for(self, model_config=None) -> tuple[int, ...]:
    """The EOS ids used with a model: config.eos_ids if given, else the tokenizer's eos plus
    the model config's (HF generation_config style); none with ignore_eos."""
    if self.config.ignore_eos or self.config.eos_ids:
      return self.eos_ids
    extra = tuple(getattr(model_config, "eos_token_ids", ()) or ())
    return tuple(sorted(set(self.eos_ids) | set(extra)))

  def _batch_size(self, b: int) -> int:
    dp = self.data_parallel_size
    if self.config.batch_buckets:
      b = bucket(b, self.config.batch_buckets, "number of prompts")
    if b % dp:
      b += dp - b % dp
    return b

  def prepare(self, prompts: Sequence[Any], vocab_size: int | None = None):
    """Encodes, checks and left-pads prompts: (ids [B, P], mask [B, P], truncated [B])."""
    cfg = self.config
    ids = encode_prompts(prompts, self.tokenizer, vocab_size)
    truncated = np.zeros(len(ids), bool)
    for i, t in enumerate(ids):
      if len(t) > cfg.max_prompt_len:
        if not cfg.truncate_prompt_left:
          raise ValueError(f"prompts[{i}] has {len(t)} tokens > max_prompt_len="
                           f"{cfg.max_prompt_len} (set truncate_prompt_left=True to keep its last "
                           f"{cfg.max_prompt_len} tokens)")
        ids[i] = t[-cfg.max_prompt_len:]
        truncated[i] = True
    if truncated.any():
      log.warning("sampler: truncated %d prompt(s) from the left to max_prompt_len=%d: %s",
                  truncated.sum(), cfg.max_prompt_len, np.flatnonzero(truncated).tolist())
    p = bucket(max(len(t) for t in ids), self.prompt_buckets, "prompt length")
    b = self._batch_size(len(ids))
    ids_bp = np.full((b, p), self.pad_id, np.int32)
    mask_bp = np.zeros((b, p), bool)
    for i, t in enumerate(ids):
      ids_bp[i, p - len(t):] = t
      mask_bp[i, p - len(t):] = True
    return ids_bp, mask_bp, truncated

  # ---------------------------------------------------------------- main entry
  def generate(self, model, prompts: Sequence[Any], *, key: jax.Array, n: int | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None) -> Rollouts:
    """Samples n completions per prompt.

    Args:
      model: an nnx Decoder, or its (graphdef, state) pair (read as is: no copy).
      prompts: token-id lists or chat message lists ([{"role", "content"}, ...]).
      key: PRNG key; the same key gives the same rollouts.
      n, max_new_tokens, temperature, top_p, top_k: per-call overrides of the config.
    Returns:
      Rollouts with B * n rows, prompt-major (row i * n + j = sample j of prompt i).
    """
    cfg = self.config
    n = cfg.n if n is None else n
    temperature = cfg.temperature if temperature is None else temperature
    top_p = cfg.top_p if top_p is None else top_p
    top_k = cfg.top_k if top_k is None else top_k
    max_new = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    sampling_ops.check_sampling_args(temperature, top_k, top_p)
    if not 1 <= max_new <= cfg.max_new_tokens:
      raise ValueError(f"max_new_tokens={max_new} must be in [1, SamplerConfig.max_new_tokens="
                       f"{cfg.max_new_tokens}]")
    graphdef, state = _as_graph_state(model)
    mcfg = getattr(model, "config", None)
    vocab = getattr(mcfg, "vocab_size", None)
    ids_bp, mask_bp, truncated = self.prepare(prompts, vocab)
    num_prompts = len(truncated)
    gen_len = bucket(max_new, self.gen_buckets, "max_new_tokens")
    plan, run_ids, run_mask = self._plan(ids_bp, mask_bp, num_prompts, int(n), int(top_k),
                                         gen_len, mcfg)
    eos_ids = self.eos_ids_for(mcfg)
    traces = TRACE_COUNT[0]
    t0 = time.perf_counter()
    with self._mesh_ctx():
      ids_in, mask_in = self._place(run_ids), self._place(run_mask)
      eos_e = np.full((max(8, len(eos_ids)),), -1, np.int32)
      eos_e[:len(eos_ids)] = eos_ids
      out = jitted_program()(graphdef, state, ids_in, mask_in, key, jnp.int32(max_new),
                             jnp.float32(temperature),
                             None if top_p >= 1.0 else jnp.float32(top_p), jnp.asarray(eos_e),
                             plan=plan)
      tokens, logps, lengths, eos_hit, steps, rows_end = _to_host(out)
    compiled = TRACE_COUNT[0] > traces
    if compiled:
      self.num_compiles += 1
      if self.num_compiles > 1:
        log.warning("sampler: compiled a new shape (prompts %s, shared prefix %d, gen bucket %d, "
                    "n=%d); a run should only compile a few", run_ids.shape, plan.shared,
                    gen_len, n)
    self.last_timing = {"seconds": time.perf_counter() - t0, "compiled": float(compiled),
                        "steps": float(steps), "shared_prefix": float(plan.shared),
                        "decode_rows_end": float(rows_end)}
    return self._finish(ids_bp, mask_bp, truncated, num_prompts, int(n), max_new,
                        np.asarray(tokens), np.asarray(logps), np.asarray(lengths),
                        np.asarray(eos_hit))

  def _plan(self, ids_bp, mask_bp, num_prompts: int, n: int, top_k: int, gen_len: int, mcfg):
    """(DecodePlan, prompt ids, mask) of a call: the prompts laid out for their shared prefix,
    the policy's strategies resolved for this call's rows."""
    cfg = self.config
    policy = self.policy or decode_policy.for_backend(jax.default_backend())
    compute = cfg.compute_dtype or getattr(mcfg, "compute_dtype", None) or "float32"
    scan = (policy.scan_layers if policy.scan_layers is not None
            else bool(getattr(mcfg, "scan_layers", False)))
    eos_ids = self.eos_ids_for(mcfg)
    compact = policy.compact_min_rows if eos_ids and gen_len > 1 else 0
    stages = compaction_stages(ids_bp.shape[0] * n, compact, self.data_parallel_size)
    run_ids, run_mask, shared = shared_prefix.split_prompts(
        ids_bp, mask_bp, num_prompts, cfg.shared_prefix_min, self.pad_id)
    plan = DecodePlan(
        n=n, gen_len=gen_len, top_k=top_k, pad_id=self.pad_id, compute_dtype=compute,
        prefill_dtype=policy.prefill_dtype or compute,
        cache_dtype=policy.cache_dtype or compute,
        param_dtype=compute if policy.cast_params and compute != "float32" else None,
        attention=policy.attention, scan=scan, shared=shared, stages=stages,
        weights_first=tuple(not scan and r <= policy.weights_first_rows for r in stages))
    return plan, run_ids, run_mask

  def _mesh_ctx(self):
    import contextlib
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _place(self, x: np.ndarray) -> jax.Array:
    """Rows over ("data", "fsdp"). Every process passes the same (global) prompts; each
    device takes its rows (`sharding.put_global`), so this also works on a multi-host mesh."""
    if self.mesh is None:
      return jnp.asarray(x)
    return sharding.put_global(x, sharding.batch_sharding(self.mesh, x.ndim))

  def _finish(self, ids_bp, mask_bp, truncated, num_prompts, n, max_new, tokens, logps, lengths,
              eos_hit) -> Rollouts:
    rows = num_prompts * n
    tokens, logps = tokens[:rows, :max_new].copy(), logps[:rows, :max_new].copy()
    lengths, eos_hit = lengths[:rows].copy(), eos_hit[:rows]
    reasons = [FINISH_EOS if e else FINISH_LENGTH for e in eos_hit]
    texts = [""] * rows
    tok = self.tokenizer
    for r in range(rows):
      ids = tokens[r, :lengths[r]].tolist()
      if tok is None:
        continue
      hit = find_stop(ids, self.config.stop_strings, tok) if self.config.stop_strings else None
      if hit is not None:
        lengths[r], texts[r] = hit
        reasons[r] = FINISH_STOP
      else:
        texts[r] = tok.decode(ids, skip_special_tokens=True)
    comp_mask = np.arange(max_new)[None, :] < lengths[:, None]
    tokens = np.where(comp_mask, tokens, self.pad_id).astype(np.int32)
    logps = np.where(comp_mask, logps, 0.0).astype(np.float32)
    return Rollouts(
        prompt_ids=np.repeat(ids_bp[:num_prompts], n, axis=0),
        prompt_mask=np.repeat(mask_bp[:num_prompts], n, axis=0),
        completion_ids=tokens, completion_mask=comp_mask, logprobs=logps,
        finish_reasons=reasons, texts=texts, n=n, prompt_truncated=truncated)
