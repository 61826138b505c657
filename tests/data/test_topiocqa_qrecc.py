"""TopiOCQA and QReCC readers on small files in their released formats (method.md 1.2-1.4)."""

import json
import os
import shutil
import zipfile

import pytest

from cqr_jax.data import load_dataset
from cqr_jax.data.qrecc import read_qrecc
from cqr_jax.data.topiocqa import read_topiocqa
from cqr_jax.data.types import DataError, Turn


# ------------------------------------------------------------------------------------ TopiOCQA
def topiocqa_turns():
  return [
      {"Conversation_no": 1, "Turn_no": 1, "Question": "who sang bohemian rhapsody",
       "Answer": "Queen", "Context": [], "Topic": "Queen", "Topic_section": "Intro",
       "Rationale": "", "is_nq": True, "Additional_answers": []},
      {"Conversation_no": 1, "Turn_no": 2, "Question": "when was it released",
       "Answer": "1975", "Context": ["who sang bohemian rhapsody", "Queen"], "Topic": "Song",
       "Topic_section": "Release"},
      {"Conversation_no": 1, "Turn_no": 3, "Question": "who wrote it", "Answer": "UNANSWERABLE",
       "Context": ["who sang bohemian rhapsody", "Queen", "when was it released", "1975"],
       "Topic": "Song", "Topic_section": "Writing"},
      {"Conversation_no": 2, "Turn_no": 1, "Question": "what is a castle", "Answer": "a fort",
       "Context": [], "Topic": "Castle", "Topic_section": "Intro"},
  ]


def topiocqa_golds(turns):
  pids = ["5498209", "5498207", "", "77"]
  return [{"conv_id": t["Conversation_no"], "turn_id": t["Turn_no"], "question": t["Question"],
           "answers": [t["Answer"]], "negative_ctxs": [], "hard_negative_ctxs": [],
           "positive_ctxs": ([{"title": "x", "text": "y", "passage_id": p}, 
                              {"title": "x", "text": "z", "passage_id": "77"}] if p else [])}
          for t, p in zip(turns, pids)]


TSV = ("id\ttext\ttitle\n5498209\tBohemian Rhapsody is a song by Queen.\tBohemian Rhapsody [SEP] "
       "Intro\n5498207\tIt was released in 1975.\tBohemian Rhapsody [SEP] Release\n"
       "77\tA castle is a fort.\tCastle\n")


def write_topiocqa(root, turns=None, golds=None, split="dev"):
  turns = topiocqa_turns() if turns is None else turns
  golds = topiocqa_golds(turns) if golds is None else golds
  os.makedirs(os.path.join(root, "all_history"), exist_ok=True)
  with open(os.path.join(root, f"topiocqa_{split}.json"), "w") as f:
    json.dump(turns, f)
  with open(os.path.join(root, "all_history", f"{split}.json"), "w") as f:
    json.dump(golds, f)
  with open(os.path.join(root, "full_wiki_segments.tsv"), "w") as f:
    f.write(TSV)
  return str(root)


def test_topiocqa(tmp_path):
  root = write_topiocqa(tmp_path / "t")
  ds = load_dataset(f"topiocqa:{root}", "test", progress=False)  # "test" = the dev file
  assert ds.split == "dev" and [t.qid for t in ds.turns] == [
      "topiocqa-dev_1_1", "topiocqa-dev_1_2", "topiocqa-dev_2_1"]
  assert ds.turns[1] == Turn(conv_id="1", turn_id=2, qid="topiocqa-dev_1_2",
                             question="when was it released",
                             context=(("who sang bohemian rhapsody", "Queen"),),
                             gold_ids=("5498207",))
  # Only positive_ctxs[0] becomes a qrel (exactly one gold per query).
  assert ds.qrels == {"topiocqa-dev_1_1": {"5498209": 1}, "topiocqa-dev_1_2": {"5498207": 1},
                      "topiocqa-dev_2_1": {"77": 1}}
  p = ds.collection[ds.collection.row_of("5498207")]
  assert p.contents == "Bohemian Rhapsody Release It was released in 1975."
  assert ds.stats["turns_no_gold"] == 1  # turn 1_3 has no positive passage


