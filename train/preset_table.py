"""The paper presets' effective settings beside method.md's values: docs/paper_presets.md.

`python -m train.preset_table` rewrites the file from `cqr_jax.config` (each preset resolved as a
run would resolve it); tests/train/test_preset_table.py checks that the committed file equals
`render()`, so it cannot go stale. A row's method.md value is a constant, or one per dataset or
retriever; "=" marks a row where every preset of the table has it.
"""

from __future__ import annotations

import argparse
import os

from cqr_jax import config as cfglib
from cqr_jax import configlib

OUT = os.path.join(os.path.dirname(__file__), "..", "docs", "paper_presets.md")
BACKBONES = ("qwen2.5-3b", "llama3.2-3b")
RETRIEVERS = ("bm25", "ance")
DATASETS = {"topiocqa": "TopiOCQA", "qrecc": "QReCC"}
SHOWN = object()  # a row shown without a method.md value to compare with

# (config field, method.md value: a constant, {dataset or retriever: value} or SHOWN, section,
# note). Notes say where the meaning differs from the official code's.
ROWS = [
    ("model.source", SHOWN, "1.1", "local HF folder of the instruct model"),
    ("model.param_dtype", "float32", "4.5", ""),
    ("model.compute_dtype", "bfloat16", "4.5", ""),
    ("data.test_split", {"topiocqa": "dev", "qrecc": "test"}, "1.2-1.3", ""),
    ("retrieval.kind", {"bm25": "bm25", "ance": "dense"}, "4.3", ""),
    ("retrieval.k1", {"topiocqa": 0.9, "qrecc": 0.82}, "4.2", ""),
    ("retrieval.b", {"topiocqa": 0.4, "qrecc": 0.68}, "4.2", ""),
    ("retrieval.top_k", 100, "4.1, 5.2", ""),
    ("retrieval.reward_max_words", 1024, "4.2", ""),
    ("retrieval.eval_max_words", 512, "5.2", ""),
    ("rollout.max_context_tokens", 0, "2.2", "0 = every previous turn"),
    ("rollout.max_prompt_len", 1536, "4.4",
     "GRPO drops longer prompts; SDPW and evaluation have no cap"),
    ("rollout.max_new_tokens", 1024, "4.4", ""),
    ("rollout.temperature", 0.7, "4.4", ""),
    ("rollout.top_p", 1.0, "4.4", ""),
    ("rollout.top_k", 0, "4.4", "0 = none"),
    ("sdpw.few_shot", True, "2.5, 7.1", "the paper; the repo samples zero-shot"),
    ("sdpw.samples_per_turn", 1, "3.1", ""),
    ("sdpw.temperature", 0.7, "3.1", ""),
    ("sdpw.max_new_tokens", 4096, "3.1", ""),
    ("sdpw.keep_rule", "tags", "3.1", "think and rewrite blocks anywhere"),
    ("sdpw.rank_threshold", 1, "3.2", ""),
    ("sdpw.lenient_candidates", False, "-", "a CPU-preset bootstrap"),
    ("sdpw.response_prefix", "", "-", ""),
    ("sft.batch_size", 64, "3.4", ""),
    ("sft.micro_batch", 8, "3.4", ""),
    ("sft.max_len", 3072, "3.4", ""),
    ("sft.overlong", {"topiocqa": "error", "qrecc": "truncate_right"}, "3.4", ""),
    ("sft.epochs", 2, "3.4", ""),
    ("sft.lr", 1e-5, "3.4", ""),
    ("sft.b1", 0.9, "3.4", ""),
    ("sft.b2", 0.95, "3.4", ""),
    ("sft.weight_decay", 0.01, "3.4", ""),
    ("sft.warmup_ratio", 0.1, "3.4", ""),
    ("sft.clip_norm", 1.0, "3.4", ""),
    ("sft.seed", 1, "3.4", ""),
    ("sft.train_top_layers", 0, "3.4", "0 = every layer"),
    ("grpo.batch_prompts", 128, "4.4", ""),
    ("grpo.n", 8, "4.4, 7.1", "the paper; the TopiOCQA script used 16"),
    ("grpo.epochs", {"topiocqa": 6, "qrecc": 9}, "4.4", ""),
    ("grpo.lr", 1e-6, "4.4", ""),
    ("grpo.warmup_steps", 100, "4.8", ""),
    ("grpo.b1", 0.9, "4.8", ""),
    ("grpo.b2", 0.999, "4.8", ""),
    ("grpo.weight_decay", 0.01, "4.8", ""),
    ("grpo.clip_norm", 1.0, "4.4", ""),
    ("grpo.micro_batch", 8, "4.4, 4.7",
     "verl: per GPU; here per compute micro-batch over the mesh (no effect on the loss)"),
    ("grpo.loss.aggregation", "token_mean", "4.7", ""),
    ("grpo.loss.token_mean_seqs", 8, "4.7", "token mean over blocks of 8 sequences"),
    ("grpo.loss.policy_loss", "ppo_clip", "4.7", ""),
    ("grpo.loss.clip_eps", 0.2, "4.4", ""),
    ("grpo.loss.kl_coef", 0.001, "4.4", ""),
    ("grpo.loss.kl_estimator", "k3", "4.7", "low_var_kl"),
    ("grpo.loss.entropy_coef", 0.001, "4.4", ""),
    ("grpo.reward.kind", "rirs", "4.1", ""),
    ("grpo.reward.format_penalty", -0.1, "4.1", ""),
    ("grpo.reward.top_k", 100, "4.1", ""),
    ("grpo.reference", "sft", "4.5, 7.5", ""),
    ("grpo.turns", "all", "4.9", ""),
    ("grpo.save_every", 100, "4.4", ""),
    ("grpo.seed", 1, "4.8", ""),
    ("eval.greedy", False, "5.1", ""),
    ("eval.temperature", 0.7, "5.1", ""),
    ("eval.max_new_tokens", 4096, "5.1", ""),
    ("eval.seeds", SHOWN, "5.1, 7.3", "one sample per query and seed"),
    ("eval.score_rule", "tags", "5.1", "think and rewrite blocks anywhere"),
    ("eval.fallback", SHOWN, "5.4",
     "the paper's averages are the table's \"scored only\" column"),
    ("eval.relevance_level", 1, "5.4", ""),
]


