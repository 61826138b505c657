"""On-disk collections: offset/id index, lookups, staleness, bad input."""

import json
import os

import pytest

from cqr_jax.data.collection import FileCollection, MemoryCollection
from cqr_jax.data.types import DataError, Passage


def _write(path, lines):
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return str(path)


def test_jsonl_collection(tmp_path):
  f = _write(tmp_path / "c.jsonl", [
      json.dumps({"id": "a", "title": "T", "text": "alpha"}), "",
      json.dumps({"id": "b<::>1", "text": "béta"}), json.dumps({"id": 7, "contents": "seven"})])
  c = FileCollection([f], "jsonl", tmp_path / "idx", progress=False)
  assert len(c) == 3
  assert list(c.ids()) == ["a", "b<::>1", "7"] and c.ids()[-1] == "7"
  assert c[0] == Passage("a", "alpha", "T") and c[0].contents == "T alpha"
  assert c[1] == Passage("b<::>1", "béta") and c.row_of("7") == 2
  assert "b<::>1" in c and "zz" not in c
  with pytest.raises(KeyError):
    c.row_of("zz")
  assert list(c) == [c[0], c[1], c[2]]
  # The index is reused while the file is unchanged, and rebuilt when it changes.
  stamp = os.path.getmtime(tmp_path / "idx" / "offsets.npy")
  assert FileCollection([f], "jsonl", tmp_path / "idx", progress=False).row_of("a") == 0
  assert os.path.getmtime(tmp_path / "idx" / "offsets.npy") == stamp
  _write(tmp_path / "c.jsonl", [json.dumps({"id": "z", "text": "zed!"})])
  c2 = FileCollection([f], "jsonl", tmp_path / "idx", progress=False)
  assert len(c2) == 1 and c2[0].text == "zed!"


def test_renumbered_multi_file(tmp_path):
  f1 = _write(tmp_path / "1.jsonl", [json.dumps({"id": "u1_p0", "contents": "x"}),
                                     json.dumps({"id": "u1_p1", "contents": ""})])
  f2 = _write(tmp_path / "2.jsonl", [json.dumps({"id": "u2_p0", "contents": "y"})])
  c = FileCollection([f1, f2], "jsonl", tmp_path / "idx", renumber=True, progress=False)
  assert [p.pid for p in c] == ["0", "1", "2"] and c[2] == Passage("2", "y")
  assert c.row_of("2") == 2 and c.row_of_raw("u1_p1") == 1 and c.raw_id(2) == "u2_p0"
  assert "3" not in c and "u1_p0" not in c  # renumbered ids only
  with open(tmp_path / "idx" / "id_map.json") as fh:
    assert json.load(fh) == {"u1_p0": 0, "u1_p1": 1, "u2_p0": 2}


def test_topiocqa_tsv(tmp_path):
  f = _write(tmp_path / "w.tsv", ["id\ttext\ttitle", "1\tplain text\tPage [SEP] Section",
                                  '2\t"quoted ""inner"" text"\tOther'])
  c = FileCollection([f], "topiocqa_tsv", tmp_path / "idx", skip_header=True, progress=False)
  assert c[0] == Passage("1", "plain text", "Page Section")
  assert c[0].contents == "Page Section plain text"
  assert c[1].text == 'quoted "inner" text' and c.row_of("2") == 1


@pytest.mark.parametrize("fmt,lines,match", [
    ("jsonl", ['{"id": "a", "text": "x"}', '{"id": "b", "text": '],
     r"c\.data:2: bad collection record"),
    ("jsonl", ['{"id": "a", "text": "x"}', '{"text": "y"}'], r"c\.data:2: .*missing field 'id'"),
    ("jsonl", ['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'],
     r"duplicate passage id 'a'"),
    ("topiocqa_tsv", ["id\ttext\ttitle", "1\tonly two"], r"c\.data:2: .*3 TAB-separated"),
    ("jsonl", [""], r"collection is empty"),
])
def test_bad_collections(tmp_path, fmt, lines, match):
  f = _write(tmp_path / "c.data", lines)
  with pytest.raises(DataError, match=match):
    FileCollection([f], fmt, tmp_path / "idx", skip_header=fmt == "topiocqa_tsv", progress=False)


def test_memory_collection_duplicates():
  with pytest.raises(DataError, match="duplicate passage id 'a'"):
    MemoryCollection([Passage("a", "x"), Passage("a", "y")])