def test_topiocqa_bad_input(tmp_path):
  turns = topiocqa_turns()
  golds = topiocqa_golds(turns)
  with pytest.raises(DataError, match="not aligned"):
    read_topiocqa(write_topiocqa(tmp_path / "a", turns, golds[::-1]), "dev", progress=False)
  bad = topiocqa_turns()
  bad[2]["Turn_no"] = 5
  with pytest.raises(DataError, match=r"turn numbers out of order \(turn 5 after 2\)"):
    read_topiocqa(write_topiocqa(tmp_path / "b", bad, topiocqa_golds(bad)), "dev", progress=False)
  bad = topiocqa_turns()
  bad[1]["Question"] = ""
  with pytest.raises(DataError, match=r"record 1 \(conversation 1, turn 2\): empty"):
    read_topiocqa(write_topiocqa(tmp_path / "c", bad, topiocqa_golds(bad)), "dev", progress=False)
  bad = topiocqa_turns()
  bad[1]["Context"] = ["only a question"]
  with pytest.raises(DataError, match="alternating questions and answers"):
    read_topiocqa(write_topiocqa(tmp_path / "d", bad, topiocqa_golds(bad)), "dev", progress=False)
  golds = topiocqa_golds(topiocqa_turns())
  golds[3]["positive_ctxs"][0]["passage_id"] = "999"
  root = write_topiocqa(tmp_path / "e", topiocqa_turns(), golds)
  ds = read_topiocqa(root, "dev", progress=False)
  assert ds.stats["gold_ids_missing"] == 1 and len(ds.turns) == 2
  with pytest.raises(DataError, match=r"all_history/dev.json: record 3: gold passage id '999'"):
    read_topiocqa(root, "dev", strict=True, progress=False)
  with open(os.path.join(root, "topiocqa_dev.json"), "w") as f:
    f.write('[{"Conversation_no": 1,\n  "Turn_no": }]')
  with pytest.raises(DataError, match=r"topiocqa_dev.json:2: malformed JSON"):
    read_topiocqa(root, "dev", progress=False)


# ------------------------------------------------------------------------------------ QReCC
def qrecc_turns():
  def t(conv, turn, q, ans, passages, rw=""):
    return {"Conversation_no": conv, "Turn_no": turn, "Conversation_source": "quac",
            "Question": q, "Truth_rewrite": rw, "Truth_answer": ans, "Truth_passages": passages,
            "Model_passages": {}}
  return [
      t(938, 1, "What is Varnholt?", "A castle.", ["http://b.com/x_p0"], "What is Varnholt?"),
      t(938, 2, "Is it old?", "", []),  # no gold: not emitted, kept in later contexts
      t(938, 3, "Who built it?", "", ["http://a.com/y_p1", "http://c.com/z_p0",
                                      "http://a.com/y_p1"], "Who built Varnholt castle?"),
      t(7, 1, "Hello?", "Hi.", ["http://c.com/z_p0"]),
  ]


def write_qrecc(root, turns=None, split="training"):
  turns = qrecc_turns() if turns is None else turns
  base = os.path.join(root, "collection-paragraph")
  files = {"wayback/w0.jsonl": ["http://b.com/x_p0"],
           "commoncrawl/c1.jsonl": ["http://a.com/y_p0", "http://a.com/y_p1"],
           "commoncrawl/c0.jsonl": ["http://a.com/q_p0"],
           "wayback-backfill/b0.jsonl": ["http://c.com/z_p0"]}
  for rel, ids in files.items():
    os.makedirs(os.path.dirname(os.path.join(base, rel)), exist_ok=True)
    with open(os.path.join(base, rel), "w") as f:
      f.writelines(json.dumps({"id": i, "contents": f"text of {i}"}) + "\n" for i in ids)
  with open(os.path.join(root, f"scai-qrecc21-{split}-turns.json"), "w") as f:
    json.dump(turns, f)
  return str(root)


