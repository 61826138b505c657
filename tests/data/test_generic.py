"""The generic reader (MTRAG layout): every field, edge cases, bad input, the real MTRAG files."""

import json
import logging
import os

import pytest

from cqr_jax.data import load_dataset
from cqr_jax.data.generic import read_generic
from cqr_jax.data.types import DataError, Turn

MTRAG = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "mtrag")

CONVS = [
    {"conv_id": "c1", "domain": "govt", "source": "x", "turns": [
        {"turn_id": 1, "qid": None, "question": "Where is the library?", "answer": "Downtown."},
        {"turn_id": 2, "qid": "c1<::>2", "question": "Hours?", "evaluated": True,
         "rewrite_provided": "Library hours?", "rewrite_human": "What are the library hours?"},
        {"turn_id": 3, "qid": "c1<::>3", "question": "And on Sunday?", "answer": "",
         "rewrite_provided": ""},
        {"turn_id": 5, "qid": "c1<::>5", "question": "Parking?", "answer": "Yes."}]},
    {"conv_id": "c2", "turns": [
        {"turn_id": 1, "qid": "c2-1", "question": "Unjudged question", "answer": "a"},
        {"turn_id": 2, "qid": "c2-2", "question": "Gold is missing", "answer": "b"}]},
]
CORPUS = [{"id": "p 1", "domain": "govt", "text": "hours text", "title": "Hours"},
          {"id": "p2", "text": "sunday text"}, {"id": "p3", "text": "parking text"}]
QRELS = ("c1<::>2\t0\tp 1\t1\nc1<::>3\t0\tp2\t2\nc1<::>3\t0\tp3\t0\nc1<::>5 0 p3 1\n"
         "c2-2\t0\tnope\t1\n")


def write_folder(root, convs=CONVS, corpus=CORPUS, qrels=QRELS, split=None):
  os.makedirs(root, exist_ok=True)
  d = os.path.join(root, split) if split else root
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "conversations.jsonl"), "w") as f:
    f.writelines(json.dumps(c) + "\n" for c in convs)
  with open(os.path.join(root, "corpus.jsonl"), "w") as f:
    f.writelines(json.dumps(c) + "\n" for c in corpus)
  with open(os.path.join(d, "qrels.tsv"), "w") as f:
    f.write(qrels)
  return str(root)


def test_every_field(tmp_path):
  ds = read_generic(write_folder(tmp_path / "g"), "test")
  assert [t.qid for t in ds.turns] == ["c1<::>2", "c1<::>3", "c1<::>5"]
  assert ds.turns[0] == Turn(
      conv_id="c1", turn_id=2, qid="c1<::>2", question="Hours?",
      context=(("Where is the library?", "Downtown."),), gold_ids=("p 1",),
      rewrites={"provided": "Library hours?", "human": "What are the library hours?"},
      domain="govt")
  # Absent answer (turn 2) and empty answer (turn 3) show the question alone; grade 0 is no gold.
  assert ds.turns[2].context == (("Where is the library?", "Downtown."), ("Hours?", None),
                                 ("And on Sunday?", None))
  assert ds.turns[1].gold_ids == ("p2",) and ds.turns[1].rewrites == {}
  assert ds.qrels == {"c1<::>2": {"p 1": 1}, "c1<::>3": {"p2": 2}, "c1<::>5": {"p3": 1}}
  assert ds.collection[ds.collection.row_of("p 1")].contents == "Hours hours text"
  st = ds.stats
  assert (st["turns_read"], st["turns_not_scored"], st["turns_unjudged"]) == (6, 1, 1)
  assert (st["gold_ids_missing"], st["turns_no_gold_in_collection"]) == (1, 1)


def test_split_subfolders_and_streamed(tmp_path):
  root = write_folder(tmp_path / "g", split="train")
  a = load_dataset(root, "train")
  b = read_generic(root, "train", streamed=True, index_dir=str(tmp_path / "idx"), progress=False)
  assert a.turns == b.turns and a.qrels == b.qrels and len(b.collection) == 3
  with pytest.raises(DataError, match="no conversations.jsonl"):
    load_dataset(root, "test")


def test_strict_missing_gold(tmp_path):
  with pytest.raises(DataError, match=r"qrels.tsv: c2-2: gold passage id 'nope' is not in"):
    read_generic(write_folder(tmp_path / "g"), "test", strict=True)


@pytest.mark.parametrize("convs,match", [
    ([{"conv_id": "c", "turns": [{"turn_id": 2, "qid": None, "question": "a"},
                                  {"turn_id": 1, "qid": None, "question": "b"}]}],
     r"conversations.jsonl:1: conversation 'c' turn #2: turn_id 1 out of order"),
    ([{"conv_id": "c", "turns": [{"turn_id": 1, "qid": "q", "question": "  "}]}],
     r"conversations.jsonl:1: .*empty or missing question"),
    ([{"conv_id": "c", "turns": [{"turn_id": 1, "qid": "q"}]}], r"empty or missing question"),
    ([{"conv_id": "c", "turns": []}, {"conv_id": "c", "turns": []}],
     r"conversations.jsonl:2: duplicate conv_id 'c'"),
    ([{"conv_id": "c", "turns": [{"turn_id": None, "question": "q"}]}],
     r"conversation 'c' turn #1: a turn_id must be an integer or a non-empty string"),
    ([{"conv_id": "c", "turns": [{"turn_id": "1-1", "question": "a"},
                                  {"turn_id": "1-1", "question": "b"}]}],
     r"turn #2: duplicate turn_id '1-1'"),
])
def test_bad_conversations(tmp_path, convs, match):
  with pytest.raises(DataError, match=match):
    read_generic(write_folder(tmp_path / "g", convs=convs), "test")


