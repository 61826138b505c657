"""How much rewriting matters on a dataset: BM25 metrics of query baselines (issue 5).

Baselines per scored turn: those of the evaluation (train/evaluate.py: the raw question; the
previous, the first or all previous questions + the question), and every rewrite the data
provides (the embedded benchmark's `oracle`, MTRAG's `provided`, QReCC's `human`). Metrics as the paper reports them
(method.md 5.4): MRR over the top-100 ("MRR@3" in its tables), NDCG@3, R@10, R@100.

    python -m train.data_report synthetic            # the embedded benchmark, test split
    python -m train.data_report ../shared/data/mtrag/mtrag_un --split test
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from cqr_jax.data.dataset import Dataset, load_dataset
from cqr_jax.data.types import Turn

REPORT_METRICS = ("recip_rank", "ndcg_cut_3", "recall_10", "recall_100")


def baseline_queries(turns: Sequence[Turn]) -> dict[str, list[str | None]]:
  """{baseline name: one query per turn}: the evaluation's baselines (train/evaluate.py), a
  provided rewrite `name` as `rewrite_<name>`; a rewrite missing on a turn gives None."""
  from train.evaluate import baseline_queries as by_qid
  return {name.replace(":", "_"): [q.get(t.qid) for t in turns]
          for name, q in by_qid(turns).items()}


def gap_report(dataset: Dataset, kind: str = "lucene", k1: float | None = None,
               b: float | None = None, k: int = 100, searcher: Any = None,
               show_progress: bool = False, ranker: Any = None) -> dict[str, Any]:
  """BM25 metrics of each baseline over the dataset's scored turns.

  Returns {"dataset", "split", "turns", "retriever", "metrics": {baseline: {metric: mean}},
  "ranks": {baseline: [rank per turn, -1 = not in top k]}, and for the embedded benchmark
  "by_phenomenon": {phenomenon: {baseline: MRR, "turns": count}} over the phenomena of the scored
  turns}. A turn without a query for a baseline (a missing provided rewrite) is scored as a miss.
  `ranker`: a GoldRanker to use instead of building one (kind/k1/b/k then only describe it); with
  one searcher per domain each turn is searched in its own domain.
  """
  from retrieval.bm25 import build_bm25
  from retrieval.gold_rank import GoldRanker
  from retrieval.metrics import evaluate, mean_metrics

  turns = [t for t in dataset.turns if t.qid in dataset.qrels]
  if ranker is None:
    if searcher is None:
      searcher = build_bm25(dataset.collection, kind=kind, k1=k1, b=b,
                            show_progress=show_progress)
    ranker = GoldRanker(searcher, dataset.qrels, k=k, max_query_words=512)
  per_domain = getattr(ranker, "searchers", None) is not None
  domains = [t.domain for t in turns] if per_domain else None
  qids = [t.qid for t in turns]
  qrels = {q: dataset.qrels[q] for q in qids}
  metrics, ranks = {}, {}
  for name, queries in baseline_queries(turns).items():
    ranked = ranker.search_ranked(queries, domains=domains)
    run = {q: r for q, r in zip(qids, ranked)}
    metrics[name] = mean_metrics(evaluate(run, qrels, REPORT_METRICS, misses_as_zero=True))
    ranks[name] = ranker.ranks(queries, qids, domains=domains).tolist()
  report: dict[str, Any] = {
      "dataset": dataset.name, "split": dataset.split, "turns": len(turns),
      "retriever": {"kind": kind, "k1": k1, "b": b, "k": ranker.k, "within_domain": per_domain},
      "metrics": metrics, "ranks": ranks}
  phen = dataset.stats.get("phenomenon")
  if phen:  # over the scored turns only (a capped split may lack some phenomena)
    by: dict[str, dict[str, float]] = {}
    for p in sorted({phen[t.qid] for t in turns if t.qid in phen}):
      idx = [i for i, t in enumerate(turns) if phen.get(t.qid) == p]
      by[p] = {name: sum(1.0 / r for r in (ranks[name][i] for i in idx) if r > 0) / len(idx)
               for name in ranks}
      by[p]["turns"] = len(idx)
    report["by_phenomenon"] = by
  return report


def format_report(report: dict[str, Any]) -> str:
  """A markdown table of the baselines (x100, as the paper prints)."""
  head = ["baseline", "MRR", "NDCG@3", "R@10", "R@100"]
  within = " within each turn's domain" if report["retriever"].get("within_domain") else ""
  lines = [f"{report['dataset']} [{report['split']}], {report['turns']} turns, BM25 "
           f"({report['retriever']['kind']}){within}", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for name, m in report["metrics"].items():
    lines.append(f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" for k in REPORT_METRICS) + " |")
  concat = [n for n in report["metrics"] if n.endswith("_question") or n == "all_questions"]
  for rw in (n for n in report["metrics"] if n.startswith("rewrite_")):
    best = max(concat, key=lambda n: report["metrics"][n]["recip_rank"])
    gaps = {n: report["metrics"][rw]["recip_rank"] - report["metrics"][n]["recip_rank"]
            for n in ["raw"] + concat}
    lines += ["", f"{rw} MRR minus: " + ", ".join(f"{n} {100 * g:+.1f}" for n, g in gaps.items())
              + f" (best concatenation: {best})"]
  if "by_phenomenon" in report:
    names = list(report["metrics"])
    lines += ["", "MRR by turn kind:", "", "| kind | turns | " + " | ".join(names) + " |",
              "|" + "---|" * (len(names) + 2)]
    for p, d in report["by_phenomenon"].items():
      lines.append(f"| {p} | {d['turns']} | " + " | ".join(f"{100 * d[n]:.1f}" for n in names)
                   + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("dataset",
                  help="synthetic[:size[:seed]], topiocqa:<dir>, qrecc:<dir> or a folder")
  ap.add_argument("--split", default="test")
  ap.add_argument("--bm25", default="lucene", choices=("lucene", "okapi"))
  ap.add_argument("--k1", type=float, default=None)
  ap.add_argument("--b", type=float, default=None)
  ap.add_argument("--json", default=None, help="also write the report (without ranks) here")
  args = ap.parse_args(argv)
  ds = load_dataset(args.dataset, args.split)
  rep = gap_report(ds, kind=args.bm25, k1=args.k1, b=args.b, show_progress=True)
  print(format_report(rep))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({k: v for k, v in rep.items() if k != "ranks"}, f, indent=1)


if __name__ == "__main__":
  main()
