"""The embedded benchmark: a seeded, deterministic conversational search dataset (issue 5).

A knowledge base of invented entities (castles, rivers, composers, companies, ships; see
`synthetic_kb`) with six attributes each gives one passage per (entity, attribute). Conversations of
3-6 turns open with an explicit question about an entity, then ask about it with pronouns ("When
was it built?") or ellipsis ("And the architect?"), sometimes shift to an entity of another type
(named) and return ("Back to the castle: who owns it today?"). Every turn has one gold passage,
an answer naming the entity, and an `oracle` rewrite (the entity resolved) in `Turn.rewrites`.
Without the entity's name a question matches the same attribute of every entity of its type, so
BM25 ranks the gold at random among them; with the name it ranks it first: rewriting matters and
copying the right name from the context is enough.

Train and test conversations use disjoint entities (same collection). Same (size, seed) gives the
same turns and the same bytes on disk (`write_synthetic`, readable by the generic reader).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
from typing import Any

from cqr_jax.data import synthetic_kb as kb
from cqr_jax.data.collection import MemoryCollection
from cqr_jax.data.dataset import Dataset
from cqr_jax.data.types import Passage, Turn

GENERATOR_VERSION = 2
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class SyntheticSize:
  entities_per_type: int
  train_conversations: int
  test_conversations: int
  min_turns: int = 3
  max_turns: int = 6
  test_entity_fraction: float = 0.25
  shift_prob: float = 0.5     # conversations of >= 4 turns that shift topic and return
  ellipsis_prob: float = 0.35  # follow-ups asked by ellipsis rather than a pronoun
  # "return": a shift to an entity of another type and back (the classic plan). "drift": the
  # topic moves on, one to two turns after the first question, to another entity (of the same
  # type with probability same_type_prob), and later follow-ups ask about the new one, so the
  # conversation's first question names the wrong entity for most turns.
  plan: str = "return"
  same_type_prob: float = 0.5


SIZES = {
    # 5 types x 67 x 6 = 2,010 passages; ~225 test turns whose topic drifts away from the
    # first question (train/data_report.py prints the gaps between the baselines and the oracle).
    "default": SyntheticSize(67, 300, 45, min_turns=4, plan="drift", shift_prob=0.8),
    "tiny": SyntheticSize(7, 40, 16),         # 210 passages
}


@dataclasses.dataclass(frozen=True)
class Entity:
  etype: kb.EType
  ref: str
  title: str
  pron: tuple[str, str, str]  # subject, possessive, object
  values: tuple[kb.Values, ...]  # per attribute of etype


@dataclasses.dataclass(frozen=True)
class GenTurn:
  question: str
  answer: str
  oracle: str
  phenomenon: str  # explicit | pronoun | ellipsis | shift | return
  pid: str
  entity: str


@dataclasses.dataclass(frozen=True)
class World:
  passages: tuple[Passage, ...]
  conversations: dict[str, tuple[tuple[GenTurn, ...], ...]]


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _fill(template: str, ent: Entity, values: kb.Values, resolve: bool) -> str:
  """Fills a template; resolve=True puts the entity's name where the pronouns are (oracle)."""
  it, its, obj = ((ent.ref, ent.ref + "'s", ent.ref) if resolve else ent.pron)
  return _cap(template.format(N=ent.ref, it=it, its=its, obj=obj, It=_cap(it), **values))


class _Names:
  """Unique invented single-word names (never a word of the templates)."""

  def __init__(self, rng: random.Random):
    self.rng = rng
    self.used = set()
    words = [kb.LEGENDS, kb.FISH, kb.INSTRUMENTS, kb.WORK_ADJ, kb.WORK_FORM, kb.PRODUCTS, kb.FATES]
    for t in kb.TYPES:
      words += [t.fillers, (t.ref, t.title, t.noun)]
      for a in t.attrs:
        words += [(a.passage, a.answer, a.explicit, a.noun), a.pronoun]
    for group in words:
      for s in group:
        self.used.update(w.lower() for w in re.findall(r"[A-Za-z]+", s))
    self.used.update(n.lower() for n in kb.FIRST_NAMES_F + kb.FIRST_NAMES_M)

  def new(self, endings: tuple[str, ...]) -> str:
    for _ in range(10_000):
      name = (self.rng.choice(kb.NAME_STARTS) + self.rng.choice(kb.NAME_MIDS)
              + self.rng.choice(endings))
      if name.lower() not in self.used:
        self.used.add(name.lower())
        return name
    raise RuntimeError("ran out of invented names; lower entities_per_type")


