"""`cqr-jax export`: a saved SFT or GRPO step to a Hugging Face folder (issue 8).

Refuses a step that does not exist (listing those that do), a run folder without a config, and
an existing output folder unless --overwrite. The run folder and the output may be gs:// URIs
(issue 32): the folder is written on process 0's local disk, then copied there. On a pod every
worker runs it (`--distributed`, as tpu_scripts/launch.sh adds): the checkpoint's shards are read
by the hosts that hold them, and process 0 alone writes.
"""

from __future__ import annotations

import logging
import os

from cqr_jax import config as cfglib
from cqr_jax import configlib, distributed, paths
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
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first (TPU pods)")


def run_config(run_dir: str) -> cfglib.RunConfig:
  path = os.path.join(run_dir, "config.yaml")
  if not paths.exists(path):
    raise FileNotFoundError(f"{run_dir} has no config.yaml: not a cqr-jax run folder (the model "
                            "config of a run is recorded there by every stage)")
  cfg = configlib.merge(cfglib.RunConfig(), configlib.load_yaml(path))
  return configlib.merge(cfg, {"run_dir": run_dir})


def run(args) -> int:
  common.setup_logging(args.run_dir if paths.isdir(args.run_dir) else None, "export")
  cfg = run_config(args.run_dir)
  out = args.out or common.stage_dir(cfg, "export", create=False)
  export_stage(cfg, args.stage, args.step, out, overwrite=args.overwrite, dtype=args.dtype,
               push_to_hub=args.push_to_hub)
  return 0


# (license, Hugging Face id) of the known initial models, for the card's front matter.
BASE_MODELS = {
    "smollm2-135m-gguf": ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "Qwen2.5-3B-Instruct": ("other", "Qwen/Qwen2.5-3B-Instruct"),
    "Llama-3.2-3B-Instruct": ("llama3.2", "meta-llama/Llama-3.2-3B-Instruct"),
}

USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{repo}"  # this folder, or its hub id
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
TEMPLATE = {template!r}

def rewrite(history, question):
  """history: [(question, answer or None), ...] before `question`."""
  lines = []
  for k, (q, a) in enumerate(history, 1):
    lines.append(f"Q{{k}}: {{q}}")
    if a is not None:
      lines.append(f"A{{k}}: {{a}}")
  prompt = TEMPLATE.replace("{{context}}", "\\n".join(lines)).replace("{{query}}", question)
  text = tok.apply_chat_template([{{"role": "user", "content": prompt}}], tokenize=False,
                                 add_generation_prompt=True){prefix}
  ids = tok(text, add_special_tokens=False, return_tensors="pt")
  out = model.generate(**ids, max_new_tokens={max_new}, do_sample=False)
  reply = {prefix_expr}tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
  return reply.split("<rewrite>")[-1].split("</rewrite>")[0].strip()

print(rewrite([("Tell me about the Eiffel Tower.", "It is a wrought-iron tower in Paris.")],
              "Who designed it?"))
```'''


def base_model(cfg: cfglib.RunConfig) -> tuple[str, str | None]:
  """(license, base model id): the known initial models, else ("other", None)."""
  src = cfg.model.source
  for k, v in BASE_MODELS.items():
    if src == k or os.path.basename(os.path.normpath(src)) == k:
      return v
  return "other", None


def model_card(cfg: cfglib.RunConfig, stage: str, step: int, table: str | None,
               repo: str = ".") -> str:
  """README.md: front matter (license, base_model), the recipe, the exact prompt, a usage
  snippet that needs transformers only, and the evaluation table."""
  from cqr_jax.data.types import Turn
  lic, base = base_model(cfg)
  front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
           f"license: {lic}"] + ([f"base_model: {base}"] if base else []) + [
           "tags:", "- cqr-jax", "- conversational-query-rewriting", "---", ""]
  builder = common.prompt_builder(cfg)
  example = Turn("card", 2, "card", "Who designed it?",
                 context=(("Tell me about the Eiffel Tower.", "It is a wrought-iron tower in Paris."),))
  prefix = cfg.sdpw.response_prefix if stage == "initial" else ""
  lines = front + [
      f"# {cfg.name}: conversational query rewriter ({stage}, step {step})", "",
      "Trained with cqr-jax, a JAX reimplementation of ConvSearch-R1 (arXiv 2505.15776): "
      "self-driven policy warm-up (SFT on the model's own rank-1 rewrites), then GRPO with the "
      "rank-incentive reward from the gold passage's retrieval rank.", "",
      f"- base model: `{base or cfg.model.source}` (license: {lic})",
      f"- data: `{cfg.data.dataset}` ({cfg.data.size}); retriever: {cfg.retrieval.kind} "
      f"({cfg.retrieval.bm25}, k1={cfg.retrieval.k1}, b={cfg.retrieval.b})",
      f"- SFT: lr {cfg.sft.lr}, {cfg.sft.epochs} epochs; GRPO: lr {cfg.grpo.lr}, "
      f"{cfg.grpo.batch_prompts} prompts x {cfg.grpo.n} samples, T {cfg.rollout.temperature}, "
      f"KL {cfg.grpo.loss.kl_estimator} coef {cfg.grpo.loss.kl_coef}", "",
      "## Prompt", "",
      "One user message (the model's chat template, generation prompt added); the answer is "
      "`<think>..</think>\\n<rewrite>..</rewrite>`. For the example conversation:", "",
      "```text", builder.text(example), "```", "",
      "## Usage (transformers only)", "",
      USAGE.format(repo=repo, template=builder.template, max_new=cfg.eval.max_new_tokens,
                   prefix=f"\n  text += {prefix!r}" if prefix else "",
                   prefix_expr=f"{prefix!r} + " if prefix else "")]
  if table:
    lines += ["", "## Evaluation", "", table]
  return "\n".join(lines) + "\n"


def export_stage(cfg: cfglib.RunConfig, stage: str, step: int | None, out: str, *,
                 overwrite: bool = False, dtype: str = "float32", table: str | None = None,
                 push_to_hub: str | None = None) -> str:
  import tempfile

  from cqr_jax.models import hf_export
  if paths.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists: pass --overwrite to replace it")
  mesh = common.make_mesh(cfg)
  step, model, mcfg = common.load_stage_policy(cfg, stage, mesh, step)
  with tempfile.TemporaryDirectory(prefix="cqr-export-") as tmp:
    local = os.path.join(tmp, "export") if paths.is_uri(out) else out
    hf_export.export_hf(model, mcfg, local, dtype=dtype,
                        tokenizer_dir=common.hf_folder_for(cfg.model.source),
                        model_card=model_card(cfg, stage, step, table, repo=push_to_hub or out),
                        overwrite=overwrite)
    if local != out and common.is_main():
      paths.rmtree(out)
      paths.copy_tree(local, out)
    log.info("exported %s step %d to %s", stage, step, out)
    if push_to_hub and common.is_main():
      hf_export.push_to_hub(local, push_to_hub)
  distributed.sync("export:written")
  return out
