"""Minutes of this CPU until the trained rewriter first beats the raw question (issue 31).

Runs `cqr-jax pipeline` (or reads a finished run folder), then evaluates every kept GRPO
checkpoint that the pipeline did not, on the test turns, with the evaluation's fallback and its
paired bootstrap against the raw question. Each point's wall time is the pipeline's own clock:
zero-shot evaluation excluded, SDPW + SFT, then GRPO's per-step time up to that checkpoint (the
evaluations run after training are not counted). Writes a markdown table and a PNG curve of test
MRR against wall minutes, with the raw question and the best concatenation baseline as lines.

    python bench/bench_learning_curve.py --run-dir runs/curve --set grpo.save_every=2 \
        --set grpo.keep_checkpoints=12 --out bench/results/learning_curve.md

The pipeline runs with `--keep-optimizer`, so GRPO keeps every checkpoint that
`grpo.keep_checkpoints` allows rather than only its final parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _pipeline(args) -> None:
  if os.path.exists(os.path.join(args.run_dir, "report", "metrics.json")):
    return
  cmd = [sys.executable, "-m", "train.cli", "pipeline", "--preset", args.preset,
         "--run-dir", args.run_dir, "--skip-export", "--keep-optimizer"]
  for s in args.set:
    cmd += ["--set", s]
  subprocess.run(cmd, check=True, cwd=REPO)


def _grpo_clock(run_dir: str) -> dict[int, float]:
  """{step: seconds of GRPO up to and including that step} from grpo/metrics.jsonl."""
  out, total = {}, 0.0
  with open(os.path.join(run_dir, "grpo", "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      m = json.loads(line)
      total += m.get("time/total", 0.0)
      out[int(m["step"])] = total
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--run-dir", default="runs/learning_curve")
  ap.add_argument("--preset", default="cpu-default")
  ap.add_argument("--set", action="append", default=[], help="config overrides (as the CLI)")
  ap.add_argument("--out", default="bench/results/learning_curve.md")
  args = ap.parse_args(argv)
  _pipeline(args)

  import jax
  from cqr_jax import config as cfglib
  from cqr_jax.checkpoint import Checkpointer
  from train import common, evaluate

  cfg = cfglib.resolve(args.preset, None, [f"run_dir={args.run_dir}", *args.set])
  report = common.load_json(os.path.join(args.run_dir, "report", "metrics.json"))
  rows = {r["system"]: r for r in report["rows"]}
  t = report["timings_s"]
  before_grpo = t["self-distillation (SDPW)"] + t["SFT"]
  clock = _grpo_clock(args.run_dir)
  points = [("zero_shot", 0.0, rows["zero_shot"]), ("sft", before_grpo, rows["sft"])]
  steps = Checkpointer(common.ckpt_dir(cfg, "grpo")).all_steps()
  mesh = common.make_mesh(cfg)
  for step in steps:
    name = f"grpo@{step}"
    if step == max(steps) and "grpo" in rows:
      row = rows["grpo"]
    else:
      _, model, mcfg = common.load_stage_policy(cfg, "grpo", mesh, step)
      out = os.path.join(args.run_dir, "eval", name.replace("@", "_step"))
      row = evaluate.evaluate_policy(cfg, model, mcfg, mesh, name, out)[0]
      del model
      jax.clear_caches()
    points.append((name, before_grpo + clock.get(step, 0.0), row))
  base = [r for n, r in rows.items() if n.startswith("baseline:")]
  evaluate.add_bootstrap([p[2] for p in points] + base, cfg)
  raw = rows["baseline:raw"]["recip_rank"]
  concat = max((r for r in base if r["system"].endswith("_question")),
               key=lambda r: r["recip_rank"])
  first_win = next((p for p in points if p[2]["mrr_delta_lo"] > 0), None)

  lines = [f"# Test MRR against CPU wall time ({cfg.name})", "",
           f"Command: `python bench/bench_learning_curve.py {shlex.join(sys.argv[1:])}`  ",
           f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
           f"{report['rows'][0]['queries']} test turns; raw question MRR {raw:.3f}, best "
           f"concatenation ({concat['system']}) {concat['recip_rank']:.3f}.", "",
           "| point | wall minutes (SDPW + SFT + GRPO) | test MRR | Δ vs raw [95% CI] |",
           "|---|---|---|---|"]
  for name, secs, r in points:
    lines.append(f"| {name} | {secs / 60:.1f} | {r['recip_rank']:.3f} | {r['mrr_delta']:+.3f} "
                 f"[{r['mrr_delta_lo']:+.3f}, {r['mrr_delta_hi']:+.3f}] |")
  lines += ["", "First point whose interval lies above the raw question: " +
            (f"{first_win[0]} at {first_win[1] / 60:.1f} min" if first_win else "none")]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.6))
  xs = [p[1] / 60 for p in points]
  ax.errorbar(xs, [p[2]["recip_rank"] for p in points], marker="o", label="rewriter",
              yerr=[[p[2]["mrr_delta"] - p[2]["mrr_delta_lo"] for p in points],
                    [p[2]["mrr_delta_hi"] - p[2]["mrr_delta"] for p in points]])
  ax.axhline(raw, color="gray", ls="--", label="raw question")
  ax.axhline(concat["recip_rank"], color="gray", ls=":", label=concat["system"])
  ax.set_xlabel("CPU wall minutes of training (SDPW + SFT + GRPO)")
  ax.set_ylabel("test MRR")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
