"""BM25 at the paper's scale (issue 33): build and gold-rank cost on generated TopiOCQA-like
collections of 1M and 5M passages, and a cost model extrapolated to TopiOCQA (25.7M passages) and
QReCC (54M) on one Cloud TPU VM host.

Every figure goes through the code a run uses: `cqr-jax index` (a child process: wall time and
peak RSS from wait4) builds the index of `topiocqa:DIR`; gold ranks come from
`train.common.build_ranker` over `retrieval.bm25_index` with `retrieval.rank_workers` W (0 =
in-process, memory-mapped), i.e. the `ranker.ranks(texts, qids)` of a GRPO step (train/grpo.py),
each query with one gold passage, a real row of the collection.

The collection (written streamed, `generate`), in TopiOCQA's file layout (method.md 1.2):
- passages of clip(N(130, 25), 50, 200) words: TopiOCQA's Wikipedia chunks, ~100-200 words,
  mean near 130;
- one Zipf law over all tokens: p(r) ~ 1/r up to rank R = 50,000, ~ R / r^2 beyond (the two
  regimes of large English corpora: a kernel lexicon with exponent 1, a tail with exponent 2);
  ranks 1-33 are Lucene's 33 English stop words (a third of the tokens, as in English text),
  the rest pseudo-words of consonant-vowel syllables. Expected types before stemming: 1.3M at
  1M passages, 2.9M at 5M, 6.5M at 25.7M, 9.4M at 54M (`expected_types`): Heaps-like growth to
  the several million types of English Wikipedia;
- topical bursts: articles of geometric(mean 5) consecutive passages share 4 topic words (Zipf
  rank >= 200) that replace 10% of their tokens, and a title "t1 t2 [SEP] t3".
Queries: TopiOCQA-like rewritten questions of 10-15 words, each built on its gold passage: 1-2 of
its article's topic words, 1-3 of its other content words, ~35% stop words, the rest common
words (Zipf ranks 34-2,000: question words, verbs).

Timed: wall time and CPU time (the workers' /proc utime + stime, and the parent's) of each
`ranks` call; the extrapolation (`extrapolate`) uses CPU time, as the machine is shared.

  python bench/bench_bm25_scale.py run --docs 1000000 --dir /tmp/bm25_scale/1m --workers 0 1 2
  python bench/bench_bm25_scale.py run --docs 5000000 --dir /tmp/bm25_scale/5m --workers 1 2
  python bench/bench_bm25_scale.py report /tmp/bm25_scale/1m /tmp/bm25_scale/5m
  python bench/bench_bm25_scale.py run --docs 100000 --dir /tmp/bm25_scale/100k --workers 2
  python bench/bench_bm25_scale.py check --dir /tmp/bm25_scale/100k  # ranks = in-memory index
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

STOP = ["the", "of", "and", "to", "a", "in", "is", "was", "that", "for", "as", "with", "by", "on",
        "it", "at", "be", "this", "are", "or", "not", "their", "they", "an", "there", "but",
        "these", "into", "will", "such", "then", "if", "no"]  # by rough English frequency
KERNEL = 50_000  # R: last rank of the 1/r regime
TOPIC_MIN_RANK = 200
TOPIC_WORDS, TOPIC_SHARE, ARTICLE_MEAN = 4, 0.10, 5
CONS, VOWELS = "bcdfghjklmnpqrstvwxz", "aeiou"
SYLLABLES = [c + v for c in CONS for v in VOWELS]  # 100
WORD_CACHE = 2_000_000
TOPIOCQA_DOCS, QRECC_DOCS = 25_700_000, 54_000_000  # method.md 1.2
# Cloud TPU VM hosts (Google Cloud machine types; assumptions, not measured here):
HOSTS = {"v4 (ct4p-hightpu-4t, 4 chips)": (240, 407),
         "v5e (ct5lp-hightpu-8t, 8 chips)": (224, 384),
         "v5p (ct5p-hightpu-4t, 4 chips)": (208, 448)}


# ------------------------------------------------------------------------------------ corpus
class Zipf:
  """Token ranks (1-based) of the two-regime law: p(r) = C / r for r <= R, C R / r^2 beyond
  (the tail continuous), C = 1 / (H_R + 1)."""

  def __init__(self, kernel: int = KERNEL):
    w = 1.0 / np.arange(1, kernel + 1)
    z = w.sum() + 1.0
    self.kernel = kernel
    self.cum = np.cumsum(w) / z  # P(rank <= r), r = 1..R
    self.head = float(self.cum[-1])

  def ranks_from_uniform(self, u: np.ndarray) -> np.ndarray:
    out = np.empty(len(u), np.int64)
    head = u < self.head
    out[head] = np.searchsorted(self.cum, u[head], side="right") + 1
    v = np.minimum((u[~head] - self.head) / (1 - self.head), 1 - 1e-12)
    out[~head] = np.floor(self.kernel / (1 - v)).astype(np.int64) + 1
    return out

  def sample(self, rng, n: int, min_rank: int = 1, max_rank: int | None = None) -> np.ndarray:
    lo = float(self.cum[min_rank - 2]) if min_rank > 1 else 0.0
    hi = float(self.cum[max_rank - 1]) if max_rank else 1.0
    return self.ranks_from_uniform(lo + (hi - lo) * rng.random(n))


def expected_types(n_tokens: float, kernel: int = KERNEL) -> float:
  """E[distinct ranks] among n_tokens draws of `Zipf` (before the analyzer's stemming)."""
  z = Zipf(kernel)
  p_head = np.diff(np.concatenate([[0.0], z.cum]))
  c = 1 - z.head  # tail: P(rank > x) = c R / x, density c R / x^2
  edges = np.logspace(np.log10(kernel + 0.5), 16, 40_000)
  mid, width = np.sqrt(edges[1:] * edges[:-1]), np.diff(edges)
  tail = np.sum(-np.expm1(-n_tokens * c * kernel / mid**2) * width)
  return float(np.sum(-np.expm1(-n_tokens * p_head)) + tail)


def word(rank: int) -> str:
  """Rank 1-33: a stop word; above: consonant-vowel syllables of rank + 66 in base 100 (at least
  two syllables, so never a stop word)."""
  if rank <= len(STOP):
    return STOP[rank - 1]
  x, out = rank - len(STOP) + 99, []
  while x:
    x, d = divmod(x, 100)
    out.append(SYLLABLES[d])
  return "".join(out)


class Words:
  def __init__(self):
    self.cache = np.array([""] + [word(r) for r in range(1, WORD_CACHE)], object)

  def __call__(self, ranks: np.ndarray) -> np.ndarray:
    out = self.cache[np.minimum(ranks, WORD_CACHE - 1)]
    for i in np.flatnonzero(ranks >= WORD_CACHE):
      out[i] = word(int(ranks[i]))
    return out


def generate(out: str, n_docs: int, n_queries: int, seed: int = 0, batch: int = 50_000) -> dict:
  """Writes `out`/{full_wiki_segments.tsv, topiocqa_train.json, all_history/train.json}, a batch
  of passages at a time; returns counts."""
  from retrieval.analyzer import LUCENE_ENGLISH_STOP_WORDS
  assert set(STOP) == LUCENE_ENGLISH_STOP_WORDS and len(STOP) == 33
  rng, qrng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
  zipf, words = Zipf(), Words()
  golds = np.sort(qrng.choice(n_docs, n_queries, replace=False))
  gold_at = {int(g): i for i, g in enumerate(golds)}
  gold_tokens: list = [None] * n_queries
  os.makedirs(os.path.join(out, "all_history"), exist_ok=True)
  n_words = n_bytes = 0
  topics = title = None
  left = 0  # passages left in the current article
  with open(os.path.join(out, "full_wiki_segments.tsv"), "w", encoding="utf-8") as f:
    f.write("id\ttext\ttitle\n")
    for lo in range(0, n_docs, batch):
      b = min(batch, n_docs - lo)
      lens = np.clip(np.rint(rng.normal(130, 25, b)), 50, 200).astype(np.int64)
      ranks = zipf.sample(rng, int(lens.sum()))
      burst = rng.random(len(ranks)) < TOPIC_SHARE
      pick = rng.integers(0, TOPIC_WORDS, len(ranks))
      ends = np.cumsum(lens)
      starts = ends - lens
      lines = []
      for i in range(b):
        if left == 0:
          left = int(rng.geometric(1 / ARTICLE_MEAN))
          topics = zipf.sample(rng, TOPIC_WORDS, min_rank=TOPIC_MIN_RANK)
          t = words(topics)
          title = f"{t[0]} {t[1]} [SEP] {t[2]}"
        left -= 1
        s, e = int(starts[i]), int(ends[i])
        r = ranks[s:e]
        m = burst[s:e]
        r[m] = topics[pick[s:e][m]]
        row = lo + i
        if row in gold_at:
          gold_tokens[gold_at[row]] = (r.copy(), topics.copy())
        lines.append(f"{row + 1}\t{' '.join(words(r))}\t{title}\n")
      text = "".join(lines)
      f.write(text)
      n_words += int(lens.sum())
      n_bytes += len(text)
  turns, hist = [], []
  for i, (row, (r, topics)) in enumerate(zip(golds.tolist(), gold_tokens)):
    q = query_ranks(qrng, zipf, r, topics)
    turns.append({"Conversation_no": i + 1, "Turn_no": 1, "Question": " ".join(words(q)),
                  "Context": [], "Answer": "", "Topic": "", "Topic_section": ""})
    hist.append({"conv_id": i + 1, "turn_id": 1,
                 "positive_ctxs": [{"title": "", "text": "", "passage_id": str(row + 1)}]})
  with open(os.path.join(out, "topiocqa_train.json"), "w") as f:
    json.dump(turns, f)
  with open(os.path.join(out, "all_history", "train.json"), "w") as f:
    json.dump(hist, f)
  info = {"docs": n_docs, "queries": n_queries, "seed": seed, "words": n_words,
          "tsv_bytes": n_bytes, "mean_query_words": float(np.mean(
              [len(t["Question"].split()) for t in turns]))}
  with open(os.path.join(out, "generated.json"), "w") as f:
    json.dump(info, f)
  return info


def query_ranks(rng, zipf: Zipf, passage: np.ndarray, topics: np.ndarray) -> np.ndarray:
  """A 10-15 word question about a passage (token ranks): 1-2 topic words, 1-3 of its other
  content words, ~35% stop words, common words for the rest."""
  n = int(rng.integers(10, 16))
  n_topic, n_gold = int(rng.integers(1, 3)), int(rng.integers(1, 4))
  n_stop = round(0.35 * n)
  n_common = max(n - n_topic - n_gold - n_stop, 0)
  content = passage[(passage > len(STOP)) & ~np.isin(passage, topics)]
  parts = [rng.choice(topics[:3], n_topic, replace=False),
           rng.choice(content, min(n_gold, len(content)), replace=False),
           zipf.sample(rng, n_stop, max_rank=len(STOP)),
           zipf.sample(rng, n_common, min_rank=len(STOP) + 1, max_rank=2_000)]
  q = np.concatenate(parts)
  rng.shuffle(q)
  return q


# -------------------------------------------------------------------------------- measuring
def load() -> str:
  la = os.getloadavg()
  return f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def child(cmd: list[str], log: str) -> dict:
  """Runs cmd; its wall time, peak RSS (wait4) and output (also written to `log`)."""
  t = time.perf_counter()
  with open(log, "w") as f:
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    _, status, ru = os.wait4(p.pid, 0)
  wall = time.perf_counter() - t
  p.returncode = os.waitstatus_to_exitcode(status)
  with open(log) as f:
    text = f.read()
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); last lines:\n{text[-3000:]}")
  return {"wall_s": wall, "peak_rss_gib": ru.ru_maxrss / 2**20, "user_s": ru.ru_utime,
          "sys_s": ru.ru_stime, "output": text}