def test_malformed_lines(tmp_path):
  root = write_folder(tmp_path / "g")
  with open(os.path.join(root, "conversations.jsonl"), "a") as f:
    f.write('{"conv_id": "broken",\n')
  with pytest.raises(DataError, match=r"conversations.jsonl:3: malformed JSON"):
    read_generic(root, "test")
  root = write_folder(tmp_path / "h")
  with open(os.path.join(root, "corpus.jsonl"), "a") as f:
    f.write("not json\n")
  with pytest.raises(DataError, match=r"corpus.jsonl:4: malformed JSON"):
    read_generic(root, "test")
  root = write_folder(tmp_path / "k", qrels="q1 0 p1\n")
  with pytest.raises(DataError, match=r"qrels.tsv:1: qrels line needs 4 fields"):
    read_generic(root, "test")


@pytest.mark.parametrize("sub,n_turns,n_passages", [("mtrag_un", 332, 1152),
                                                     ("mtrag_human_subset", 150, 350)])
def test_real_mtrag(sub, n_turns, n_passages):
  root = os.path.join(MTRAG, sub)
  if not os.path.isdir(root):
    pytest.skip(f"{root} is absent (the shared MTRAG sample is not on this machine)")
  ds = load_dataset(root, "test", strict=True)
  assert len(ds.turns) == n_turns and len(ds.collection) == n_passages
  assert ds.stats["gold_ids_missing"] == 0
  assert all(t.gold_ids and t.domain in {"govt", "clapnq", "cloud", "fiqa"} for t in ds.turns)
  assert all(t.context or t.turn_id == 1 for t in ds.turns)
  if sub == "mtrag_un":  # only each conversation's last turn is scored; 851 judgements
    assert sum(len(v) for v in ds.qrels.values()) == 851
    assert len({t.conv_id for t in ds.turns}) == n_turns
  else:
    assert sum("provided" in t.rewrites for t in ds.turns) > 100


def test_string_turn_ids(tmp_path):
  convs = [{"conv_id": "c", "turns": [
      {"turn_id": "3_2", "qid": "q1", "question": "First?", "answer": "A."},
      {"turn_id": "1-1", "qid": "q2", "question": "Second?", "answer": "B."},
      {"turn_id": "7", "qid": "q3", "question": "Third?"}]}]
  qrels = "q1\t0\tp2\t1\nq2\t0\tp3\t1\nq3\t0\tp2\t1\n"
  ds = read_generic(write_folder(tmp_path / "g", convs=convs, qrels=qrels), "test")
  assert [(t.turn_id, t.qid) for t in ds.turns] == [("3_2", "q1"), ("1-1", "q2"), (7, "q3")]
  assert ds.turns[2].context == (("First?", "A."), ("Second?", "B."))
  assert Turn.from_json(json.loads(json.dumps(ds.turns[0].to_json()))) == ds.turns[0]


def _path(cid, turns):
  return {"conv_id": cid, "domain": "govt", "turns": [
      {"turn_id": i + 1, "qid": q, "question": text, "answer": text.upper()}
      for i, (q, text) in enumerate(turns)]}


def test_flattened_topic_tree(tmp_path, caplog):
  # One conversation, two branches after its shared first two turns, flattened into two paths.
  shared = [("t1", "Where is the library?"), ("t2", "Hours?")]
  convs = [_path("tree<::>a", shared + [("t3a", "Parking?")]),
           _path("tree<::>b", shared + [("t3b", "Sunday?")])]
  qrels = "".join(f"{q}\t0\tp3\t1\n" for q in ("t1", "t2", "t3a", "t3b"))
  with caplog.at_level(logging.INFO, logger="cqr_jax"):
    ds = read_generic(write_folder(tmp_path / "g", convs=convs, qrels=qrels), "test")
  assert [t.qid for t in ds.turns] == ["t1", "t2", "t3a", "t3b"]
  assert [t.conv_id for t in ds.turns[:2]] == ["tree<::>a"] * 2
  full = (("Where is the library?", "WHERE IS THE LIBRARY?"), ("Hours?", "HOURS?"))
  assert ds.turns[2].context == ds.turns[3].context == full
  assert (ds.stats["qids_repeated"], ds.stats["turns_repeated"]) == (2, 2)
  assert set(ds.qrels) == {"t1", "t2", "t3a", "t3b"}
  assert "2 qids appear in several conversations" in caplog.text


def test_repeated_qid_with_another_question(tmp_path):
  convs = [_path("a", [("t1", "Where is the library?")]),
           _path("b", [("t0", "Hello"), ("t1", "Where is the museum?")])]
  root = write_folder(tmp_path / "g", convs=convs, qrels="t1\t0\tp3\t1\n")
  with pytest.raises(DataError, match=r"conversations.jsonl:2: qid 't1' repeats line 1's qid "
                     r"with a different question"):
    read_generic(root, "test")
