"""The paper presets at the edges of the official recipe (issue 34): over-long prompts (GRPO
drops them, SDPW and evaluation never cut one), the keep/score rule of SDPW and evaluation, the
KL reference, and SFT examples over sft.max_len."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqr_jax import config as cfglib
from cqr_jax import shared_prefix, sharding
from cqr_jax.data.types import Turn
from cqr_jax.models.config import ModelConfig
from cqr_jax.parsing import parse_response
from cqr_jax.prompts import PromptBuilder
from cqr_jax.testing import tiny_tokenizer
from train import common, evaluate, grpo, rewriting, sdpw, sft
from train.rewriting import Rewrite

LONG = Turn("c", 9, "long", "And after that?", context=tuple(
    (f"What happened in year {i} of the war?", f"Many battles took place in year {i}.")
    for i in range(1, 9)), gold_ids=("d",))
SHORT = Turn("c", 1, "short", "Where is Varnholt Castle?", gold_ids=("d",))


def tiny_cfg(tmp_path, *sets):
  return cfglib.resolve("tiny", None, [f"run_dir={tmp_path / 'run'}", *sets])


def _rewrite(i, text, sample=0):
  return Rewrite(turn_index=i, sample=sample, text=text, parsed=parse_response(text),
                 finish_reason="stop", num_tokens=5)


# ------------------------------------------------------------------- 1. over-long prompts
def test_grpo_drops_overlong_prompts_and_says_how_many(tmp_path, caplog):
  tok, pb = tiny_tokenizer("chatml"), PromptBuilder()
  short, long = (len(pb.token_ids(t, tok)) for t in (SHORT, LONG))
  assert short < long
  cfg = tiny_cfg(tmp_path, f"rollout.max_prompt_len={long - 1}", "grpo.batch_prompts=1")
  with caplog.at_level("WARNING", logger="cqr_jax"):
    kept = grpo.training_turns(cfg, [LONG, SHORT, LONG], pb, tok)
  assert kept == [SHORT]
  assert f"dropped 2 of 3 training prompts longer than rollout.max_prompt_len={long - 1}" in (
      caplog.text)


def test_sdpw_and_evaluation_never_cut_a_prompt(tmp_path):
  """A prompt over rollout.max_prompt_len stops a sampler built at that length; the stages'
  sampler (inference_prompt_len) grows its largest bucket and rewrites it."""
  tok, pb = tiny_tokenizer("chatml"), PromptBuilder()
  short, long = (len(pb.token_ids(t, tok)) for t in (SHORT, LONG))
  cap = short + 8
  cfg = tiny_cfg(tmp_path, f"rollout.max_prompt_len={cap}", f"rollout.prompt_buckets=[{cap}]")
  assert long > cap
  mesh = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
  mcfg = ModelConfig(family="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id)
  model = sharding.create_model(mcfg, mesh, seed=0)
  kw = dict(n=1, temperature=0.0, max_new_tokens=2)
  capped = rewriting.make_sampler(cfg, tok, mesh, mcfg, **kw)
  with pytest.raises(ValueError, match=f"max_prompt_len={cap}"):
    capped.generate(model, [pb.token_ids(LONG, tok)], key=jax.random.key(0), n=1)
  grown = rewriting.inference_prompt_len(cfg, pb, tok, [SHORT, LONG], "<think>")
  assert grown == long + len(tok("<think>", add_special_tokens=False)["input_ids"])
  assert rewriting.inference_prompt_len(cfg, pb, tok, [SHORT]) == cap  # fits: unchanged
  sampler = rewriting.make_sampler(cfg, tok, mesh, mcfg, max_prompt_len=grown, **kw)
  out = [r for _, rs, _ in rewriting.rewrite_batches(
      model, sampler, tok, pb, [LONG, SHORT], key=jax.random.key(0), n=1, batch_prompts=2,
      temperature=0.0, response_prefix="<think>") for r in rs]
  assert [r.turn_index for r in out] == [0, 1] and all(r.num_tokens >= 1 for r in out)


# -------------------------------------------------------------- 2. keep and score rules
def test_paper_rule_counts_blocks_anywhere_the_strict_rule_does_not():
  loose = "<think> it is the castle </think>\n\n<rewrite> Varnholt Castle location </rewrite>"
  turns = [SHORT]
  queries, parsed = evaluate.policy_queries(turns, [_rewrite(0, loose)], "question", "tags")
  assert queries == {"short": " Varnholt Castle location "} and parsed.tolist() == [True]
  queries, parsed = evaluate.policy_queries(turns, [_rewrite(0, loose)], "question", "format")
  assert queries == {"short": SHORT.question} and parsed.tolist() == [False]
  assert cfglib.resolve("qwen2.5-3b-qrecc-ance").eval.score_rule == "tags"
  assert cfglib.RunConfig().eval.score_rule == "tags"


@pytest.mark.parametrize("rule,kept", [("tags", True), ("format", False)])
def test_sdpw_keep_rule(tmp_path, rule, kept):
  """An output whose blocks are apart (two newlines, text after) is kept under the official rule,
  with the first think and rewrite groups as the SFT target; the strict rule drops it."""
  cfg = tiny_cfg(tmp_path)
  ds = common.load_split(cfg, "train")
  ranker = common.build_ranker(cfg, ds, 1024)
  turns = [t for t in ds.turns if t.context][:1]
  oracle = turns[0].rewrites["oracle"]
  text = f"<think> resolve it </think>\n\n<rewrite> {oracle} </rewrite> and more text"
  with open(tmp_path / "data", "w") as fdata, open(tmp_path / "done", "w") as fdone:
    sdpw._filter_and_write([_rewrite(0, text)], turns, ranker, PromptBuilder(), 1, fdata, fdone,
                           keep_rule=rule)
  data = [json.loads(x) for x in open(tmp_path / "data")]
  done = [json.loads(x) for x in open(tmp_path / "done")]
  assert done[0]["kept"] is kept and done[0]["reasons"] == ([] if kept else ["format"])
  if kept:
    assert (data[0]["reasoning"], data[0]["rewrite"]) == (" resolve it ", f" {oracle} ")


# ------------------------------------------------------------------------- 3. KL reference
def test_kl_reference_follows_grpo_reference(tmp_path, caplog):
  from cqr_jax.checkpoint import Checkpointer
  initial, sft_p = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  ref = lambda r, s, init="auto": grpo.reference_params(  # noqa: E731
      tiny_cfg(tmp_path, f"grpo.reference={r}"), initial, s, init)
  assert ref("sft", sft_p) is sft_p and ref("init", sft_p) is initial
  with caplog.at_level("WARNING", logger="cqr_jax"):
    assert ref("sft", None) is initial  # no SFT checkpoint: the RL-only ablation
  assert "no SFT checkpoint" in caplog.text
  # The policy starts from the initial model, the KL still goes to the SFT checkpoint.
  with Checkpointer(common.ckpt_dir(tiny_cfg(tmp_path), "sft")) as ck:
    ck.save(4, {"state": {"params": {"w": jnp.full(3, 2.0)}}}, force=True)
  np.testing.assert_array_equal(ref("sft", None, "initial")["w"], [2.0, 2.0, 2.0])
  assert ref("init", None, "initial") is initial
  with pytest.raises(ValueError, match="grpo.reference='base'"):
    ref("base", None)


# ---------------------------------------------------------------------- 7. SFT over max_len
def _records():
  short = {"prompt": "Query: a?\nRewrite:", "reasoning": " r ", "rewrite": " a "}
  long = {"prompt": "Query: " + "word " * 60 + "?\nRewrite:", "reasoning": " r ",
          "rewrite": " the long one "}
  return [short, long, short]


@pytest.mark.parametrize("rule", ["error", "truncate_right", "drop"])
def test_sft_overlong_examples(tmp_path, rule):
  tok = tiny_tokenizer("chatml")
  full = [sft.encode_example(r, tok) for r in _records()]
  max_len = len(full[1][0]) - 5  # the long example's prompt fits, its response does not all
  assert len(full[0][0]) <= max_len and full[1][1].index(1) < max_len
  cfg = tiny_cfg(tmp_path, f"sft.max_len={max_len}", f"sft.overlong={rule}")
  out = str(tmp_path / "sft")
  if rule == "error":
    with pytest.raises(sft.OverlongExampleError, match=r"1 of 3 SFT examples are longer than "
                       rf"sft.max_len={max_len} tokens \(longest {max_len + 5}\)"):
      sft.prepare_examples(cfg, _records(), tok, out)
    return
  examples = sft.prepare_examples(cfg, _records(), tok, out)
  with open(os.path.join(out, sft.SUMMARY_FILE)) as f:
    summary = json.load(f)
  assert summary["overlong"] == 1 and summary["records"] == 3
  if rule == "drop":
    assert examples == [full[0], full[2]] and summary["dropped"] == 1
  else:  # verl's truncation="right": the first max_len tokens, the loss mask cut with them
    assert examples[1] == (full[1][0][:max_len], full[1][1][:max_len])
    assert summary["truncated"] == 1 and summary["examples"] == 3


def test_shared_prefix_with_a_fully_truncated_response():
  """A right truncation may cut a whole response: the common-prefix search still works."""
  examples = [([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), ([1, 2, 3, 9], [0, 0, 0, 0])]
  assert shared_prefix.for_examples(examples, 1) == 0  # 3 tokens < one multiple of 16