def settings(d: str, workers: int | None = None) -> list[str]:
  """The run's config overrides: the generated data set, and the index with W rank workers."""
  out = [f"data.dataset=topiocqa:{d}", f"run_dir={os.path.join(d, 'run')}"]
  if workers is not None:
    out += [f"retrieval.bm25_index={os.path.join(d, 'index')}", f"retrieval.rank_workers={workers}"]
  return out


def cpu_seconds(pids: list[int]) -> float:
  """User + system CPU seconds of processes so far (/proc/PID/stat utime, stime)."""
  total = 0
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
  return total / os.sysconf("SC_CLK_TCK")


def rank_main(args) -> None:
  """(child) Gold ranks of the train turns, as a GRPO step computes its reward: timed calls."""
  from cqr_jax import config as cfglib
  from train import common
  cfg = cfglib.resolve(overrides=settings(args.dir, args.workers))
  t = time.perf_counter()
  ds = common.load_split(cfg, cfg.data.train_split)
  t_data = time.perf_counter() - t
  t = time.perf_counter()
  ranker = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words)
  t_open = time.perf_counter() - t
  texts, qids = [x.question for x in ds.turns], [x.qid for x in ds.turns]
  pool_pids = [pid for entry in common._BM25_INDEXES.values() for pool in entry[3].values()
               for pid in pool.pids]
  calls, cpu_w, cpu_p, ranks = [], [], [], None
  for _ in range(args.reps):
    w0, p0, t = cpu_seconds(pool_pids), time.process_time(), time.perf_counter()
    r = ranker.ranks(texts, qids)
    calls.append(time.perf_counter() - t)
    cpu_w.append(cpu_seconds(pool_pids) - w0)
    cpu_p.append(time.process_time() - p0)
    if ranks is not None and not np.array_equal(r, ranks):
      raise RuntimeError("ranks differ between calls")
    ranks = r
  rss = {}
  for pid in pool_pids or [os.getpid()]:
    with open(f"/proc/{pid}/status") as f:
      st = dict(line.split(":", 1) for line in f)
    for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
      rss.setdefault(k, []).append(int(st[k].split()[0]) / 2**20)  # kB -> GiB
  common.close_rank_pools()
  found = ranks > 0
  print("RESULT " + json.dumps({
      "workers": args.workers, "queries": len(texts), "calls_s": calls, "cpu_workers_s": cpu_w,
      "cpu_parent_s": cpu_p,
      "data_s": t_data,
      "open_s": t_open, "found": float(found.mean()),
      "mrr": float(np.mean(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0))),
      "rank1": float(np.mean(ranks == 1)), "rss_gib": rss, "pooled": bool(pool_pids)}))


