"""Streamed collection index: build / reopen / lookup / iterate speed and memory (issue 5).

Writes a QReCC-like JSONL of N passages (URL ids, ~40-word contents) and measures FileCollection
against the alternative it replaces, a Python dict {raw id: row} plus a list of texts, built
from the same file in the same run.

    python bench/collection_index.py --n 1000000
"""

import argparse
import json
import os
import random
import resource
import tempfile
import time

from cqr_jax.data.collection import FileCollection


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=1_000_000)
  ap.add_argument("--dir", default=None)
  args = ap.parse_args()
  d = args.dir or tempfile.mkdtemp()
  os.makedirs(d, exist_ok=True)
  path = os.path.join(d, "c.jsonl")
  raw = [f"http://www.site{i % 977}.com/page/{i}_p{i % 7}" for i in range(args.n)]
  with open(path, "w") as f:
    for r in raw:
      f.write(json.dumps({"id": r, "contents": "word " * 40}) + "\n")
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  c = FileCollection([path], "jsonl", os.path.join(d, "idx"), renumber=True, progress=False)
  build = time.perf_counter() - t
  t = time.perf_counter()
  c = FileCollection([path], "jsonl", os.path.join(d, "idx"), renumber=True, progress=False)
  reopen = time.perf_counter() - t
  q = random.Random(0).sample(raw, 10_000)
  t = time.perf_counter()
  rows = [c.row_of_raw(x) for x in q]
  lookup = (time.perf_counter() - t) / len(q)
  t = time.perf_counter()
  for r in rows:
    c[r]
  get = (time.perf_counter() - t) / len(q)
  rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  ids, texts = {}, []
  with open(path) as f:
    for i, line in enumerate(f):
      o = json.loads(line)
      ids[o["id"]] = i
      texts.append(o["contents"])
  dict_build = time.perf_counter() - t
  rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  idx = os.path.join(d, "idx")
  idx_mb = sum(os.path.getsize(os.path.join(idx, f)) for f in os.listdir(idx)) / 1e6
  print(f"N={args.n}: FileCollection build {build:.1f}s, reopen {reopen * 1e3:.1f}ms, "
        f"id lookup {lookup * 1e6:.0f}us, passage read {get * 1e6:.0f}us, index {idx_mb:.0f} MB on "
        f"disk, peak RSS +{(rss1 - rss0) / 1e3:.0f} MB | dict+list build {dict_build:.1f}s, "
        f"RSS +{(rss2 - rss1) / 1e3:.0f} MB beyond that")


if __name__ == "__main__":
  main()
