"""BM25 at scale (issue 33): the sparse top-k equals the dense reference, the streamed build
equals the in-memory one array for array, a loaded index and a worker pool rank exactly as the
in-memory index, and a damaged or mismatched index is refused with its reason."""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest

from retrieval import bm25_store, index_io
from retrieval.bm25 import build_bm25, params_for
from retrieval.bm25_build import StreamBuilder
from retrieval.gold_rank import GoldRanker
from retrieval.rank_pool import PooledSearcher, RankPool


@dataclasses.dataclass
class P:  # a passage as collections yield them
  pid: str
  contents: str
  domain: str | None = None


def _corpus(n=500, seed=0):
  """Zipf words (the commonest in most passages), an empty and two identical passages, ids out
  of row order; queries from rare-only (few postings) to common-only (most passages hit)."""
  rng = np.random.default_rng(seed)
  words = ["the", "of"] + [f"w{i}" for i in range(300)] + ["Cat", "cat's", "running", "runs"]
  p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
  p /= p.sum()
  texts = [" ".join(rng.choice(words, size=rng.integers(0, 60), p=p)) for _ in range(n)]
  texts[3], texts[7] = "", texts[8]
  ids = [f"p{(i * 7919) % 1000:04d}" for i in range(n)]
  queries = [" ".join(rng.choice(words, size=rng.integers(1, 30), p=p)) for _ in range(40)]
  queries += ["w250 w280", "w299", "", "zzz", "the the the", "w3 w3 w5 w3", texts[7],
              "THE Of w1", "cat running"]
  return texts, ids, queries


CORPUS = _corpus()


def _same(a, b):
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1].view(np.int64), b[1].view(np.int64))  # bit for bit


def _build(tmp_path, kind, passages, name="idx", **kw):
  out = str(tmp_path / name)
  bm25_store.build_index(passages, out, params_for(kind), progress=False, **kw)
  return out


def _open(path, kind, passages, by_domain=False):
  return bm25_store.open_index(path, params_for(kind),
                               lambda: bm25_store.corpus_fingerprint(passages, by_domain))


@pytest.mark.parametrize("kind", ["okapi", "lucene"])
@pytest.mark.parametrize("shard_docs", [None, 170])
def test_sparse_top_k_equals_the_dense_reference(kind, shard_docs):
  texts, ids, queries = CORPUS
  idx = build_bm25(texts, ids, kind=kind, show_progress=False, shard_docs=shard_docs)
  for k in (1, 5, 100, 1000):
    _same(idx.search(queries, k), idx.search_dense(queries, k))
  _same(idx.search(queries[:5], 10), idx.search_dense(queries[:5], 10))  # buffers were reset


@pytest.mark.parametrize("kind", ["okapi", "lucene"])
@pytest.mark.parametrize("max_postings, shard_postings", [(10**9, 2**31 - 1), (97, 2**31 - 1),
                                                           (500, 4000)])
def test_streamed_build_equals_in_memory(tmp_path, kind, max_postings, shard_postings):
  texts, ids, queries = CORPUS
  ref = build_bm25(texts, ids, kind=kind, show_progress=False)
  b = StreamBuilder(str(tmp_path / "idx"), params_for(kind), str(tmp_path / "work"),
                    max_postings, shard_postings)
  for pid, t in zip(ids, texts):
    b.add(pid, t)
  info = b.finish()
  assert os.listdir(tmp_path / "work") == []  # run files are removed once merged
  got = index_io.load_index(tmp_path / "idx", lazy_ids=True)
  assert list(got.ids) == ids and got.vocab == ref.vocab and got.stats == ref.stats
  names = ["idf", "doc_len", "tie"] + (["norms"] if kind == "lucene" else [])
  for name in names:
    a, g = getattr(ref, name), np.asarray(getattr(got, name))
    assert a.dtype == g.dtype and np.array_equal(a, g), name
  if shard_postings == 2**31 - 1:
    assert info["num_shards"] == 1
    for name in ("indptr", "rows", "tf", "value"):
      a, g = getattr(ref.shards[0], name), np.asarray(getattr(got.shards[0], name))
      assert a.dtype == g.dtype and np.array_equal(a, g), name
  else:
    assert info["num_shards"] > 1
  _same(got.search(queries, 50), ref.search_dense(queries, 50))


@pytest.fixture(scope="module")
def synthetic():
  from cqr_jax.data import load_dataset
  train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
  turns = list(train.turns) + list(test.turns)
  texts = [t.question for t in turns] + [" ".join([q for q, _ in t.context] + [t.question])
                                          for t in turns[::3]]
  qids = [t.qid for t in turns] + [t.qid for t in turns[::3]]
  return train.collection, texts, qids, {**train.qrels, **test.qrels}