def run_main(args) -> None:
  d = os.path.abspath(args.dir)
  os.makedirs(d, exist_ok=True)
  res_path = os.path.join(d, "results.json")
  res = read_json(res_path) if os.path.exists(res_path) else {}
  res["machine"] = machine()
  if not os.path.exists(os.path.join(d, "generated.json")):
    print(f"[{time.strftime('%H:%M:%S')}] generating {args.docs:,} passages, load {load()}",
          flush=True)
    t = time.perf_counter()
    info = generate(d, args.docs, args.queries, args.seed)
    info["gen_s"] = time.perf_counter() - t
    res["generated"] = info
  if args.gen_only:
    write_json(res_path, res)
    return
  if "collection" not in res:  # the collection's offset index, built on its first open
    print(f"[{time.strftime('%H:%M:%S')}] collection offsets, load {load()}", flush=True)
    script = ("import sys; from cqr_jax.data import topiocqa; "
              "print(len(topiocqa.open_collection(sys.argv[1], progress=False)))")
    c = child([sys.executable, "-c", script, d], os.path.join(d, "collection.log"))
    res["collection"] = {k: c[k] for k in ("wall_s", "peak_rss_gib")}
    write_json(res_path, res)
  if "build" not in res or args.rebuild:
    print(f"[{time.strftime('%H:%M:%S')}] cqr-jax index, load {load()}", flush=True)
    shutil.rmtree(os.path.join(d, "index"), ignore_errors=True)
    cmd = ([os.path.join(os.path.dirname(sys.executable), "cqr-jax"), "index"]
           + [x for s in settings(d) for x in ("--set", s)]
           + ["--out", os.path.join(d, "index"), "--work-dir", os.path.join(d, "work"),
              "--max-postings-in-memory", str(args.max_postings)])
    c = child(cmd, os.path.join(d, "index.log"))
    m = read_json(os.path.join(d, "index", "manifest.json"))
    meta = read_json(os.path.join(d, "index", "all", "meta.json"))
    by = {}
    for item in m["files"]:
      kind = item["path"].rsplit("/", 1)[-1] if "shard-" in item["path"] else "other"
      by[kind] = by.get(kind, 0) + item["bytes"]
    res["build"] = {"cmd": " ".join(cmd[1:]), "wall_s": c["wall_s"],
                    "peak_rss_gib": c["peak_rss_gib"], "cpu_s": c["user_s"] + c["sys_s"],
                    "index_bytes": sum(by.values()), "bytes_by_file": by,
                    "postings": meta["stats"]["num_postings"], "terms": meta["num_terms"],
                    "shards": len(meta["shards"]), "avgdl": meta["stats"]["avgdl"],
                    "max_postings": args.max_postings, "load_after": load()}
    write_json(res_path, res)
  if "postings_per_query" not in res:
    res["postings_per_query"] = postings_per_query(d)
    write_json(res_path, res)
  res.setdefault("rank", {})
  for w in args.workers:
    print(f"[{time.strftime('%H:%M:%S')}] gold ranks, {w} workers, load {load()}", flush=True)
    before = load()
    c = child([sys.executable, os.path.abspath(__file__), "_rank", "--dir", d, "--workers",
               str(w), "--reps", str(args.reps)], os.path.join(d, f"rank{w}.log"))
    line = [x for x in c["output"].splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    r.update(parent_peak_rss_gib=c["peak_rss_gib"], load_before=before, load_after=load())
    res["rank"][str(w)] = r
    write_json(res_path, res)
    print(f"  calls {', '.join(f'{x:.1f}' for x in r['calls_s'])} s; found {r['found']:.1%}",
          flush=True)
  print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))


