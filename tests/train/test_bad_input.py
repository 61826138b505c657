"""Bad input through the `cqr-jax` command: each case fails with exit code 2 and ONE line naming
the file or field and what to do. The table of cases is README.md's "Bad input" section
(CQR_JAX_WRITE_README=1 rewrites that section; otherwise the test checks it is current)."""

import json
import os
import re

import pytest

from cqr_jax import config as cfglib
from train import cli, common, runfolder

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
HEADING = "## Bad input"


def _generic(root, splits=(), conv=None, qrels="q\t0\td1\t1\n"):
  for d in [root] + [os.path.join(root, s) for s in splits]:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "conversations.jsonl"), "wb") as f:
      f.write(conv or (json.dumps({"conv_id": "c", "turns": [
          {"turn_id": 1, "qid": "q", "question": "Where is it?"}]}) + "\n").encode())
    with open(os.path.join(d, "qrels.tsv"), "w") as f:
      f.write(qrels)
  with open(os.path.join(root, "corpus.jsonl"), "w") as f:
    f.write(json.dumps({"id": "d1", "text": "it is here"}) + "\n")
  return root


def _run_with(tmp, name, preset="tiny", *sets, outputs=()):
  cfg = cfglib.resolve(preset, None, [f"run_dir={tmp}/{name}", *sets])
  runfolder.record(cfg)
  for s in outputs:
    os.makedirs(os.path.join(cfg.run_dir, s), exist_ok=True)
    common.save_json(os.path.join(cfg.run_dir, s, "summary.json"), {})
  return cfg.run_dir


def _corrupt_ckpt(run_dir, other_model=False):
  """Two SFT steps of a stand-in tree: arrays deleted (a half-copied folder), or intact but
  for another model."""
  import shutil
  import jax.numpy as jnp
  from cqr_jax.checkpoint import Checkpointer
  c = Checkpointer(os.path.join(run_dir, "sft", "ckpt"))
  for s in (1, 2):
    c.save(s, {"state": {"params": {"w": jnp.full((2, 2), float(s))}}}, {})
  c.wait()
  if not other_model:
    for s in ("1", "2"):
      shutil.rmtree(os.path.join(run_dir, "sft", "ckpt", s, "state"))


def cases(tmp, tiny_llama_dir):
  """(input, argv) per case; the folders they need are made here."""
  t = str(tmp)
  model = f"model.source={tiny_llama_dir}"
  flat = _generic(f"{t}/flat")
  two = _generic(f"{t}/two", ["train", "test"])
  unknown = _generic(f"{t}/unknown", ["train", "test"], qrels="q\t0\tnot-in-corpus\t1\n")
  latin1 = _generic(f"{t}/latin1", ["train", "test"],
                    conv='{"conv_id": "c", "turns": [{"turn_id": 1, "qid": "q", "question": '
                    '"Caf\xe9?"}]}\n'.encode("latin-1"))
  (tmp / "bad.gguf").write_bytes(b"not a gguf file")
  cpu = _run_with(t, "cpu", "cpu-default", outputs=("sdpw",))
  evald = _run_with(t, "evald", "tiny", model, outputs=("eval/grpo",))
  nosft = _run_with(t, "nosft", "tiny", model, "mesh.fsdp=1", outputs=("sdpw",))
  corrupt = _run_with(t, "corrupt", "tiny", model, "mesh.fsdp=1", outputs=("sdpw",))
  _corrupt_ckpt(corrupt)
  other = _run_with(t, "other", "tiny", model, "mesh.fsdp=1", outputs=("sdpw",))
  _corrupt_ckpt(other, other_model=True)
  fresh = f"{t}/fresh"  # (each case gets its own: a failed command may record its config)
  return [
      ("a fraction for an integer field", ["sdpw", "--run-dir", fresh, "--set", "grpo.steps=1.5"]),
      ("a misspelt field", ["sdpw", "--run-dir", fresh, "--set", "grpo.nn=3"]),
      ("an unknown query form", ["sdpw", "--run-dir", fresh, "--set", "retrieval.query=rewritten"]),
      ("an unknown preset", ["sdpw", "--run-dir", fresh, "--preset", "tinyy"]),
      ("another preset on a run with outputs", ["sdpw", "--run-dir", cpu, "--preset", "tiny"]),
      ("evaluating over an earlier evaluation", ["evaluate", "--run-dir", evald, "--stage", "grpo"]),
      ("an unwritable run folder", ["sdpw", "--run-dir", "/proc/x"]),
      ("`--conversation` that is not JSON", ["rewrite", "--conversation", "not json"]),
      ("`--conversation` of the wrong shape", ["rewrite", "--conversation", '{"q": 1}']),
      ("a data folder with one split at its root", ["sdpw", "--run-dir", fresh, "--set",
                                                     f"data.dataset={flat}"]),
      ("a misspelt split name", ["sdpw", "--run-dir", fresh, "--set", f"data.dataset={two}",
                                 "--set", "data.train_split=trian"]),
      ("train split = test split", ["sdpw", "--run-dir", fresh, "--set", f"data.dataset={two}",
                                    "--set", "data.test_split=train"]),
      ("qrels naming passages not in the corpus", ["sdpw", "--run-dir", fresh, "--set",
                                                   f"data.dataset={unknown}"]),
      ("a Latin-1 conversations file", ["sdpw", "--run-dir", fresh, "--set",
                                        f"data.dataset={latin1}"]),
      ("a file that is not GGUF as the model", ["sdpw", "--run-dir", fresh, "--set",
                                                f"model.source={tmp / 'bad.gguf'}"]),
      ("GRPO after SDPW without SFT", ["grpo", "--run-dir", nosft]),
      ("a stage whose checkpoint is missing", ["evaluate", "--run-dir", nosft, "--stage", "sft"]),
      ("every checkpoint step unreadable", ["export", "--run-dir", corrupt, "--stage", "sft"]),
      ("a checkpoint of another model", ["export", "--run-dir", other, "--stage", "sft"]),
  ]