def preset_names(dataset: str) -> list[str]:
  return [f"{b}-{dataset}-{r}" for b in BACKBONES for r in RETRIEVERS]


def field(cfg, path: str):
  for part in path.split("."):
    cfg = getattr(cfg, part)
  return configlib.to_dict(cfg)


def _fmt(v) -> str:
  if v is SHOWN:
    return ""
  if isinstance(v, str):
    return f"`{v}`" if v else '`""`'
  if isinstance(v, (list, tuple)):
    return "(" + ", ".join(_fmt(x) for x in v) + ")"
  return f"`{v:g}`" if isinstance(v, float) else f"`{v}`"


def _method_value(want, name: str, dataset: str):
  if isinstance(want, dict):
    retriever = name.rsplit("-", 1)[1]
    return want[dataset] if dataset in want else want[retriever]
  return want


def table(dataset: str) -> list[str]:
  names = preset_names(dataset)
  cfgs = [cfglib.resolve(n) for n in names]
  head = ["setting", "method.md", "§", *names, "=", "note"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for path, want, section, note in ROWS:
    got = [field(c, path) for c in cfgs]
    wants = [_method_value(want, n, dataset) for n in names]
    shown = sorted({_fmt(w) for w in wants})
    same = "" if want is SHOWN else ("yes" if got == wants else "NO")
    lines.append("| " + " | ".join([f"`{path}`", " / ".join(shown), section,
                                    *map(_fmt, got), same, note]) + " |")
  return lines


def render() -> str:
  out = ["# Paper presets: effective settings beside method.md", "",
         "Generated by `python -m train.preset_table` from `cqr_jax/config.py` (do not edit; "
         "tests/train/test_preset_table.py checks it is current). Each column is a preset as "
         "`cqr-jax --preset NAME` resolves it; \"method.md\" is the value of the paper or the "
         "official scripts in that section of /work/shared/docs/method.md; \"=\" says whether "
         "every preset of the table has it.", ""]
  for ds, title in DATASETS.items():
    out += [f"## {title}", "", *table(ds), ""]
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=OUT)
  p.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
  args = p.parse_args(argv)
  text = render()
  if args.check:
    with open(args.out, encoding="utf-8") as f:
      return 0 if f.read() == text else 1
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