@pytest.mark.parametrize("kind", ["okapi", "lucene"])
def test_synthetic_benchmark_in_memory_loaded_and_pooled_rank_alike(tmp_path, kind, synthetic):
  coll, texts, qids, qrels = synthetic
  assert len(coll) == 2010
  mem = GoldRanker(build_bm25(coll, kind=kind, show_progress=False), qrels)
  path = _build(tmp_path, kind, coll, max_postings=5000)
  local, parts, m = _open(path, kind, coll)
  assert list(parts) == [None] and m["corpus"]["num_docs"] == 2010
  loaded = GoldRanker(parts[None], qrels)
  want_ranks, want_lists = mem.ranks(texts, qids), mem.search_ranked(texts)
  assert (want_ranks > 0).mean() > 0.5
  np.testing.assert_array_equal(loaded.ranks(texts, qids), want_ranks)
  assert loaded.search_ranked(texts) == want_lists
  d = bm25_store.part_dirs(local, m)[None]
  with RankPool(2, [d]) as pool:
    assert len(set(pool.pids)) == 2 and os.getpid() not in pool.pids
    pooled = GoldRanker(PooledSearcher(pool, d, parts[None]), qrels)
    np.testing.assert_array_equal(pooled.ranks(texts, qids), want_ranks)
    assert pooled.search_ranked(texts) == want_lists
    assert pool.search(d, [], 5)[0].shape == (0, 5)


def test_domains_get_one_part_each(tmp_path):
  texts, ids, queries = CORPUS
  doms = ["a" if i % 3 else "b" for i in range(len(ids))]
  passages = [P(i, t, d) for i, t, d in zip(ids, texts, doms)]
  path = _build(tmp_path, "lucene", passages, by_domain=True, max_postings=300)
  _, parts, m = _open(path, "lucene", passages, by_domain=True)
  assert sorted(parts) == ["a", "b"] and m["corpus"]["num_docs"] == len(ids)
  for d in ("a", "b"):
    rows = [r for r in range(len(ids)) if doms[r] == d]
    ref = build_bm25([texts[r] for r in rows], [ids[r] for r in rows], show_progress=False)
    _same(parts[d].search(queries, 20), ref.search_dense(queries, 20))
  with pytest.raises(ValueError, match="one part per domain .'a', 'b'., this run retrieves with "
                     "one part for the whole collection"):
    _open(path, "lucene", passages)
  mixed = passages[:5] + [P("x1", "w1 w2")]
  with pytest.raises(ValueError, match="some passages have no domain .e.g. 'x1'"):
    _build(tmp_path, "lucene", mixed, name="mixed", by_domain=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  texts, ids, _ = CORPUS
  passages = [P(i, t) for i, t in zip(ids, texts)]
  root = tmp_path_factory.mktemp("built")
  return passages, _build(root, "lucene", passages, max_postings=400, shard_postings=3000)


def _copy(tmp_path, src):
  import shutil
  dst = str(tmp_path / "copy")
  shutil.copytree(src, dst)
  return dst


def test_refusals(tmp_path, built):
  passages, path = built
  def fp(ps):
    return lambda: bm25_store.corpus_fingerprint(ps, False)
  lucene = params_for("lucene")
  other = passages[:-1] + [dataclasses.replace(passages[-1], contents="changed text")]
  cases = [
      (lucene, fp(other), (r"BM25 index of another corpus \(500 passages, fingerprint \w+; "
                           r"this run's collection: 500 passages, fingerprint \w+\)")),
      (params_for("lucene", analyzer="whitespace_lower"), fp(passages),
       (r"built with analyzer='lucene_english', this run has analyzer='whitespace_lower' "
        r"\(retrieval.analyzer\)")),
      (params_for("lucene", k1=1.2), fp(passages),
       r"built with k1=0.9, this run has k1=1.2 \(retrieval.k1\)"),
      (params_for("okapi"), fp(passages), r"built with kind='lucene'"),
  ]
  for params, corpus_fn, msg in cases:
    with pytest.raises(ValueError, match=msg) as e:
      bm25_store.open_index(path, params, corpus_fn)
    assert str(e.value).startswith(path + ": ") and "\n" not in str(e.value)
  bad = _copy(tmp_path, path)
  os.remove(os.path.join(bad, "all", "shard-00001", "rows.npy"))
  with pytest.raises(ValueError, match=r"all/shard-00001/rows.npy is missing"):
    bm25_store.open_index(bad, lucene, fp(passages))
  os.remove(os.path.join(bad, bm25_store.MANIFEST))
  with pytest.raises(ValueError, match=r"no BM25 index here \(manifest.json missing"):
    bm25_store.open_index(bad, lucene, fp(passages))


def test_truncated_or_altered_files(tmp_path, built):
  passages, path = built
  bad = _copy(tmp_path, path)
  f = os.path.join(bad, "all", "shard-00000", "value.npy")
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) - 4)
  with pytest.raises(ValueError, match=r"all/shard-00000/value.npy has \d+ bytes, the manifest "
                     r"says \d+ \(truncated or damaged\)"):
    bm25_store.open_index(bad, params_for("lucene"),
                          lambda: bm25_store.corpus_fingerprint(passages, False))
  assert bm25_store.verify_hashes(path) == []
  bad2 = _copy(tmp_path / "x", path)
  f = os.path.join(bad2, "all", "idf.npy")
  data = bytearray(pathlib.Path(f).read_bytes())
  data[-1] ^= 1  # same size, other bytes: only the hashes see it
  pathlib.Path(f).write_bytes(bytes(data))
  assert bm25_store.verify_hashes(bad2) == ["all/idf.npy: size or hash differs"]
  manifest = pathlib.Path(bad2, bm25_store.MANIFEST)
  m = json.loads(manifest.read_text())
  m["version"] = 99
  manifest.write_text(json.dumps(m))
  with pytest.raises(ValueError, match=f"not a cqr-jax-bm25-index v{bm25_store.VERSION} index"):
    bm25_store.read_manifest(bad2)


