"""LuceneBM25 against pyserini itself (issue 33): same top-10, same scores, same query tokens.

Needs an interpreter with the `pyserini` extra (pyproject.toml): $PYSERINI_PYTHON, or this one
if it imports pyserini; skipped otherwise (CI has no Java). bench/bench_bm25_pyserini.py is the
same check at 100k passages.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from retrieval.bm25 import build_bm25

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIDE = os.path.join(ROOT, "bench", "pyserini_side.py")
MTRAG = os.path.join(ROOT, "cqr_jax", "data", "mtrag", "mtrag_un")

# Text where a regex tokenizer and Lucene's StandardTokenizer part ways, each case checked against
# Lucene: emoji and (R)/(C) symbols, "_" runs, possessives, Thai runs, Turkish dotted I, Greek
# sigma, combining marks, a format character, superscripts, tokens over 255 characters.
TRICKY = [
    ("IBM Watson\u00ae Assistant \u00a9 2020 \u2122 \u2605 \u2606 \u2665 "
     "\U0001f600\U0001f44d\U0001f3fd \U0001f1eb\U0001f1f7 \U0001f1eb"),
    "snake_case __ _ _private a_b __init__ John's Jones\u2019 dogs' U.S.A. e.g. 3.14 1,000.5",
    ("\u0e20\u0e32\u0e29\u0e32\u0e44\u0e17\u0e22abc \u0130stanbul \u03a3\u039f\u03a6\u039f"
     "\u03a3 caf\u00e9 cafe\u0301 tip\u200e km\u00b2 \u00bd \u65e5\u672c\u8a9e "
     "\u3072\u3089\u304c\u306a"),
    "x" * 300 + " " + "ab." * 120 + " " + "\u00e9" * 270,
]


def _pyserini_python():
  py = os.environ.get("PYSERINI_PYTHON")
  if not py and importlib.util.find_spec("pyserini") is not None:
    py = sys.executable
  if not py:
    return None
  ok = subprocess.run([py, "-c", "import pyserini, jnius_config"], check=False, capture_output=True)
  return py if ok.returncode == 0 else None


PY = _pyserini_python()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PY is None, reason="no pyserini: set PYSERINI_PYTHON to an interpreter "
                       "with the `pyserini` extra (pyproject.toml)"),
]


def _corpus():
  with open(os.path.join(MTRAG, "corpus.jsonl"), encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f][:600]
  texts += TRICKY + [TRICKY[0], TRICKY[1]]  # identical passages: exact ties, broken by id
  ids = [str((i * 7919) % 100_003) for i in range(len(texts))]  # string order != number order
  with open(os.path.join(MTRAG, "conversations.jsonl"), encoding="utf-8") as f:
    queries = [t["question"] for line in f for t in json.loads(line)["turns"]][:300]
  queries = [" ".join(q.split()) for q in queries if q.strip()]
  queries += [" ".join(t.split()[:40]) for t in TRICKY] + ["Watson\u00ae \U0001f600", "__init__"]
  return texts, ids, queries


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  texts, ids, queries = _corpus()
  work = tmp_path_factory.mktemp("pyserini")
  os.makedirs(work / "docs")
  with open(work / "docs" / "docs.jsonl", "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"id": i, "contents": t}) + "\n" for i, t in zip(ids, texts))
  qids = [f"q{i}" for i in range(len(queries))]
  with open(work / "queries.tsv", "w", encoding="utf-8") as f:
    f.writelines(f"{q}\t{t}\n" for q, t in zip(qids, queries))
  for cmd in (["index", "--input", str(work / "docs"), "--index", str(work / "index"),
               "--threads", "1"],
              ["search", "--index", str(work / "index"), "--queries", str(work / "queries.tsv"),
               "--out", str(work / "run.json"), "--threads", "1", "--k1", "0.9", "--b", "0.4",
               "--analyze-queries"]):
    r = subprocess.run([PY, SIDE] + cmd, check=False, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  with open(work / "run.json", encoding="utf-8") as f:
    theirs = json.load(f)
  index = build_bm25(texts, ids, kind="lucene", k1=0.9, b=0.4, show_progress=False)
  rows, scores = index.search(queries, 10)
  ours = {q: [(ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0]
          for q, rr, ss in zip(qids, rows, scores)}
  return index, dict(zip(qids, queries)), ours, theirs


def test_query_tokens_equal_lucene(runs):
  index, queries, _, theirs = runs
  for qid, text in queries.items():
    assert index.analyzer(text) == theirs["query_tokens"][qid], text


def test_top10_and_scores_equal_pyserini(runs):
  _, queries, ours, theirs = runs
  assert any(len(h) == 10 for h in ours.values())
  for qid in queries:
    got, want = ours[qid], theirs["hits"].get(qid, [])
    assert [d for d, _ in got] == [d for d, _ in want], queries[qid]
    # pyserini rounds scores to 1e-4 and lowers the i-th of tied ones by i * 1e-6
    for (_, s), (_, t) in zip(got, want):
      assert abs(round(s, 4) - t) < 2e-5, (queries[qid], got, want)
