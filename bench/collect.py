"""Collects bench/results/*.md into BENCHMARKS.md (the summary table stays at the top)."""

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ["forward", "sampler", "sampler_avx2", "sampler_weights_first_avx2",
         "sampler_shared_prefix_avx2", "sampler_session16_avx2",
         "update", "update_avx2", "grpo_step",
         "grpo_step_avx2", "grpo_step_shared_prefix_avx2", "grpo_step_packed_prefix_avx2",
         "grpo_step_session16_avx2", "grpo_step_session17_avx2",
         "grpo_step_session18_avx2", "grpo_step_session19_avx2", "rollout_compaction_avx2",
         "sft_update_prefix_avx2", "sampler_cpu_default_dtype", "learning_curve",
         "learning_curve_mtrag", "eval_buckets",
         "cpu_default_recipe", "compile", "bm25", "dense", "export", "data", "memory_plan"]
SKIP = ("history",)  # bench/results/history.md: the record of past runs, not collected


def main() -> None:
  res = os.path.join(HERE, "results")
  out_path = os.path.join(HERE, "..", "BENCHMARKS.md")
  head = open(os.path.join(res, "_summary.md")).read() if os.path.exists(
      os.path.join(res, "_summary.md")) else "# Benchmarks\n"
  names = [n for n in ORDER if os.path.exists(os.path.join(res, f"{n}.md"))]
  names += sorted(f[:-3] for f in os.listdir(res) if f.endswith(".md") and f[:-3] not in names
                  and not f.startswith("_") and f[:-3] not in SKIP)
  parts = [head.rstrip() + "\n"]
  for n in names:
    text = open(os.path.join(res, f"{n}.md")).read().strip()
    parts.append("\n---\n\n" + text.replace("\n# ", "\n## ").replace("\n## ", "\n### ", 0) + "\n")
  with open(out_path, "w") as f:
    f.write("".join(parts))


if __name__ == "__main__":
  main()
