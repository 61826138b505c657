"""`cqr-jax index --dense`'s build (retrieval/dense_index.py): peak memory against corpus size
and --rows-per-shard, next to encoding the whole corpus in memory (what every stage did before).

Each configuration runs in a fresh process (peak RSS is the process's). Passages are generated
(Zipf words, ~100 words each) and streamed; the encoder is the tests' random 2-layer BERT
(hidden 64, MiniLM's tokenizer, max length 64: tests/retrieval/test_dense_index.py), so the
times are this pipeline's, not ANCE's. All CPU devices of the process form the mesh.

  python bench/bench_dense_index.py --passages 20000 80000 --rows-per-shard 4096 32768 \
      --out bench/results/dense_index.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _Passage:
  __slots__ = ("pid", "contents", "domain")

  def __init__(self, pid, contents):
    self.pid, self.contents, self.domain = pid, contents, None


def passages(n: int, seed: int = 0):
  """n generated passages, streamed: Zipf(1.1) words over 50k, 60-140 words each."""
  import numpy as np
  rng = np.random.default_rng(seed)
  for i in range(n):
    k = int(rng.integers(60, 141))
    words = np.minimum(rng.zipf(1.1, k), 50_000)
    yield _Passage(f"doc{i}", " ".join(f"w{w}" for w in words))


def one(n: int, rows: int, mode: str, work: str) -> dict:
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from retrieval import dense_index
  from retrieval.dense_encoder import DenseEncoder
  from tests.retrieval.test_dense_index import write_tiny_bert
  model = write_tiny_bert(os.path.join(work, "encoder"))
  mesh = Mesh(np.array(jax.devices()), ("d",))
  t0 = time.time()
  if mode == "index":
    enc = DenseEncoder.from_hf(model, "mean_norm", batch_size=64 * mesh.size, mesh=mesh)
    info = dense_index.encoder_info(model, "mean_norm", enc.max_length)
    m = dense_index.build_index(passages(n), os.path.join(work, "idx"), enc, info,
                                rows_per_shard=rows, progress=False)
    size = sum(s["bytes"] for s in m["shards"])
  else:  # the in-memory path: every text, then every embedding, held at once
    enc = DenseEncoder.from_hf(model, "mean_norm")
    texts = [p.contents for p in passages(n)]
    size = enc.encode(texts).nbytes
  return {"passages": n, "rows_per_shard": rows if mode == "index" else None, "mode": mode,
          "devices": mesh.size, "seconds": round(time.time() - t0, 1),
          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
          "embedding_mib": round(size / 2**20, 1)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--passages", type=int, nargs="+", default=[20_000, 80_000])
  p.add_argument("--rows-per-shard", type=int, nargs="+", default=[4096, 32768])
  p.add_argument("--out", default=None, help="markdown file for the table")
  p.add_argument("--one", nargs=3, metavar=("N", "ROWS", "MODE"), help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.one:
    with tempfile.TemporaryDirectory() as work:
      print(json.dumps(one(int(a.one[0]), int(a.one[1]), a.one[2], work)))
    return
  runs = [(n, r, "index") for n in a.passages for r in a.rows_per_shard]
  runs += [(n, 0, "memory") for n in a.passages]
  rows = []
  for n, r, mode in runs:
    out = subprocess.run([sys.executable, __file__, "--one", str(n), str(r), mode],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(rows[-1], flush=True)
  lines = ["| passages | build | rows per shard | devices | seconds | peak RSS MiB | "
           "embeddings MiB |", "|---|---|---|---|---|---|---|"]
  for x in rows:
    lines.append(f"| {x['passages']} | {x['mode']} | {x['rows_per_shard'] or '-'} | "
                 f"{x['devices']} | {x['seconds']} | {x['peak_rss_mib']} | "
                 f"{x['embedding_mib']} |")
  print("\n".join(lines))
  if a.out:
    with open(a.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
