"""`cqr-jax export`: a saved SFT or GRPO step to a Hugging Face folder (issue 8).

Refuses a step that does not exist (listing those that do), a run folder without a config, and
an existing output folder unless --overwrite.
"""

from __future__ import annotations

import logging
import os

from cqr_jax import config as cfglib
from cqr_jax import configlib
from train import common

log = logging.getLogger("cqr_jax")
USES_CONFIG = False


def add_args(p):
  p.add_argument("--run-dir", required=True, help="the run folder (holds config.yaml)")
  p.add_argument("--stage", default="grpo", choices=["grpo", "sft"])
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", default=None, help="output folder (default: <run>/export)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                 help="upload the folder with huggingface_hub after writing it")


def run_config(run_dir: str) -> cfglib.RunConfig:
  path = os.path.join(run_dir, "config.yaml")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{run_dir} has no config.yaml: not a cqr-jax run folder (the model "
                            "config of a run is recorded there by every stage)")
  cfg = configlib.merge(cfglib.RunConfig(), configlib.load_yaml(path))
  return configlib.merge(cfg, {"run_dir": run_dir})


def run(args) -> int:
  common.setup_logging()
  cfg = run_config(args.run_dir)
  out = args.out or common.stage_dir(cfg, "export", create=False)
  export_stage(cfg, args.stage, args.step, out, overwrite=args.overwrite, dtype=args.dtype,
               push_to_hub=args.push_to_hub)
  return 0


def model_card(cfg: cfglib.RunConfig, stage: str, step: int, table: str | None) -> str:
  lines = [
      f"# {cfg.name}: conversational query rewriter ({stage}, step {step})", "",
      "Trained with cqr-jax, a JAX reimplementation of ConvSearch-R1 (arXiv 2505.15776): "
      "self-driven policy warm-up (SFT on the model's own rank-1 rewrites), then GRPO with the "
      "rank-incentive reward from the gold passage's retrieval rank.", "",
      f"- initial model: `{cfg.model.source}`",
      f"- data: `{cfg.data.dataset}` ({cfg.data.size}); retriever: {cfg.retrieval.kind} "
      f"({cfg.retrieval.bm25}, k1={cfg.retrieval.k1}, b={cfg.retrieval.b})",
      f"- SFT: lr {cfg.sft.lr}, {cfg.sft.epochs} epochs; GRPO: lr {cfg.grpo.lr}, "
      f"{cfg.grpo.batch_prompts} prompts x {cfg.grpo.n} samples, T {cfg.rollout.temperature}, "
      f"KL {cfg.grpo.loss.kl_estimator} coef {cfg.grpo.loss.kl_coef}", "",
      "Prompt: one user message (instruction, `### Context Begin ###` Qk/Ak lines "
      "`### Context End ###`, `Query:`, `Rewrite:`); output `<think>..</think>\\n<rewrite>.."
      "</rewrite>`."]
  if table:
    lines += ["", "## Evaluation", "", table]
  return "\n".join(lines) + "\n"


def export_stage(cfg: cfglib.RunConfig, stage: str, step: int | None, out: str, *,
                 overwrite: bool = False, dtype: str = "float32", table: str | None = None,
                 push_to_hub: str | None = None) -> str:
  from cqr_jax.models import hf_export
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
  mesh = common.make_mesh(cfg)
  step, model, mcfg = common.load_stage_policy(cfg, stage, mesh, step)
  hf_export.export_hf(model, mcfg, out, dtype=dtype,
                      tokenizer_dir=common.hf_folder_for(cfg.model.source),
                      model_card=model_card(cfg, stage, step, table), overwrite=overwrite)
  log.info("exported %s step %d to %s", stage, step, out)
  if push_to_hub:
    hf_export.push_to_hub(out, push_to_hub)
  return out