def postings_per_query(d: str) -> float:
  """Mean postings a query's distinct terms touch (summed over shards): the work of a search."""
  from retrieval import index_io
  idx = index_io.load_index(os.path.join(d, "index", "all"), mmap=True, lazy_ids=True)
  turns = read_json(os.path.join(d, "topiocqa_train.json"))
  total = 0
  for t in turns:
    terms = np.unique(np.asarray(idx.analyze(t["Question"]), np.int64))
    for sh in idx.shards:
      total += int(np.sum(sh.indptr[terms + 1].astype(np.int64) - sh.indptr[terms]))
  return total / len(turns)


def machine() -> str:
  with open("/proc/cpuinfo") as f:
    cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "?")
  with open("/proc/meminfo") as f:
    mem = next(int(x.split()[1]) for x in f if x.startswith("MemTotal"))
  return f"{os.cpu_count()} x {cpu}, {mem / 2**20:.0f} GiB, Python {sys.version.split()[0]}, " \
         f"numpy {np.__version__}"


# ------------------------------------------------------------------------------ correctness
def check_main(args) -> None:
  """Ranks and top-k lists of the memory-mapped index (in-process, `search_dense`, pooled)
  equal the in-memory index built from the same collection (`build_bm25`)."""
  from cqr_jax import config as cfglib
  from cqr_jax.data import topiocqa
  from retrieval import index_io
  from retrieval.bm25 import build_bm25
  from retrieval.gold_rank import GoldRanker
  from retrieval.rank_pool import RankPool
  from train import common
  d = os.path.abspath(args.dir)
  coll = topiocqa.open_collection(d, progress=False)
  cfg = cfglib.resolve(overrides=settings(d, 2))
  p = common.bm25_params(cfg.retrieval)
  mem = build_bm25(coll, kind=p.kind, k1=p.k1, b=p.b, analyzer=p.analyzer, show_progress=False)
  part = os.path.join(d, "index", "all")
  mm = index_io.load_index(part, mmap=True, lazy_ids=True)
  ds = common.load_split(cfg, "train")
  texts, qids = [x.question for x in ds.turns], [x.qid for x in ds.turns]
  sample = texts[:args.sample]
  want = mem.search(sample, 100)
  with RankPool(2, [part]) as pool:
    got = {"mmap search": mm.search(sample, 100), "mmap search_dense": mm.search_dense(sample, 100),
           "pool of 2": pool.search(part, sample, 100)}
  for name, (rows, scores) in got.items():
    assert np.array_equal(rows, want[0]) and np.array_equal(scores, want[1]), name
  ref = GoldRanker(mem, ds.qrels, k=100, max_query_words=1024).ranks(texts, qids)
  grpo = common.build_ranker(cfg, ds, cfg.retrieval.reward_max_words).ranks(texts, qids)
  common.close_rank_pools()
  assert np.array_equal(ref, grpo), "GRPO ranker differs from the in-memory index"
  print(f"OK: top-100 rows and scores of {len(sample)} queries equal for {list(got)} and the "
        f"in-memory LuceneBM25; gold ranks of all {len(texts)} queries equal (GRPO ranker, 2 "
        f"workers); found in top 100: {np.mean(ref > 0):.1%}, at rank 1: {np.mean(ref == 1):.1%}")


