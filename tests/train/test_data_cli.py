"""`cqr-jax data --write` under every preset whose data ships with the package, read back."""

import json

import pytest

from cqr_jax import config as cfglib
from cqr_jax.data import load_dataset
from train import cli, common

OFFLINE_PRESETS = ("cpu-default", "tiny", "cpu-mtrag")


@pytest.mark.parametrize("preset", OFFLINE_PRESETS)
def test_data_write_reads_back(preset, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("CQR_JAX_XLA_CACHE", "off")
  out = tmp_path / "data"
  assert cli.main(["data", "--preset", preset, "--write", str(out), "--json",
                   str(tmp_path / "report.json"), "--run-dir", str(tmp_path / "run")]) == 0
  printed = capsys.readouterr().out
  assert "| raw |" in printed and "best concatenation" in printed  # the gaps, as a table
  report = json.loads((tmp_path / "report.json").read_text())
  cfg = cfglib.resolve(preset)
  d = cfg.data
  for split in (d.train_split, d.test_split):
    back = load_dataset(str(out), split, strict=True)
    want = load_dataset(d.dataset, split, **({"size": d.size, "seed": d.seed}
                                             if d.dataset == "synthetic" else {}))
    key = lambda t: t.qid  # noqa: E731
    fields = lambda t: (t.qid, t.question, t.context, t.gold_ids, t.domain)  # noqa: E731
    assert [fields(t) for t in sorted(back.turns, key=key)] == [
        fields(t) for t in sorted(want.turns, key=key)]
    assert back.qrels == want.qrels and len(back.collection) == len(want.collection)
  test = common.load_split(cfg, d.test_split)
  assert report["turns"] == len(test) > 0
  assert report["retriever"]["within_domain"] == (preset == "cpu-mtrag")
  if "by_phenomenon" in report:  # only the kinds of the kept turns, each with its count
    assert sum(v["turns"] for v in report["by_phenomenon"].values()) == len(test)
