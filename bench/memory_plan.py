"""Compiler memory plan (issues 9, 32): per-device bytes of the real GRPO update and the real
sampler program for Qwen2.5-3B / Llama-3.2-3B on meshes of 8-32 devices, from the compiler.

No weights are made: parameters, AdamW state and batches are `jax.ShapeDtypeStruct`s carrying the
shardings the trainer gives them (`cqr_jax.sharding.state_shardings`, batch rows over data x fsdp);
`.lower(...).compile().memory_analysis()` reports the per-device buffer sizes after SPMD
partitioning. The programs are the library's, lowered as `train/grpo.py` runs them:
- "train": one micro-batch call of `train.steps.make_grpo_update(..., mesh=mesh)` (`.lower`: its
  forward and backward with the gradient accumulator donated, where the update peaks): f32
  master params, bf16 matmul operands, remat "full", the blocks as one scan
  (cqr_jax.config.ModelSection's defaults), the 1,024-rollout batch packed as
  rollout_batch.grpo_batch packs it with grpo.pack_rows 0 (a stream of a prompt and its m
  completions at full length; a call of `micro` x devices / m streams).
- "sampler": `cqr_jax.sampler._generate_program` under `jax.set_mesh`, as `Sampler.generate` calls
  it on an accelerator (bf16 compute, bf16 KV cache, parameters cast to bf16 inside, scanned
  blocks, no row compaction, no shared prefix): 128 prompts of 1,536 tokens, 8 samples each,
  1,024 new tokens.
The library keeps batch rows on data x fsdp inside both programs (cqr_jax/sharding.py
`constrain_rows`, `constrain_params`); `--no-constraints` lowers them without a mesh in context
(make_grpo_update(mesh=None), the sampler outside `jax.set_mesh`), i.e. GSPMD's own choice, to
show what the constraints buy. Besides the program's own bytes the chip holds what lives across
the step: the frozen reference policy (f32, as train/grpo.py copies it) always, and the AdamW
moments while sampling.
Compilers: fake CPU devices (XLA:CPU with its memory-minimising scheduler), or `--target
tpu:<topology>`: deviceless ahead-of-time compilation by the TPU compiler in libtpu. Each job
runs in its own subprocess; results are appended to a JSON-lines file.

  python bench/memory_plan.py --out bench/results/memory_plan.jsonl          # the default set
  python bench/memory_plan.py --jobs "qwen2.5-3b:train:1,16,1:2"            # one job, micro 2
  python bench/memory_plan.py --jobs "qwen2.5-3b:train:1,16,1" --num-layers 4  # fewer layers
  PYTHONPATH=/path/to/libtpu python bench/memory_plan.py --target tpu:v5p:2x2x4 \
      --jobs "qwen2.5-3b:sampler:1,16,1"
  python bench/memory_plan.py --out bench/results/memory_plan.jsonl --table  # markdown
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

MODELS = {"qwen2.5-3b": "qwen2p5_3b", "llama3.2-3b": "llama3p2_3b",
          "smollm2-135m": "smollm2_135m"}  # the last: a quick smoke run (tests/bench)
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Job:
  model: str                    # a key of MODELS
  program: str                  # "train" | "sampler"
  mesh: tuple[int, int, int]    # (data, fsdp, tensor)
  micro: int = 4                # train: sequences per device per micro-batch
  prompts: int = 128            # prompts per GRPO step (method.md 4.8)
  n: int = 8                    # samples per prompt
  prompt_len: int = 1536
  gen_len: int = 1024
  remat: str = "full"
  scan: bool = True             # the blocks as one lax.scan (the trainer's default)
  # False: no mesh in context while lowering, so none of the library's activation constraints.
  constraints: bool = True
  num_layers: int | None = None  # override (quick diagnostics); None = the preset's
  # "cpu": fake CPU devices (XLA:CPU). "tpu:<topology>" (e.g. "tpu:v5e:4x4"): deviceless
  # ahead-of-time compilation by the real TPU compiler (needs libtpu importable, see main()).
  target: str = "cpu"

  @property
  def devices(self) -> int:
    return math.prod(self.mesh)


# ------------------------------------------------------------------------------ abstract state

def _model_config(job: Job):
  from cqr_jax.models.config import ModelConfig
  extra = {} if job.num_layers is None else {"num_layers": job.num_layers}
  return ModelConfig.preset(MODELS[job.model], param_dtype="float32", compute_dtype="bfloat16",
                            remat=job.remat, scan_layers=job.scan, **extra)


def _with_shardings(tree, shardings):
  import jax
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  import jax
  import numpy as np
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _opt_shardings(opt_sds, params_sds, mesh):
  """AdamW moments take their parameter's sharding (matched by path suffix and shape), as
  `tx.init` on sharded parameters gives them; counters are replicated."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      params_sds)[0]}

  def one(path, x):
    key = jax.tree_util.keystr(path)
    for suffix, p in by_path.items():
      if key.endswith(suffix) and p.shape == x.shape:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=p.sharding)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  return jax.tree_util.tree_map_with_path(one, opt_sds)