# ------------------------------------------------------------------------------ report
def report_main(args) -> None:
  runs = [read_json(os.path.join(d, "results.json")) for d in args.dirs]
  runs.sort(key=lambda r: r["generated"]["docs"])
  print(f"Machine: {runs[0]['machine']}\n")
  print("| passages | words / passage | analyzed types | postings / passage | generate (s) | "
        "collection offsets (s) | `cqr-jax index` wall (CPU) s | build peak RSS (GiB) | index "
        "on disk (GiB) | load after |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in runs:
    g, b = r["generated"], r["build"]
    n = g["docs"]
    print(f"| {n / 1e6:g}M | {g['words'] / n:.1f} | {b['terms'] / 1e6:.2f}M | "
          f"{b['postings'] / n:.1f} | {g.get('gen_s', float('nan')):.0f} | "
          f"{r['collection']['wall_s']:.0f} | {b['wall_s']:.0f} ({b['cpu_s']:.0f}) | "
          f"{b['peak_rss_gib']:.2f} | {b['index_bytes'] / 2**30:.2f} | {b['load_after']} |")
  print("\n| passages | rank workers | pool start + open (s) | wall per call (s) | CPU per call, "
        "workers + parent (s) | CPU ms / query | worker RSS, anon + file (GiB) | found in top "
        "100 / at rank 1 | load before -> after |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in runs:
    for w, x in sorted(r["rank"].items()):
      rss, q = x["rss_gib"], x["queries"]
      cpu = [a + b for a, b in zip(x["cpu_workers_s"], x["cpu_parent_s"])]
      i = best_call(x)
      print(f"| {r['generated']['docs'] / 1e6:g}M | {w}{' (in-process)' if w == '0' else ''} | "
            f"{x['open_s']:.1f} | {', '.join(f'{c:.1f}' for c in x['calls_s'])} | "
            f"{x['cpu_workers_s'][i]:.1f} + {x['cpu_parent_s'][i]:.2f} | "
            f"{1e3 * cpu[i] / q:.1f} | {max(rss['RssAnon']):.2f} + {max(rss['RssFile']):.2f} | "
            f"{x['found']:.1%} / {x['rank1']:.1%} | {x['load_before']} -> {x['load_after']} |")
  if len(runs) >= 2:
    extrapolate(runs[0], runs[-1])


def best_call(x: dict) -> int:
  """The call with the least CPU time, the first (cold) call left out when there are others."""
  cpu = [a + b for a, b in zip(x["cpu_workers_s"], x["cpu_parent_s"])]
  first = 1 if len(cpu) > 1 else 0
  return first + int(np.argmin(cpu[first:]))


def fit(n1, y1, n2, y2):
  b = (y2 - y1) / (n2 - n1)
  return y1 - b * n1, b


def extrapolate(r1, r2) -> None:
  """Straight lines in N through the two sizes, evaluated at TopiOCQA's and QReCC's on one host.

  A step's reward on a host with W rank workers: 1,024 x (workers' CPU per query / W + the
  parent's CPU per query), one worker per physical core (vCPUs / 2) at this machine's per-core
  speed; CPU time, not wall time, because this machine is shared (wall time is reported too).
  """
  n1, n2, m = r1["generated"]["docs"], r2["generated"]["docs"], 1e6
  x1, x2 = r1["rank"]["1"], r2["rank"]["1"]
  q = x1["queries"]
  cw = lambda x: x["cpu_workers_s"][best_call(x)] / q
  cp = lambda x: x["cpu_parent_s"][best_call(x)] / q
  wa, wb = fit(n1, cw(x1), n2, cw(x2))
  pa, pb = fit(n1, cp(x1), n2, cp(x2))
  p1, p2 = r1["postings_per_query"], r2["postings_per_query"]
  ba, bb = fit(n1, r1["build"]["cpu_s"], n2, r2["build"]["cpu_s"])
  sa, sb = fit(n1, r1["build"]["index_bytes"] / 2**30, n2, r2["build"]["index_bytes"] / 2**30)
  # A worker's own memory: its vocabulary dict (grows with the types, Heaps' law V = k N^beta
  # through the two points) and 9 bytes of score buffers per passage, on a fixed base.
  v1, v2 = r1["build"]["terms"], r2["build"]["terms"]
  beta = np.log(v2 / v1) / np.log(n2 / n1)
  types = lambda n: v2 * (n / n2) ** beta
  anon = lambda r: max(r["rank"]["1"]["rss_gib"]["RssAnon"]) - 9 * r["generated"]["docs"] / 2**30
  aa, ab = fit(v1, anon(r1), v2, anon(r2))
  worker = lambda n: aa + ab * types(n) + 9 * n / 2**30
  # The build's peak: a straight line in N (an upper bound: the types grow slower), and one in
  # the types (a lower one: the per-passage arrays are a few tens of bytes).
  peak = lambda r: r["build"]["peak_rss_gib"]
  ma, mb = fit(n1, peak(r1), n2, peak(r2))
  ta, tb = fit(v1, peak(r1), v2, peak(r2))
  par = {}
  for r in (r1, r2):
    if "2" in r["rank"]:
      x, y = r["rank"]["1"], r["rank"]["2"]
      par[r["generated"]["docs"]] = (min(x["calls_s"][1:] or x["calls_s"])
                                     / min(y["calls_s"][1:] or y["calls_s"]))
  print(f"\n### Cost model\n\nStraight lines in N through the {n1 / m:g}M and {n2 / m:g}M "
        "points:\n")
  print(f"- search, one worker's CPU per query: {wa * 1e3:.2f} ms + {wb * m * 1e3:.2f} ms per 1M "
        f"passages; a query's terms have {p1 / (n1 / m):,.0f} / {p2 / (n2 / m):,.0f} postings per "
        f"1M passages, {1e9 * cw(x1) / p1:.1f} / {1e9 * cw(x2) / p2:.1f} ns of CPU per posting;")
  print(f"- the parent (truncation, hand-off, ids, gold match; serial): {pa * 1e3:.3f} ms + "
        f"{pb * m * 1e3:.4f} ms per 1M passages per query;")
  print("- 2 workers against 1, wall time of the best call: " + ", ".join(
      f"{v:.2f}x at {k / m:g}M" for k, v in par.items()) + " (2 cores, shared);")
  print(f"- build (`cqr-jax index`, one process): {ba:.0f} + {bb * m:.0f} CPU s per 1M passages; "
        f"peak RSS {ma:.2f} + {mb * m:.3f} GiB per 1M passages or {ta:.2f} + {tb * m:.3f} GiB per "
        f"1M types; index {sa:.3f} + {sb * m:.3f} GiB per 1M; "
        f"analyzed types {v1 / m:.2f}M / {v2 / m:.2f}M (Heaps exponent {beta:.2f}); a worker's "
        f"anonymous memory {aa:.2f} GiB + {ab * 2**30:.0f} bytes per type (its vocabulary) + "
        f"9 bytes per passage (score buffers).\n")
  print("| corpus | host: vCPUs, RAM (GB) | W | CPU s / query | reward per 1,024-query step (s) "
        "| index (GiB, page cache) | types | W workers' memory (GiB) | build (h, CPU) | build "
        "peak (GiB) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  out = {}
  for name, n in (("TopiOCQA", TOPIOCQA_DOCS), ("QReCC", QRECC_DOCS)):
    c_w, c_p = wa + wb * n, pa + pb * n
    for host, (vcpu, ram) in HOSTS.items():
      w = vcpu // 2
      step = 1024 * (c_w / w + c_p)
      out[name, host] = step
      print(f"| {name} {n / m:g}M | {host}: {vcpu}, {ram} | {w} | {c_w + c_p:.3f} | {step:.1f} | "
            f"{sa + sb * n:.0f} | {types(n) / m:.1f}M | {w * worker(n):.0f} | "
            f"{(ba + bb * n) / 3600:.1f} | {ta + tb * types(n):.1f}-{ma + mb * n:.1f} |")
  v5p = out["TopiOCQA", next(h for h in HOSTS if h.startswith("v5p"))]
  share = v5p / (60 + v5p)
  print(f"\nGoal at 25.7M on one v5p host: <= 5 s per step: {v5p:.1f} s, "
        f"{'met' if v5p <= 5 else 'NOT met'}; reward < 10% of a step with ~60 s of device work "
        f"(reward in series): {share:.1%}, {'met' if share < 0.1 else 'NOT met'}.")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  r = sub.add_parser("run", help="generate (once), build with `cqr-jax index`, time gold ranks")
  r.add_argument("--docs", type=int, required=True)
  r.add_argument("--queries", type=int, default=1024)
  r.add_argument("--dir", required=True)
  r.add_argument("--seed", type=int, default=0)
  r.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  r.add_argument("--reps", type=int, default=3, help="timed rank calls per worker count")
  r.add_argument("--max-postings", type=int, default=20_000_000)
  r.add_argument("--rebuild", action="store_true")
  r.add_argument("--gen-only", action="store_true", help="write the collection, measure nothing")
  k = sub.add_parser("_rank")
  k.add_argument("--dir", required=True)
  k.add_argument("--workers", type=int, required=True)
  k.add_argument("--reps", type=int, default=3)
  c = sub.add_parser("check", help="ranks equal to the in-memory index (a small --dir)")
  c.add_argument("--dir", required=True)
  c.add_argument("--sample", type=int, default=128)
  p = sub.add_parser("report", help="markdown tables and the extrapolation from run folders")
  p.add_argument("dirs", nargs="+")
  args = ap.parse_args()
  {"run": run_main, "_rank": rank_main, "check": check_main, "report": report_main}[args.cmd](args)


if __name__ == "__main__":
  main()
