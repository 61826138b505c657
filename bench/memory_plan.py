"""Compiler memory plan (issue 9): per-device bytes of the real GRPO update and the real sampler
program for Qwen2.5-3B / Llama-3.2-3B on meshes of 8-32 devices, from the compiler.

No weights are made: parameters, AdamW state and batches are `jax.ShapeDtypeStruct`s carrying the
shardings the trainer gives them (`cqr_jax.sharding.state_shardings`, batch rows over data x fsdp);
`jax.jit(...).lower(...).compile().memory_analysis()` reports the per-device buffer sizes after
SPMD partitioning. Programs, as `train/grpo.py` runs them:
- "train": `train.steps.make_grpo_update` (f32 master params + AdamW, bf16 matmul operands, remat
  per layer, the 1,024-rollout batch cut into micro-batches of `micro` rows per device), jitted
  as `steps.jit_state_step` does (state donated, output shardings pinned to the input's).
- "sampler": `cqr_jax.sampler._generate_program` as `Sampler.generate` calls it on an
  accelerator (bf16 compute, bf16 KV cache, parameters cast to bf16 inside): 128 prompts of
  1,536 tokens, 8 samples each, 1,024 new tokens.
By default both get sharding constraints that keep batch rows on data x fsdp (see
`_micro_constraint`, `_activation_constraints`, `_linear_constraints`: without them GSPMD
replicates the activations, 1.9 TB/device for the 3B train step); `--as-written` drops them.
Besides the program's own bytes the chip holds what lives across the step: the frozen reference
policy (f32, as train/grpo.py copies it) always, and the AdamW moments while sampling.
Compilers: fake CPU devices (XLA:CPU with its memory-minimising scheduler), or `--target
tpu:<topology>`: deviceless ahead-of-time compilation by the TPU compiler in libtpu. Each job
runs in its own subprocess; results are appended to a JSON-lines file.

  python bench/memory_plan.py --out bench/results/memory_plan.jsonl          # the default set
  python bench/memory_plan.py --jobs "qwen2.5-3b:train:1,16,1:2"            # one job, micro 2
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
import subprocess
import sys
import time

MODELS = {"qwen2.5-3b": "qwen2p5_3b", "llama3.2-3b": "llama3p2_3b",
          "smollm2-135m": "smollm2_135m"}  # the last: a quick smoke run
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
  # train: pin each micro-batch's rows over data x fsdp (see _micro_constraint). False lowers
  # train/steps.py exactly as it is.
  constrain_micro: bool = True
  # train: also pin the activations between layers and before the LM head to batch rows over
  # data x fsdp (see _activation_constraints).
  constrain_acts: bool = True
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
                            remat=job.remat, **extra)


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


@contextlib.contextmanager
def _raw_steps():
  """make_grpo_update hands its update function to steps.jit_state_step, which jits on the first
  call; capture the function instead so it can be lowered on abstract inputs."""
  from train import steps
  real = steps.jit_state_step
  steps.jit_state_step = lambda fn: fn
  try:
    yield
  finally:
    steps.jit_state_step = real


@contextlib.contextmanager
def _micro_constraint(mesh):
  """steps._split_micro reshapes the [B, ...] batch (rows over data x fsdp) to [M, B / M, ...].
  Device d holds a contiguous block of rows, so after the reshape XLA shards the micro-batch
  index M instead of the rows; the scan then slices a sharded axis, every micro-batch arrives
  unsharded over the batch, and the activations take the parameters' fsdp sharding of the model
  dimension instead (XLA warns "Involuntary full rematerialization"): each device then holds
  whole-micro-batch attention scores. Constraining the rows of each micro-batch back onto
  data x fsdp (one all-to-all of the input batch per step) restores data parallelism inside
  the scan."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from train import steps
  real = steps._split_micro

  def split(x, n_micro):
    y = real(x, n_micro)
    spec = P(None, ("data", "fsdp"), *([None] * (y.ndim - 2)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))

  steps._split_micro = split
  try:
    yield
  finally:
    steps._split_micro = real