def test_build_refuses_bad_corpora_and_an_existing_index(tmp_path, built):
  _, path = built
  with pytest.raises(ValueError, match="holds files already: pass --overwrite"):
    bm25_store.build_index([P("a", "x")], path, params_for("lucene"), progress=False)
  with pytest.raises(ValueError, match=r"duplicate passage id 'a' at rows 0 and 2"):
    _build(tmp_path, "okapi", [P("a", "x"), P("b", "y"), P("a", "z")], name="dup")
  with pytest.raises(ValueError, match="empty corpus"):
    _build(tmp_path, "okapi", [], name="empty")
  assert not os.path.exists(tmp_path / "dup") and not os.path.exists(tmp_path / "dup.partial")


def test_lazy_ids(tmp_path):
  texts, ids, _ = CORPUS
  idx = build_bm25(texts, ids, show_progress=False)
  idx.save(tmp_path / "i")
  os.remove(tmp_path / "i" / "ids_offsets.npy")  # an index saved before the offsets existed
  lazy = index_io.load_index(tmp_path / "i", lazy_ids=True)
  assert isinstance(lazy.ids, index_io.MappedLines) and lazy.ids == ids
  assert lazy.ids[-1] == ids[-1] and lazy.ids[2:4] == ids[2:4] and len(lazy.ids) == len(ids)


_GS = r"""
import os, sys
import numpy as np
from cqr_jax import paths
from retrieval import bm25_store
from retrieval.bm25 import build_bm25, params_for
from tests.retrieval.test_bm25_index import CORPUS, P, _same
texts, ids, queries = CORPUS
passages = [P(i, t) for i, t in zip(ids, texts)]
uri, tmp = sys.argv[1], sys.argv[2]
fp = lambda: bm25_store.corpus_fingerprint(passages, False)
bm25_store.build_index(passages, uri, params_for("lucene"), progress=False, max_postings=500,
                       work_dir=tmp)
assert paths.exists(uri + "/manifest.json") and not os.listdir(tmp)
local, parts, m = bm25_store.open_index(uri, params_for("lucene"), fp)
assert local.startswith(os.environ["CQR_JAX_CACHE"])
_same(parts[None].search(queries, 30), build_bm25(texts, ids, show_progress=False).search_dense(
    queries, 30))
assert bm25_store.open_index(uri, params_for("lucene"), fp)[0] == local  # the cached copy
f = paths.path(uri + "/all/idf.npy")
data = bytearray(f.read_bytes())
data[-1] ^= 1
f.write_bytes(bytes(data))
os.environ["CQR_JAX_CACHE"] = os.path.join(tmp, "fresh")
try:
  bm25_store.open_index(uri, params_for("lucene"), fp)
  raise SystemExit("not refused")
except ValueError as e:
  assert "all/idf.npy: differs from the manifest's size or hash" in str(e), e
print("OK", flush=True)
"""


def test_gs_index_is_copied_checked_and_cached(tmp_path):
  import subprocess
  import sys

  from tests import gcs_emulator
  from tests.multiprocess import REPO_ROOT
  if not gcs_emulator.available():
    pytest.skip("gcp-storage-emulator is not installed")
  script = tmp_path / "gs.py"
  script.write_text(_GS)
  (tmp_path / "work").mkdir()
  with gcs_emulator.gcs_emulator("bkt") as gcs:
    env = {**os.environ, **gcs, "PYTHONPATH": REPO_ROOT, "CQR_JAX_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, str(script), "gs://bkt/idx", str(tmp_path / "work")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]