def _stats(compiled) -> dict:
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes")}
  out["program_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                          - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def _devices(job: Job) -> list:
  import jax
  if job.target == "cpu":
    if jax.device_count() < job.devices:
      raise SystemExit(f"need {job.devices} devices, have {jax.device_count()}: set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={job.devices}")
    return jax.devices()[:job.devices]
  platform, _, topology = job.target.partition(":")
  if platform != "tpu" or not topology:
    raise ValueError(f"target {job.target!r}: expected 'cpu' or 'tpu:<topology>'")
  from jax.experimental import topologies
  kw = {"chip_config_name": "megacore"} if topology.startswith(("v4", "v5p")) else {}
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices
  if len(devices) != job.devices:
    raise ValueError(f"topology {topology} has {len(devices)} chips, mesh {job.mesh} needs "
                     f"{job.devices}")
  return list(devices)


def run_job(job: Job) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  from cqr_jax import schedules, sharding
  from cqr_jax.objectives.grpo import GRPOLossConfig
  from train import steps

  data, fsdp, tensor = job.mesh
  mesh = sharding.make_mesh(sharding.MeshConfig(data, fsdp, tensor), devices=_devices(job))
  rep = NamedSharding(mesh, P())
  cfg = _model_config(job)
  abstract = sharding.abstract_model(cfg)
  graphdef, params, rest = steps.split_model(abstract)
  params_sds = _with_shardings(params, sharding.state_shardings(params, mesh))
  tx = schedules.grpo_optimizer()
  opt_sds = _opt_shardings(jax.eval_shape(tx.init, params_sds), params_sds, mesh)
  resident = {"params_f32": _per_device_bytes(params_sds),
              "ref_params_f32": _per_device_bytes(params_sds),
              "adamw_moments": _per_device_bytes(opt_sds)}
  rows = job.prompts * job.n
  length = job.prompt_len + job.gen_len
  dp = data * fsdp
  t0 = time.perf_counter()
  if job.program == "train":
    from train import rollout_batch
    m = rollout_batch.group_size(job.n, job.micro * dp, dp)  # as rollout_batch.grpo_batch
    per_call = rollout_batch.streams_per_call(job.micro * dp, m, dp)
    # grpo.pack_rows 0: a stream holds its whole group at full length, so a call is `micro`
    # completions a chip; a smaller budget only takes rows from a call (an upper bound).
    k = rollout_batch.stream_rows(job.prompt_len, m, job.gen_len, 0)

    def call_arr(shape, dtype):  # [C = 1, P, ...], P over data x fsdp
      shape = (1, per_call) + shape
      return jax.ShapeDtypeStruct(shape, dtype,
                                  sharding=rollout_batch.call_sharding(mesh, len(shape)))

    stream = (k, job.gen_len)
    batch = rollout_batch.GRPOBatch(
        tokens=call_arr(stream, jnp.int32), segment=call_arr(stream, jnp.int32),
        position=call_arr(stream, jnp.int32), source=call_arr(stream, jnp.int32),
        unpack=call_arr((m, job.gen_len), jnp.int32), rollout=call_arr((m,), jnp.int32),
        lengths=jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep),
        adv=jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=rep),
        ref_logp=call_arr((m, job.gen_len), jnp.float32), prompt_width=job.prompt_len)
    state = steps.TrainState(params=params_sds, opt_state=opt_sds,
                             step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    update = steps.make_grpo_update(graphdef, rest, tx, GRPOLossConfig(), temperature=0.7,
                                    micro_batch=job.micro * dp,
                                    mesh=mesh if job.constraints else None)
    lowered = update.lower(state, batch)  # arguments: params, the gradient sum, one call
    # Resident next to a call: the AdamW moments and the frozen reference policy.
    extra = resident["adamw_moments"] + resident["ref_params_f32"]
  elif job.program == "sampler":
    from cqr_jax import sampler as sampler_lib
    gdef, full = nnx.split(abstract)
    state_sds = _with_shardings(full, sharding.state_shardings(full, mesh))
    prompt_sh = NamedSharding(mesh, P(("data", "fsdp"), None))
    ids = jax.ShapeDtypeStruct((job.prompts, job.prompt_len), jnp.int32, sharding=prompt_sh)
    mask = jax.ShapeDtypeStruct((job.prompts, job.prompt_len), jnp.bool_, sharding=prompt_sh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=rep)  # noqa: E731
    eos = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=rep)
    with jax.set_mesh(mesh) if job.constraints else contextlib.nullcontext():
      lowered = sampler_lib.jitted_program().lower(
          gdef, state_sds, ids, mask, key, scalar(jnp.int32), scalar(jnp.float32), None, eos,
          plan=sampler_lib.DecodePlan(
              n=job.n, gen_len=job.gen_len, top_k=0, pad_id=0, compute_dtype="bfloat16",
              prefill_dtype="bfloat16", cache_dtype="bfloat16", param_dtype="bfloat16",
              attention="matmul", scan=job.scan, shared=0, stages=(rows,),
              weights_first=(False,)))
    # Resident while sampling: the AdamW moments and the reference policy.
    extra = resident["adamw_moments"] + resident["ref_params_f32"]
  else:
    raise ValueError(f"unknown program {job.program!r}")
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - e.g. the TPU compiler's "Ran out of memory in hbm"
    msg = " ".join(str(e).split())
    return {**dataclasses.asdict(job), "devices": job.devices, "error": msg[:600],
            "lower_s": round(t1 - t0, 1), "compile_s": round(time.perf_counter() - t1, 1)}
  t2 = time.perf_counter()
  stats = _stats(compiled)
  kv_cache = (2 * cfg.num_layers * rows * length * cfg.num_kv_heads * cfg.head_dim * 2) // dp
  return {**dataclasses.asdict(job), "devices": job.devices, **stats, **resident,
          "resident_extra_bytes": extra, "peak_bytes": stats["program_bytes"] + extra,
          "kv_cache_bytes_formula": kv_cache, "num_params": cfg.num_params(),
          "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1)}


# ----------------------------------------------------------------------------------- the table

HBM_GIB = {"v5e": 16, "v4": 32, "v6e": 32, "v5p": 95}


def fits(peak_bytes: int, margin: float = 0.9) -> str:
  """TPU generations whose HBM per chip holds `peak_bytes` with 10% left for the runtime."""
  ok = [name for name, gib in HBM_GIB.items() if peak_bytes <= margin * gib * GIB]
  return ", ".join(ok) if ok else "none"


def _variant(r: dict) -> str:
  """What sets a result apart besides model, program and mesh."""
  parts = [f"{r['micro']} seq / micro-batch / chip"] if r["program"] == "train" else []
  if not r.get("scan", True):
    parts.append("unrolled blocks")
  if not r.get("constraints", True):
    parts.append("**no constraints**")
  if r.get("num_layers"):
    parts.append(f"{r['num_layers']} layers")
  if r["program"] == "sampler" and r.get("prompts", 128) != 128:
    parts.append(f"{r['prompts']} prompts per call (rollout.prompts_per_call)")
  if r.get("target", "cpu") != "cpu":
    parts.append(r["target"])
  return ", ".join(parts) or "-"


def gen_cache_bytes(r: dict) -> int:
  """Per-device bytes of a sampler job's bf16 generation cache: k and v [L, rows, KVH, G, Dh]."""
  job = Job(**{k: (tuple(v) if k == "mesh" else v) for k, v in r.items()
               if k in {f.name for f in dataclasses.fields(Job)}})
  cfg = _model_config(job)
  rows = job.prompts * job.n // (job.mesh[0] * job.mesh[1])
  return 2 * cfg.num_layers * rows * job.gen_len * cfg.num_kv_heads * cfg.head_dim * 2


# XLA:CPU runs a bf16 dot as an f32 one: in the sampler's decode loop it converts the whole
# loop-invariant bf16 generation cache to f32 once (2 x its bytes more), which a TPU, with bf16
# matrix units, does not (bench/results/memory_plan.md). The table's estimate takes it off.
CPU_SAMPLER_NOTE = "est. without XLA:CPU's f32 copy of the generation cache"


def summary(results: list[dict]) -> str:
  """Peak GiB per chip: one row per model x program x variant, one column per device count, for
  meshes with fsdp over all devices (data = tensor = 1); for XLA:CPU sampler jobs also the peak
  less 2 x the bf16 generation cache (`CPU_SAMPLER_NOTE`)."""
  rows, counts = {}, set()
  for r in results:
    if "error" in r or r["mesh"][0] != 1 or r["mesh"][2] != 1:
      continue
    counts.add(r["devices"])
    rows.setdefault((r["model"], r["program"], _variant(r)), {})[r["devices"]] = r["peak_bytes"]
    if r["program"] == "sampler" and r.get("target", "cpu") == "cpu" and r.get("constraints",
                                                                                True):
      variant = ", ".join(x for x in (_variant(r), CPU_SAMPLER_NOTE) if x != "-")
      rows.setdefault((r["model"], r["program"], variant), {})[r["devices"]] = (
          r["peak_bytes"] - 2 * gen_cache_bytes(r))
  counts = sorted(counts)
  lines = ["| model | program | variant | " + " | ".join(f"{c} chips" for c in counts) + " |",
           "|---|---|---|" + "---|" * len(counts)]
  for (model, program, variant), peaks in sorted(rows.items()):
    cells = [f"{peaks[c] / GIB:.2f}" if c in peaks else "-" for c in counts]
    lines.append(f"| {model} | {program} | {variant} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n\nPeak GiB per chip (program + resident).\n"


def markdown(results: list[dict]) -> str:
  head = ("| model | compiler | devices | mesh (data, fsdp, tensor) | program | per device | "
          "arguments | outputs | aliased | temps | program total | + resident | peak / chip | "
          "fits (90% of HBM) | compile (s) |\n|" + "---|" * 15)
  lines = [head]
  g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
  order = lambda r: (r["model"], r.get("target", "cpu"), r["devices"], tuple(r["mesh"]),  # noqa
                     r["program"], _variant(r))
  for r in sorted(results, key=order):
    dp = r["mesh"][0] * r["mesh"][1]
    what = f"{r['prompts'] * r['n'] // dp} rollouts" if r["program"] == "sampler" else ""
    what = ", ".join(x for x in (what, _variant(r)) if x and x != "-")
    first = (f"| {r['model']} | {r.get('target', 'cpu')} | {r['devices']} | {tuple(r['mesh'])} | "
             f"{r['program']} | {what} |")
    if "error" in r:
      lines.append(first + f" {r['error'][:160]} |" + " |" * 8)
      continue
    lines.append(
        first + f" {g(r['argument_size_in_bytes'])} | {g(r['output_size_in_bytes'])} | "
        f"{g(r['alias_size_in_bytes'])} | {g(r['temp_size_in_bytes'])} | "
        f"{g(r['program_bytes'])} | {g(r['resident_extra_bytes'])} | **{g(r['peak_bytes'])}** | "
        f"{fits(r['peak_bytes'])} | {r['compile_s']} |")
  return "\n".join(lines) + "\n\nAll sizes GiB per device.\n"


def default_jobs() -> list[Job]:
  """Both models x meshes of 16, 8, 32 devices (fsdp over all) x both programs, then both
  programs at 16 devices without the library's constraints (what they buy)."""
  jobs = []
  for devices in (16, 8, 32):
    for model in ("qwen2.5-3b", "llama3.2-3b"):
      for program in ("train", "sampler"):
        jobs.append(Job(model, program, (1, devices, 1)))
  for program in ("train", "sampler"):
    jobs.append(Job("qwen2.5-3b", program, (1, 16, 1), constraints=False))
  for prompts in (64, 32):  # the step's 128 prompts sampled in 2 or 4 calls
    jobs.append(Job("llama3.2-3b", "sampler", (1, 16, 1), prompts=prompts))
  return jobs


def _key(d: dict) -> tuple:
  """A job's identity in the results file (older records lack the newer fields)."""
  return (d["model"], d["program"], tuple(d["mesh"]), d["micro"], d.get("scan", True),
          d.get("constraints", True), d.get("target", "cpu"), d.get("num_layers"),
          d.get("prompts", 128), d.get("n", 8), d.get("prompt_len", 1536), d.get("gen_len", 1024))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--job", help="run one job (JSON of Job fields) in this process, print JSON")
  ap.add_argument("--jobs", default="default",
                  help="'default', or ';'-separated model:program:data,fsdp,tensor[:micro] "
                  "(model: qwen2.5-3b, llama3.2-3b, smollm2-135m; program: train, sampler)")
  ap.add_argument("--out", default="bench/results/memory_plan.jsonl",
                  help="JSON lines, appended (finished jobs are skipped on a rerun)")
  ap.add_argument("--timeout", type=float, default=900, help="seconds per job")
  ap.add_argument("--table", action="store_true", help="print the tables of --out and exit")
  ap.add_argument("--target", default="cpu",
                  help="'cpu' (fake devices) or 'tpu:<topology>', e.g. tpu:v5p:2x2x4 (16 chips); "
                  "the TPU compiler needs libtpu importable (pip install libtpu; a --target "
                  "folder on PYTHONPATH is enough)")
  ap.add_argument("--num-layers", type=int, default=None, help="override the layer count")
  ap.add_argument("--prompts", type=int, default=128,
                  help="sampler: prompts per call (rollout.prompts_per_call; 128 = a step's)")
  ap.add_argument("--no-scan", action="store_true", help="unrolled blocks instead of a scan")
  ap.add_argument("--no-constraints", action="store_true",
                  help="lower without a mesh in context: none of the library's activation "
                  "constraints (what they buy)")
  args = ap.parse_args(argv)
  if args.job:
    d = json.loads(args.job)
    d["mesh"] = tuple(d["mesh"])
    print("RESULT " + json.dumps(run_job(Job(**d))), flush=True)
    return 0
  results = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = [json.loads(line) for line in f if line.strip()]
  if args.table:
    print(summary(results) + "\n" + markdown(results))
    return 0
  if args.jobs == "default":
    jobs = default_jobs()
  else:
    jobs = []
    for spec in args.jobs.split(";"):
      parts = spec.split(":")
      mesh = tuple(int(x) for x in parts[2].split(","))
      jobs.append(Job(parts[0], parts[1], mesh, *([int(parts[3])] if len(parts) > 3 else []),
                      scan=not args.no_scan, constraints=not args.no_constraints,
                      num_layers=args.num_layers, target=args.target, prompts=args.prompts))
  done = {_key(r) for r in results if "error" not in r}
  env = dict(os.environ)
  need = max(j.devices for j in jobs)
  flags = re.sub(r"--xla_force_host_platform_device_count=(\d+)", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  # XLA:CPU's default scheduler favours concurrency over memory: it hoists every layer's
  # rematerialised forward next to the original one and keeps the activations alive (a 3B train
  # step reported 230 GiB/device). The memory-minimising scheduler is what TPU/GPU compilers
  # approximate, so the plan uses it.
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in env["XLA_FLAGS"]:
    env["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  for job in jobs:
    if _key(dataclasses.asdict(job)) in done:
      continue
    print(f"{job.model} {job.program} mesh={job.mesh} {_variant(dataclasses.asdict(job))} ...",
          flush=True)
    t0 = time.perf_counter()
    try:
      p = subprocess.run([sys.executable, __file__, "--job", json.dumps(dataclasses.asdict(job))],
                         env=env, capture_output=True, text=True, timeout=args.timeout)
      line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
      if line is None:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        r = {**dataclasses.asdict(job), "devices": job.devices, "error": tail[0][:200]}
      else:
        r = json.loads(line[len("RESULT "):])
    except subprocess.TimeoutExpired:
      r = {**dataclasses.asdict(job), "devices": job.devices,
           "error": f"compile did not finish in {args.timeout:.0f} s"}
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    print("  " + (r.get("error") or f"peak {r['peak_bytes'] / GIB:.2f} GiB/device "
                  f"(program {r['program_bytes'] / GIB:.2f}), compile {r['compile_s']} s"),
          flush=True)
    results.append(r)
    with open(args.out, "a") as f:
      f.write(json.dumps(r) + "\n")
  print(summary(results) + "\n" + markdown(results))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
