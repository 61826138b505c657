"""BM25 gold-rank throughput: our sparse backends vs rank-bm25 and bm25s, side by side.

Synthetic corpus: Zipf(1.0) words over a 50k vocabulary, passages of ~100 words (TopiOCQA's
passages are <= 100-word Wikipedia chunks), queries of 8-64 words, each built around a gold passage.
Everything runs single-threaded in one process, backends interleaved chunk by chunk; ratios from
the same run are what count.

  python bench/bench_bm25.py                     # 100k passages, 1,024 queries
  python bench/bench_bm25.py --docs 20000 --queries 256 --ref-queries 8   # quick look
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from retrieval.bm25 import RankBM25Searcher, build_bm25
from retrieval.gold_rank import GoldRanker

TOPIOCQA_DOCS = 25_700_000  # method.md 1.5: ~25.7M passages


def make_data(n_docs, n_queries, seed):
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  vocab = sorted({"".join(rng.choice(letters, size=rng.integers(3, 10))) for _ in range(52_000)})
  vocab = np.array(vocab[:50_000])
  p = 1.0 / np.arange(1, len(vocab) + 1)
  p /= p.sum()
  lens = np.clip(rng.normal(100, 25, n_docs).astype(int), 20, 200)
  words = vocab[rng.choice(len(vocab), size=int(lens.sum()), p=p)]
  cuts = np.cumsum(lens)[:-1]
  texts = [" ".join(w) for w in np.split(words, cuts)]
  ids = [f"doc{i}" for i in range(n_docs)]
  queries, qids, qrels = [], [], {}
  for q in range(n_queries):
    gold = int(rng.integers(n_docs))
    n = int(rng.integers(8, 65))
    from_gold = rng.choice(texts[gold].split(), size=n // 2)
    noise = vocab[rng.choice(len(vocab), size=n - n // 2, p=p)]
    toks = np.concatenate([from_gold, noise])
    rng.shuffle(toks)
    queries.append(" ".join(toks))
    qids.append(f"q{q}")
    qrels[f"q{q}"] = {ids[gold]: 1}
  return texts, ids, queries, qids, qrels


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def index_bytes(idx):
  arrays = [idx.idf, idx.doc_len, idx.tie] + [getattr(idx, "norms", np.zeros(0))]
  for s in idx.shards:
    arrays += [s.indptr, s.rows, s.tf, s.value]
  return sum(a.nbytes for a in arrays)


def bm25s_ranks(retriever, queries, qids, qrels, ids, k):
  toks = [q.lower().split() for q in queries]
  docs, _ = retriever.retrieve(toks, k=k, show_progress=False, n_threads=1)
  out = np.full(len(queries), -1, np.int32)
  for i, row in enumerate(docs.tolist()):
    gold = qrels[qids[i]]
    for r, d in enumerate(row):
      if ids[d] in gold:
        out[i] = r + 1
        break
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--docs", type=int, default=100_000)
  ap.add_argument("--queries", type=int, default=1024)
  ap.add_argument("--ref-queries", type=int, default=16, help="queries timed on rank-bm25")
  ap.add_argument("--k", type=int, default=100)
  ap.add_argument("--chunk", type=int, default=64, help="queries per timed round-robin chunk")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  texts, ids, queries, qids, qrels = make_data(args.docs, args.queries, args.seed)

  okapi, t_okapi = timed(lambda: build_bm25(texts, ids, kind="okapi", show_progress=False))
  lucene, t_lucene = timed(lambda: build_bm25(texts, ids, kind="lucene", show_progress=False))
  ref, t_ref = timed(lambda: RankBM25Searcher(texts, ids))
  import bm25s
  retriever = bm25s.BM25(method="atire", idf_method="robertson", dtype="float64")
  _, t_b25 = timed(lambda: retriever.index([t.lower().split() for t in texts],
                                           show_progress=False))

  # The machine is shared: time the backends on the same chunks of queries, round robin, so
  # load drifting during the run hits all of them alike.
  runners = {
      "okapi": lambda q, i: GoldRanker(okapi, qrels, k=args.k).ranks(q, i),
      "lucene": lambda q, i: GoldRanker(lucene, qrels, k=args.k).ranks(q, i),
      "bm25s": lambda q, i: bm25s_ranks(retriever, q, i, qrels, ids, args.k),
  }
  secs = dict.fromkeys(runners, 0.0)
  out = {name: [] for name in runners}
  for lo in range(0, len(queries), args.chunk):
    for name, fn in runners.items():
      r, s = timed(lambda: fn(queries[lo:lo + args.chunk], qids[lo:lo + args.chunk]))
      out[name].append(r)
      secs[name] += s
  r_okapi, r_lucene, r_b25 = (np.concatenate(out[n]) for n in ("okapi", "lucene", "bm25s"))
  s_okapi, s_lucene, s_b25 = secs["okapi"], secs["lucene"], secs["bm25s"]
  sub = slice(0, args.ref_queries)
  r_ref, s_ref = timed(lambda: GoldRanker(ref, qrels, k=args.k).ranks(queries[sub], qids[sub]))

  assert np.array_equal(r_ref, r_okapi[sub]), "fast okapi disagrees with rank-bm25"
  agree_b25 = float(np.mean(r_b25 == r_okapi))
  q = len(queries)
  qps = {"okapi": q / s_okapi, "lucene": q / s_lucene, "rank_bm25": args.ref_queries / s_ref,
         "bm25s": q / s_b25}
  mem_okapi, mem_lucene = index_bytes(okapi), index_bytes(lucene)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

  print(f"## BM25 gold rank, {args.docs:,} passages, {q:,} queries of 8-64 words, top-{args.k}\n")
  print("| backend | build (s) | gold ranks / s | ms / query | vs rank-bm25 | vs bm25s |")
  print("|---|---|---|---|---|---|")
  for name, build in (("ExactOkapiBM25 (ours)", t_okapi), ("LuceneBM25 (ours)", t_lucene),
                      ("rank_bm25.BM25Okapi", t_ref), ("bm25s (numpy, atire, 1 thread)", t_b25)):
    key = {"ExactOkapiBM25 (ours)": "okapi", "LuceneBM25 (ours)": "lucene",
           "rank_bm25.BM25Okapi": "rank_bm25"}.get(name, "bm25s")
    print(f"| {name} | {build:.1f} | {qps[key]:.1f} | {1e3 / qps[key]:.2f} | "
          f"{qps[key] / qps['rank_bm25']:.0f}x | {qps[key] / qps['bm25s']:.2f}x |")
  print(f"\nrank-bm25 timed on {args.ref_queries} queries (its ranks equal ExactOkapiBM25's on "
        f"them); bm25s ranks agree with ExactOkapiBM25 on {agree_b25:.1%} of queries (bm25s sets "
        f"negative idf to 0 where rank-bm25 floors it).")
  found = float(np.mean(r_okapi > 0))
  print(f"gold found in top-{args.k}: okapi {found:.1%}, lucene {np.mean(r_lucene > 0):.1%}.")
  postings = sum(s.rows.size for s in okapi.shards)
  print(f"\nindex: {postings:,} postings ({postings / args.docs:.1f} per passage); in memory "
        f"okapi {mem_okapi / 2**20:.0f} MiB, lucene {mem_lucene / 2**20:.0f} MiB; "
        f"process peak RSS {peak:.1f} GiB.")
  scale = TOPIOCQA_DOCS / args.docs
  print(f"\n### Extrapolated to TopiOCQA ({TOPIOCQA_DOCS / 1e6:.1f}M passages, x{scale:.0f})\n")
  print("Posting lists grow linearly with the corpus, so per-query time and index size do too.\n")
  print("| backend | index (GiB) | s / query (1 core) | s per 1,024-query step (1 core) |")
  print("|---|---|---|---|")
  for name, mem, key in (("ExactOkapiBM25", mem_okapi, "okapi"),
                         ("LuceneBM25", mem_lucene, "lucene")):
    per_q = scale / qps[key]
    print(f"| {name} | {mem * scale / 2**30:.1f} | {per_q:.3f} | {per_q * 1024:.0f} |")


if __name__ == "__main__":
  main()