def test_qrecc(tmp_path):
  root = write_qrecc(tmp_path / "q")
  ds = load_dataset(f"qrecc:{root}", "train", progress=False)
  c = ds.collection
  # commoncrawl files first, then wayback and wayback-backfill in one bucket, by path.
  assert [c.raw_id(i) for i in range(len(c))] == [
      "http://a.com/q_p0", "http://a.com/y_p0", "http://a.com/y_p1", "http://c.com/z_p0",
      "http://b.com/x_p0"]
  with open(os.path.join(c.index_dir, "id_map.json")) as f:
    assert json.load(f)["http://b.com/x_p0"] == 4
  assert [t.qid for t in ds.turns] == ["QReCC-Train_938_1", "QReCC-Train_938_3", "QReCC-Train_7_1"]
  assert ds.turns[1] == Turn(
      conv_id="938", turn_id=3, qid="QReCC-Train_938_3", question="Who built it?",
      context=(("What is Varnholt?", "A castle."), ("Is it old?", "UNANSWERABLE")),
      gold_ids=("2", "3"), rewrites={"human": "Who built Varnholt castle?"}, domain="quac")
  assert ds.qrels["QReCC-Train_938_3"] == {"2": 1, "3": 1}  # multi-gold
  assert ds.turns[2].rewrites == {} and c[3].text == "text of http://c.com/z_p0"
  assert ds.stats["turns_no_gold"] == 1


def test_qrecc_bad_input(tmp_path):
  bad = qrecc_turns()
  bad[2]["Turn_no"] = 4
  with pytest.raises(DataError, match=r"not consecutive \(turn 4 after 2\)"):
    read_qrecc(write_qrecc(tmp_path / "a", bad), "train", progress=False)
  bad = qrecc_turns()
  bad[3]["Question"] = None
  with pytest.raises(DataError, match=r"record 3 \(conversation 7, turn 1\): empty"):
    read_qrecc(write_qrecc(tmp_path / "b", bad), "train", progress=False)
  bad = qrecc_turns()
  bad[3]["Truth_passages"] = ["http://missing_p9"]
  root = write_qrecc(tmp_path / "c", bad, split="test")
  ds = read_qrecc(root, "test", progress=False)
  assert ds.stats["gold_ids_missing"] == 1 and ds.stats["turns_no_gold_in_collection"] == 1
  assert ds.turns[0].qid == "QReCC-Test_938_1"
  with pytest.raises(DataError, match=r"gold passage id 'http://missing_p9' is not in"):
    read_qrecc(root, "test", strict=True, progress=False)
  os.makedirs(tmp_path / "d")
  (tmp_path / "d" / "passages.zip").write_bytes(b"")
  (tmp_path / "d" / "scai-qrecc21-training-turns.json").write_text("[]")
  with pytest.raises(DataError, match="unzip passages.zip first"):
    read_qrecc(str(tmp_path / "d"), "train", progress=False)


# --------------------------------------------------- release layouts (tests/fixtures, issue 34)
FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


@pytest.mark.parametrize("sub", ["", "downloads", "downloads/data"])
def test_topiocqa_download_script_layout(tmp_path, sub):
  """The download script's tree (downloads/data/topiocqa_dataset/dev.json, retriever/all_history/
  dev.json, wikipedia_split/full_wiki_segments.tsv), read from the download folder, its
  downloads/ or its downloads/data/."""
  shutil.copytree(os.path.join(FIXTURES, "topiocqa"), tmp_path / "download")
  ds = read_topiocqa(tmp_path / "download" / sub, "dev", progress=False)
  assert [t.qid for t in ds.turns] == ["topiocqa-dev_1_1", "topiocqa-dev_1_2", "topiocqa-dev_2_1"]
  assert ds.turns[1].context == (("who is lead singer of rage against the machine?",
                                  "Zack de la Rocha"),)
  assert ds.qrels["topiocqa-dev_1_2"] == {"10573214": 1}  # positive_ctxs[0] only
  assert ds.stats["turns_no_gold"] == 1  # 1_3: no positive passage
  p = ds.collection[ds.collection.row_of("10573214")]
  assert p.contents.startswith("Rage Against the Machine History Rage Against the Machine was")


