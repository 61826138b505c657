"""HF export of SmolLM2-135M-Instruct: our streaming `export_hf` vs transformers' `save_pretrained`.

Both write the same f32 weights (the shipped GGUF, dequantized) as safetensors, in one process, in
alternating rounds. Reported per writer: wall seconds and the peak resident-memory increase over the
writer's starting point (sampled every 5 ms), i.e. the host memory the export itself needs beyond
the model it exports. Also our bf16 export and the GGUF -> Flax import (`load_gguf`).

  python bench/bench_export.py               # 3 rounds
  python bench/bench_export.py --rounds 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def measure(fn):
  """(seconds, peak RSS increase in MB) of fn()."""
  base, peak, stop = rss_mb(), [0.0], threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], rss_mb())
      time.sleep(0.005)

  t = threading.Thread(target=sample, daemon=True)
  t.start()
  t0 = time.perf_counter()
  fn()
  dt = time.perf_counter() - t0
  stop.set()
  t.join()
  return dt, max(peak[0], rss_mb()) - base


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()
  import torch
  from transformers import AutoModelForCausalLM
  from cqr_jax.models.gguf import load_gguf
  from cqr_jax.models.hf_export import export_hf
  from cqr_jax.testing import smollm2_gguf_path

  gguf = smollm2_gguf_path()
  dt, mem = measure(lambda: load_gguf(gguf))
  print(f"load_gguf (GGUF -> Flax, first call): {dt:.2f} s, +{mem:.0f} MB")
  model, config = load_gguf(gguf)
  work = tempfile.mkdtemp(prefix="bench-export-")
  ref_dir = export_hf(model, config, os.path.join(work, "ref"))
  hf = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
  size_mb = os.path.getsize(os.path.join(ref_dir, "model.safetensors")) / 2**20
  rows = {"ours f32": [], "ours bf16": [], "transformers save_pretrained f32": []}
  for r in range(args.rounds):
    for name in rows:
      out = os.path.join(work, f"r{r}-{name.replace(' ', '_')}")
      if name == "ours f32":
        fn = lambda: export_hf(model, config, out)  # noqa: E731
      elif name == "ours bf16":
        fn = lambda: export_hf(model, config, out, dtype="bfloat16")  # noqa: E731
      else:
        fn = lambda: hf.save_pretrained(out)  # noqa: E731
      rows[name].append(measure(fn))
      shutil.rmtree(out)
  shutil.rmtree(work)
  print(f"\nSmolLM2-135M f32 safetensors: {size_mb:.0f} MB; best of {args.rounds} rounds\n")
  print("| writer | seconds | MB/s (f32 bytes) | peak RSS increase (MB) |")
  print("|---|---|---|---|")
  peer = min(t for t, _ in rows["transformers save_pretrained f32"])
  for name, res in rows.items():
    t = min(x for x, _ in res)
    m = min(y for _, y in res)
    print(f"| {name} | {t:.2f} | {size_mb / t:.0f} | {m:.0f} |")
  print(f"\nours f32 / transformers time ratio: {min(t for t, _ in rows['ours f32']) / peer:.2f}")


if __name__ == "__main__":
  main()
