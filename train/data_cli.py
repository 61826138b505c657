"""`cqr-jax data`: write the embedded benchmark to a folder and report its BM25 gaps."""

from __future__ import annotations

import json

from train import common

USES_CONFIG = True


def add_args(p):
  common.stage_args(p)
  p.add_argument("--write", default=None, metavar="DIR",
                 help="write the embedded benchmark in the generic layout to DIR")


def run(args) -> int:
  cfg = common.config_from_args(args)
  if args.write:
    from cqr_jax.data.synthetic import write_synthetic
    write_synthetic(args.write, size=cfg.data.size, seed=cfg.data.seed)
    print(f"wrote the {cfg.data.size} benchmark (seed {cfg.data.seed}) to {args.write}")
  from train.data_report import gap_report
  ds = common.load_split(cfg, cfg.data.test_split)
  print(json.dumps(gap_report(ds), indent=2))
  return 0