def _build_world(size: SyntheticSize, seed: int) -> tuple[World, dict[str, list[Entity]]]:
  rng = random.Random(seed)
  names = _Names(rng)
  first = kb.FIRST_NAMES_F + kb.FIRST_NAMES_M
  pools = kb.Pools(
      towns=[names.new(kb.TOWN_ENDINGS) for _ in range(60)],
      people=[f"{rng.choice(first)} {names.new(kb.FAMILY_ENDINGS)}" for _ in range(80)],
      families=[names.new(kb.FAMILY_ENDINGS) for _ in range(40)],
      mountains=[names.new(kb.PLACE_ENDINGS) for _ in range(15)],
      seas=[names.new(kb.PLACE_ENDINGS) for _ in range(8)])
  entities: dict[str, list[Entity]] = {}
  for t in kb.TYPES:
    ents = []
    for _ in range(size.entities_per_type):
      x = names.new(t.endings)
      if t.person:
        female = rng.random() < 0.5
        given = rng.choice(kb.FIRST_NAMES_F if female else kb.FIRST_NAMES_M)
        ref = t.ref.format(P=given, X=x)
        title = t.title.format(P=given, X=x)
        pron = ("she", "her", "her") if female else ("he", "his", "him")
      else:
        ref, title, pron = t.ref.format(X=x), t.title.format(X=x), ("it", "its", "it")
      ents.append(Entity(t, ref, title, pron, tuple(a.values(pools, rng) for a in t.attrs)))
    entities[t.key] = ents
  # Passages: one per (entity, attribute) plus a type-level filler sentence, in shuffled order.
  raw = []
  for t in kb.TYPES:
    for e in entities[t.key]:
      for ai, a in enumerate(t.attrs):
        text = _fill(a.passage, e, e.values[ai], resolve=False) + " " + rng.choice(t.fillers)
        raw.append(((t.key, e.ref, a.key), e.title, text))
  rng.shuffle(raw)
  pid_of = {key: f"doc{i}" for i, (key, _, _) in enumerate(raw)}
  passages = tuple(Passage(f"doc{i}", text, title) for i, (_, title, text) in enumerate(raw))
  # Disjoint entities for train and test conversations.
  split_ents: dict[str, list[Entity]] = {"train": [], "test": []}
  for t in kb.TYPES:
    ents = list(entities[t.key])
    rng.shuffle(ents)
    n_test = max(1, round(size.test_entity_fraction * len(ents)))
    split_ents["test"] += ents[:n_test]
    split_ents["train"] += ents[n_test:]
  convs = {}
  for split, n in (("train", size.train_conversations), ("test", size.test_conversations)):
    convs[split] = tuple(_conversation(rng, size, split_ents[split], pid_of) for _ in range(n))
  return World(passages, convs), split_ents


def _conversation(rng: random.Random, size: SyntheticSize, pool: list[Entity],
                  pid_of: dict) -> tuple[GenTurn, ...]:
  n = rng.randint(size.min_turns, size.max_turns)
  e1 = rng.choice(pool)
  plan = [(e1, "explicit")]
  if size.plan == "drift":
    plan += _drift_plan(rng, size, pool, e1, n)
  elif n >= 4 and rng.random() < size.shift_prob:
    s = rng.randint(2, n - 2)        # 0-based index of the shift turn
    r = rng.randint(s + 1, n - 1)    # and of the return turn
    e2 = rng.choice([e for e in pool if e.etype.key != e1.etype.key])
    for i in range(1, n):
      plan.append((e1, "follow") if i < s else (e2, "shift") if i == s else
                  (e2, "follow") if i < r else (e1, "return") if i == r else (e1, "follow"))
  else:
    plan += [(e1, "follow")] * (n - 1)
  unused = {id(e): rng.sample(range(len(e.etype.attrs)), len(e.etype.attrs)) for e, _ in plan}
  turns = []
  for ent, kind in plan:
    ai = unused[id(ent)].pop()
    a, values = ent.etype.attrs[ai], ent.values[ai]
    explicit = _fill(a.explicit, ent, values, resolve=False)
    answer = _fill(a.answer, ent, values, resolve=False)
    pron_t = rng.choice(a.pronoun)
    if kind in ("explicit", "shift"):
      q, oracle, phen = explicit, explicit, kind
    elif kind == "return":
      q = f"Back to the {ent.etype.noun}: " + _lower_first(_fill(pron_t, ent, values, False))
      oracle, phen = _fill(pron_t, ent, values, resolve=True), "return"
    elif rng.random() < size.ellipsis_prob:
      form = rng.choice(("And the {noun}?", "What about the {noun}?", "And {its} {noun}?"))
      q = _cap(form.format(noun=a.noun, its=ent.pron[1]))
      oracle, phen = explicit, "ellipsis"
    else:
      q, phen = _fill(pron_t, ent, values, False), "pronoun"
      oracle = _fill(pron_t, ent, values, True)
    turns.append(GenTurn(q, answer, oracle, phen, pid_of[(ent.etype.key, ent.ref, a.key)],
                         ent.ref))
  return tuple(turns)


