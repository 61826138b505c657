"""`cqr-jax data`: write the configured dataset to a folder and report its retrieval gaps."""

from __future__ import annotations

import dataclasses
import json

from train import common

USES_CONFIG = True


def add_args(p):
  common.stage_args(p)
  p.add_argument("--json", default=None, metavar="FILE",
                 help="also write the report (per-turn ranks included) as JSON to FILE")
  p.add_argument("--write", default=None, metavar="DIR",
                 help="write the configured dataset's train and test splits (all turns) in the "
                      "generic layout to DIR (the embedded benchmark: as write_synthetic does)")


def write_dataset(cfg, out_dir: str) -> str:
  """The configured dataset's train and test splits, uncapped, in the generic layout."""
  d = cfg.data
  if d.dataset == "synthetic":
    from cqr_jax.data.synthetic import write_synthetic
    write_synthetic(out_dir, size=d.size, seed=d.seed)
    return f"the {d.size} benchmark (seed {d.seed})"
  from cqr_jax.data import load_dataset
  from cqr_jax.data.generic_writer import write_generic
  splits = {s: load_dataset(d.dataset, s) for s in dict.fromkeys((d.train_split, d.test_split))}
  write_generic(out_dir, splits)
  return f"{d.dataset} ({', '.join(f'{s}: {len(ds)} turns' for s, ds in splits.items())})"


def run(args) -> int:
  cfg = common.config_from_args(args)
  if args.write:
    print(f"wrote {write_dataset(cfg, args.write)} to {args.write}")
  from train.data_report import format_report, gap_report
  ds = common.load_split(cfg, cfg.data.test_split)
  # The report is BM25's: the configured one (within domains as configured), even for dense runs.
  r = dataclasses.replace(cfg.retrieval, kind="bm25")
  ranker = common.build_ranker(dataclasses.replace(cfg, retrieval=r), ds, r.eval_max_words)
  rep = gap_report(ds, kind=r.bm25, k1=r.k1, b=r.b, ranker=ranker)
  print(format_report(rep))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rep, f, indent=1)
  return 0