def _clean(text, tmp, model_dir):
  text = text.replace(str(model_dir), "<tiny-llama>").replace(str(tmp), "<tmp>")
  text = re.sub(r"<tmp>/fresh\d+", "<tmp>/run", text)
  return re.sub(r"\b[0-9a-f]{32}\b", "<hash>", text)


def table(tmp, tiny_llama_dir, capsys) -> str:
  rows = ["| input | command | message (stderr, exit code 2) |", "|---|---|---|"]
  for i, (what, argv) in enumerate(cases(tmp, tiny_llama_dir)):
    argv = [f"{a}{i}" if a == f"{tmp}/fresh" else a for a in argv]
    capsys.readouterr()
    rc = cli.main(list(argv))
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("cqr-jax ")]
    assert rc == 2 and len(err) == 1, (what, rc, err)
    msg = err[0].split(": error: ", 1)[1].replace(" (--debug shows the traceback)", "")
    cmd = "cqr-jax " + " ".join(a if " " not in a and a else repr(a) for a in argv)
    cell = lambda s: _clean(s, tmp, tiny_llama_dir).replace("|", "\\|")  # noqa: E731
    rows.append(f"| {what} | `{cell(cmd)}` | {cell(msg)} |")
  return "\n".join(rows)


def _section(body: str) -> str:
  return (f"{HEADING}\n\nEach case fails with exit code 2 and one line on stderr (`--debug` adds "
          "the traceback). Generated by `tests/train/test_bad_input.py` "
          "(`CQR_JAX_WRITE_README=1` refreshes it).\n\n" + body + "\n")


def test_bad_input_table(tmp_path, tiny_llama_dir, capsys):
  section = _section(table(tmp_path, tiny_llama_dir, capsys))
  text = open(README, encoding="utf-8").read()
  m = re.search(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", text, re.S | re.M)
  if os.environ.get("CQR_JAX_WRITE_README") == "1":
    new = (text[:m.start()] + section + ("\n" if text[m.end():] else "") + text[m.end():] if m
           else text.rstrip("\n") + "\n\n" + section)
    with open(README, "w", encoding="utf-8") as f:
      f.write(new)
    return
  if m is None:
    pytest.fail("README.md has no 'Bad input' section: run with CQR_JAX_WRITE_README=1")
  assert m.group(0).rstrip("\n") == section.rstrip("\n"), \
      "README.md's Bad input table is stale: run with CQR_JAX_WRITE_README=1"