def _drift_plan(rng: random.Random, size: SyntheticSize, pool: list[Entity], e1: Entity,
                n: int) -> list[tuple[Entity, str]]:
  """Turns 2..n of a "drift" conversation: follow-ups on e1, then (with probability shift_prob)
  a named shift to e2 after one or two turns, follow-ups on e2, and from six turns a second
  shift to e3."""
  plan, cur, i = [], e1, 1
  shifts = [rng.randint(1, 2)] if rng.random() < size.shift_prob else []
  if shifts and n >= 6:
    shifts.append(rng.randint(shifts[0] + 2, n - 2))
  seen = {id(e1)}
  while i < n:
    if i in shifts:
      same = rng.random() < size.same_type_prob
      cands = [e for e in pool if id(e) not in seen
               and (e.etype.key == cur.etype.key) == same]
      cur = rng.choice(cands)
      seen.add(id(cur))
      plan.append((cur, "shift"))
    else:
      plan.append((cur, "follow"))
    i += 1
  return plan


def _lower_first(s: str) -> str:
  return s[:1].lower() + s[1:]


def _size(size: str | SyntheticSize) -> SyntheticSize:
  if isinstance(size, SyntheticSize):
    return size
  if size not in SIZES:
    raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)}")
  return SIZES[size]


@functools.lru_cache(maxsize=4)
def build_world(size: str | SyntheticSize = "default", seed: int = 0) -> World:
  """The generated passages and conversations (cached per (size, seed))."""
  return _build_world(_size(size), seed)[0]


def qid_of(split: str, conv: int, turn: int) -> str:
  return f"synthetic-{split}_{conv}_{turn}"


def _turns(world: World, split: str) -> tuple[list[Turn], dict[str, str]]:
  turns, phen = [], {}
  for ci, conv in enumerate(world.conversations[split], 1):
    context: list[tuple[str, str | None]] = []
    for ti, g in enumerate(conv, 1):
      qid = qid_of(split, ci, ti)
      turns.append(Turn(conv_id=f"synthetic-{split}_{ci}", turn_id=ti, qid=qid, question=g.question,
                        context=tuple(context), gold_ids=(g.pid,), rewrites={"oracle": g.oracle}))
      phen[qid] = g.phenomenon
      context.append((g.question, g.answer))
  return turns, phen


def synthetic_dataset(size: str | SyntheticSize = "default", seed: int = 0,
                      split: str = "train") -> Dataset:
  """The benchmark split in memory. stats["phenomenon"] maps each qid to its turn kind."""
  if split not in SPLITS:
    raise ValueError(f"synthetic split must be one of {SPLITS}, got {split!r}")
  world = build_world(size, seed)
  turns, phen = _turns(world, split)
  qrels = {t.qid: {t.gold_ids[0]: 1} for t in turns}
  counts: dict[str, Any] = {}
  for p in phen.values():
    counts[f"turns_{p}"] = counts.get(f"turns_{p}", 0) + 1
  name = f"synthetic:{size if isinstance(size, str) else 'custom'}:{seed}"
  return Dataset(name=name, split=split, turns=turns, collection=MemoryCollection(world.passages),
                 qrels=qrels, stats=dict(conversations=len(world.conversations[split]), **counts,
                                         phenomenon=phen))


def _dump(obj: Any) -> str:
  return json.dumps(obj, ensure_ascii=False)


def write_synthetic(out_dir: str | os.PathLike, size: str | SyntheticSize = "default",
                    seed: int = 0) -> str:
  """Writes the benchmark in the generic layout: corpus.jsonl, {train,test}/conversations.jsonl
  and qrels.tsv, meta.json. Same (size, seed), same bytes. Returns out_dir."""
  out_dir = os.fspath(out_dir)
  world = build_world(size, seed)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "corpus.jsonl"), "w", encoding="utf-8", newline="\n") as f:
    for p in world.passages:
      f.write(_dump({"id": p.pid, "title": p.title, "text": p.text}) + "\n")
  for split in SPLITS:
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    with open(os.path.join(out_dir, split, "conversations.jsonl"), "w", encoding="utf-8",
              newline="\n") as fc, open(os.path.join(out_dir, split, "qrels.tsv"), "w",
                                        encoding="utf-8", newline="\n") as fq:
      for ci, conv in enumerate(world.conversations[split], 1):
        turns = []
        for ti, g in enumerate(conv, 1):
          qid = qid_of(split, ci, ti)
          turns.append({"turn_id": ti, "qid": qid, "question": g.question, "answer": g.answer,
                        "rewrite_oracle": g.oracle, "phenomenon": g.phenomenon,
                        "entity": g.entity})
          fq.write(f"{qid}\t0\t{g.pid}\t1\n")
        fc.write(_dump({"conv_id": f"synthetic-{split}_{ci}", "source": "cqr-jax synthetic",
                        "turns": turns}) + "\n")
  sz = _size(size)
  meta = {"generator_version": GENERATOR_VERSION, "seed": seed,
          "size": size if isinstance(size, str) else "custom", "config": dataclasses.asdict(sz),
          "passages": len(world.passages),
          "conversations": {s: len(world.conversations[s]) for s in SPLITS},
          "turns": {s: sum(len(c) for c in world.conversations[s]) for s in SPLITS}}
  with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8", newline="\n") as f:
    f.write(json.dumps(meta, indent=1, sort_keys=True) + "\n")
  return out_dir