# The zip's own member order (directories first, as `zip -r` writes them): neither sorted nor
# grouped, with a backfill file between two wayback files.
ZIP_ORDER = ["collection-paragraph/", "collection-paragraph/wayback/",
             "collection-paragraph/wayback/wayback-b.jsonl", "collection-paragraph/commoncrawl/",
             "collection-paragraph/commoncrawl/commoncrawl-b.jsonl",
             "collection-paragraph/wayback-backfill/",
             "collection-paragraph/wayback-backfill/backfill-a.jsonl",
             "collection-paragraph/commoncrawl/commoncrawl-a.jsonl",
             "collection-paragraph/wayback/wayback-a.jsonl"]


def write_qrecc_release(root, order=ZIP_ORDER, with_zip=True):
  """tests/fixtures/qrecc (SCAI-QReCC-21 test turns, collection-paragraph/ unzipped) plus the
  passages.zip those files came from, its members in `order`."""
  shutil.copytree(os.path.join(FIXTURES, "qrecc"), root)
  if with_zip:
    with zipfile.ZipFile(os.path.join(root, "passages.zip"), "w") as z:
      for name in order:
        if name.endswith("/"):
          z.writestr(name, "")
        else:
          z.write(os.path.join(root, name), name)
  return str(root)


def _raw_ids(path):
  with open(path) as f:
    return [json.loads(line)["id"] for line in f]


def test_qrecc_numbers_passages_in_the_zip_order(tmp_path):
  """As preprocess_v3.py: the zip's .jsonl members in its order, commoncrawl first, then every
  path containing "wayback" (backfill included, where the zip puts it)."""
  root = write_qrecc_release(tmp_path / "q")
  ds = read_qrecc(root, "test", progress=False)
  c, base = ds.collection, os.path.join(root, "collection-paragraph")
  want = [i for f in ("commoncrawl/commoncrawl-b.jsonl", "commoncrawl/commoncrawl-a.jsonl",
                      "wayback/wayback-b.jsonl", "wayback-backfill/backfill-a.jsonl",
                      "wayback/wayback-a.jsonl") for i in _raw_ids(os.path.join(base, f))]
  assert [c.raw_id(i) for i in range(len(c))] == want
  with open(os.path.join(c.index_dir, "id_map.json")) as f:
    assert json.load(f) == {raw: i for i, raw in enumerate(want)}
  assert c[5].text == ""  # an empty passage keeps its number, as in the official collection
  # Turn 1_1 has no passages: not a query, but in 1_2's context; multi-gold qrels in new ids.
  assert [t.qid for t in ds.turns] == ["QReCC-Test_1_2", "QReCC-Test_2774_1"]
  assert ds.turns[0].context == (("What is a physician's assistant?", ds.turns[0].context[0][1]),)
  assert ds.qrels["QReCC-Test_1_2"] == {"1": 1, "4": 1}
  assert ds.qrels["QReCC-Test_2774_1"] == {"3": 1}


def test_qrecc_without_the_zip_or_with_another(tmp_path, caplog):
  root = write_qrecc_release(tmp_path / "a", with_zip=False)
  with caplog.at_level("WARNING", logger="cqr_jax"):
    ds = read_qrecc(root, "test", progress=False)
  assert "passages.zip not found" in caplog.text
  assert ds.collection.raw_id(0) == "https://www.aapa.org/about/what-is-a-pa/_p0"  # sorted
  root = write_qrecc_release(tmp_path / "b", order=ZIP_ORDER[:-1])
  with pytest.raises(DataError, match=r"differ from .*passages.zip \(not extracted: \[\]; not "
                     r"in the zip: \['wayback/wayback-a.jsonl'\]\)"):
    read_qrecc(root, "test", progress=False)