@contextlib.contextmanager
def _activation_constraints(mesh):
  """Pins the residual stream [B, T, D] at every layer boundary, and the final hidden states
  before the chunked LM head, to rows over data x fsdp. Without it GSPMD (Auto axes) may follow
  the parameters' fsdp sharding of D into the activations and all-gather the micro-batch rows
  instead of the weights (FSDP's intent: gather weights, keep rows local)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cqr_jax.models import decoder
  real_layer, real_head = decoder._remat_layer, decoder.chunked_logprobs
  rows = lambda x: jax.lax.with_sharding_constraint(  # noqa: E731
      x, NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1)))))

  def layer(block, apply, x, remat):  # x: [B, T, D], or (prompts, completions) when grouped
    return jax.tree.map(rows, real_layer(block, apply, jax.tree.map(rows, x), remat))

  def head(h_btd, *args, **kw):
    return real_head(rows(h_btd), *args, **kw)

  decoder._remat_layer, decoder.chunked_logprobs = layer, head
  try:
    yield
  finally:
    decoder._remat_layer, decoder.chunked_logprobs = real_layer, real_head


@contextlib.contextmanager
def _linear_constraints(mesh):
  """Sampler: pins the input and output rows of every projection (`layers.Linear`) and the
  embedding output to data x fsdp. As written, the prompt pass follows the parameters' fsdp
  sharding of D and computes every prompt's MLP on every device (f32 [128, 1,536, 11,008] per
  device for Qwen2.5-3B)."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cqr_jax.models import layers
  real_linear, real_embed = layers.Linear.__call__, layers.Embed.__call__
  rows = lambda x: jax.lax.with_sharding_constraint(  # noqa: E731
      x, NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1)))))

  def linear(self, x, compute_dtype):
    return rows(real_linear(self, rows(x), compute_dtype))

  def embed(self, tokens):
    return rows(real_embed(self, tokens))

  layers.Linear.__call__, layers.Embed.__call__ = linear, embed
  try:
    yield
  finally:
    layers.Linear.__call__, layers.Embed.__call__ = real_linear, real_embed


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
    def batch_arr(shape, dtype):
      spec = P(("data", "fsdp"), *([None] * (len(shape) - 1)))
      return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    from train.rollout_batch import group_size
    m = group_size(job.n, job.micro * dp, dp)  # as rollout_batch.assemble groups rollouts
    g = rows // m
    batch = {"prompt": batch_arr((g, job.prompt_len), jnp.int32),
             "prompt_mask": batch_arr((g, job.prompt_len), jnp.bool_),
             "completion": batch_arr((g, m, job.gen_len), jnp.int32),
             "completion_mask": batch_arr((g, m, job.gen_len), jnp.bool_),
             "ref_logp": batch_arr((g, m, job.gen_len), jnp.float32),
             "adv": batch_arr((g, m), jnp.float32)}
    state = steps.TrainState(params=params_sds, opt_state=opt_sds,
                             step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
    with _raw_steps():
      update = steps.make_grpo_update(graphdef, rest, tx, GRPOLossConfig(), temperature=0.7,
                                      micro_batch=job.micro * dp)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    fn = jax.jit(update, donate_argnums=(0,), out_shardings=(shardings, None))
    with contextlib.ExitStack() as stack:
      if job.constrain_micro:
        stack.enter_context(_micro_constraint(mesh))
      if job.constrain_acts:
        stack.enter_context(_activation_constraints(mesh))
      lowered = fn.lower(state, batch)
    # Resident next to the update: the frozen reference policy.
    extra = resident["ref_params_f32"]
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
    bf16 = jnp.dtype(jnp.bfloat16)
    with jax.set_mesh(mesh), (_linear_constraints(mesh) if job.constrain_acts
                              else contextlib.nullcontext()):
      lowered = sampler_lib.jitted_program().lower(
          gdef, state_sds, ids, mask, key, scalar(jnp.int32), scalar(jnp.float32), None, eos,
          n=job.n, gen_len=job.gen_len, top_k=0, pad_id=0, cache_dtype=bf16,
          compute_dtype="bfloat16", prefill_dtype="bfloat16", param_dtype=bf16,
          attention="matmul", scan=bool(abstract.config.scan_layers),
          batch_spec=("data", "fsdp"))
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


def markdown(results: list[dict]) -> str:
  head = ("| model | compiler | devices | mesh (data, fsdp, tensor) | program | per device | "
          "arguments | outputs | aliased | temps | program total | + resident | peak / chip | "
          "fits (90% of HBM) | compile (s) |\n|" + "---|" * 15)
  lines = [head]
  g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
  order = lambda r: (r["model"], r.get("target", "cpu"), r["devices"], tuple(r["mesh"]),  # noqa
                     r["program"], not r.get("constrain_micro", True))
  for r in sorted(results, key=order):
    dp = r["mesh"][0] * r["mesh"][1]
    if r["program"] == "train":
      what = f"{r['micro']} seq / micro-batch"
    else:
      what = f"{r['prompts'] * r['n'] // dp} rollouts"
    if not (r.get("constrain_micro", True) and r.get("constrain_acts", True)):
      what += ", **as written** (no constraints)"
    if r.get("num_layers"):
      what += f", {r['num_layers']} layers"
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
  """Both models x meshes of 8, 16, 32 devices (fsdp over all) x both programs, then a data x
  fsdp variant and the train step exactly as train/steps.py is (no sharding constraints)."""
  jobs = []
  for devices in (16, 8, 32):
    for model in ("qwen2.5-3b", "llama3.2-3b"):
      for program in ("train", "sampler"):
        jobs.append(Job(model, program, (1, devices, 1)))
  for model in ("qwen2.5-3b", "llama3.2-3b"):
    jobs.append(Job(model, "train", (2, 16, 1)))
  jobs.append(Job("qwen2.5-3b", "train", (1, 16, 1), constrain_micro=False, constrain_acts=False))
  return jobs


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--job", help="run one job (JSON of Job fields) in this process, print JSON")
  ap.add_argument("--jobs", default="default",
                  help="'default', or ';'-separated model:program:data,fsdp,tensor[:micro] "
                  "(model: qwen2.5-3b, llama3.2-3b, smollm2-135m; program: train, sampler)")
  ap.add_argument("--out", default="bench/results/memory_plan.json",
                  help="JSON lines, appended (finished jobs are skipped on a rerun)")
  ap.add_argument("--timeout", type=float, default=900, help="seconds per job")
  ap.add_argument("--table", action="store_true", help="print the table of --out and exit")
  ap.add_argument("--target", default="cpu",
                  help="'cpu' (fake devices) or 'tpu:<topology>', e.g. tpu:v5p:2x2x4 (16 chips); "
                  "the TPU compiler needs libtpu importable (pip install libtpu; a --target "
                  "folder on PYTHONPATH is enough)")
  ap.add_argument("--num-layers", type=int, default=None, help="override the layer count")
  ap.add_argument("--as-written", action="store_true",
                  help="no sharding constraints: lower train/steps.py and the sampler as they are")
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
    print(markdown(results))
    return 0
  if args.jobs == "default":
    jobs = default_jobs()
  else:
    jobs = []
    for spec in args.jobs.split(";"):
      parts = spec.split(":")
      mesh = tuple(int(x) for x in parts[2].split(","))
      jobs.append(Job(parts[0], parts[1], mesh, *([int(parts[3])] if len(parts) > 3 else []),
                      constrain_micro=not args.as_written, constrain_acts=not args.as_written,
                      num_layers=args.num_layers, target=args.target))
  key = lambda d: (d["model"], d["program"], tuple(d["mesh"]), d["micro"],  # noqa: E731
                   d.get("constrain_micro", True), d.get("constrain_acts", True),
                   d.get("target", "cpu"), d.get("num_layers"))
  done = {key(r) for r in results if "error" not in r}
  env = dict(os.environ)
  need = max(j.devices for j in jobs)
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={need}").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  # XLA:CPU's default scheduler favours concurrency over memory: it hoists every layer's
  # rematerialised forward next to the original one and keeps the activations alive (a 3B train
  # step reported 230 GiB/device). The memory-minimising scheduler is what TPU/GPU compilers
  # approximate, so the plan uses it.
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in env["XLA_FLAGS"]:
    env["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  for job in jobs:
    if key(dataclasses.asdict(job)) in done:
      continue
    print(f"{job.model} {job.program} mesh={job.mesh} micro={job.micro} ...", flush=True)
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
  print(markdown(results))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
