"""TurnBatches (deterministic, resumable, epochs, process slices) and the TFDS builder."""

import json

import pytest

from cqr_jax.data import TurnBatches, load_dataset


def _ids(batches, n):
  return [next(batches) for _ in range(n)]


def test_deterministic_and_epochs():
  items = list(range(10))
  a = TurnBatches(items, 3, seed=7)
  got = _ids(a, 6)
  assert got == _ids(TurnBatches(items, 3, seed=7), 6)
  assert got != _ids(TurnBatches(items, 3, seed=8), 6)
  assert a.batches_per_epoch == 3  # drop_last: 10 // 3
  e0, e1 = sum(got[:3], []), sum(got[3:], [])
  assert len(set(e0)) == 9 and len(set(e1)) == 9 and e0 != e1  # a fresh permutation per epoch
  assert a.get_state()["epoch"] == 2 and a.step == 6
  plain = TurnBatches(items, 4, shuffle=False, drop_last=False, num_epochs=1)
  assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_state_round_trip():
  items = list(range(23))
  a = TurnBatches(items, 4, seed=1)
  _ids(a, 7)
  state = json.loads(json.dumps(a.get_state()))  # JSON-able, as saved beside a checkpoint
  rest = _ids(a, 9)
  b = TurnBatches(items, 4, seed=1)
  b.set_state(state)
  assert _ids(b, 9) == rest
  with pytest.raises(ValueError, match="seed=1 but this pipeline has seed=2"):
    TurnBatches(items, 4, seed=2).set_state(state)
  with pytest.raises(ValueError, match="num_turns"):
    TurnBatches(items[:-1], 4, seed=1).set_state(state)


def test_process_slices():
  items = list(range(16))
  full = _ids(TurnBatches(items, 8, seed=0), 3)
  parts = [_ids(TurnBatches(items, 8, seed=0, process_index=i, process_count=2), 3)
           for i in range(2)]
  assert [p0 + p1 for p0, p1 in zip(*parts)] == full
  with pytest.raises(ValueError, match="not divisible"):
    TurnBatches(items, 8, process_count=3)
  with pytest.raises(ValueError, match="cannot fill one batch"):
    TurnBatches(items[:3], 4)


def test_tfds_array_record_round_trip(tmp_path):
  from cqr_jax.data.tfds_builder import prepare_tfds, tfds_turns
  b = prepare_tfds("synthetic:tiny", tmp_path)
  for split in ("train", "test"):
    want = load_dataset("synthetic:tiny", split).turns
    src = tfds_turns(b, split)
    assert len(src) == len(want) and list(src) == want  # order and every field preserved
  again = tfds_turns(b.data_dir, "test")  # from the directory alone
  batches = TurnBatches(again, 8, seed=0)
  ref = TurnBatches(load_dataset("synthetic:tiny", "test").turns, 8, seed=0)
  assert next(batches) == next(ref)


def test_tfds_example_keeps_string_and_int_turn_ids():
  from cqr_jax.data.tfds_builder import example_to_turn, turn_to_example
  from cqr_jax.data.types import Turn
  for tid in (3, "1-1", "3_2", "7"):
    t = Turn(conv_id="c", turn_id=tid, qid=f"q{tid}", question="Who?", context=(("A?", None),),
             gold_ids=("d1",), domain="govt")
    ex = {k: (v.encode() if isinstance(v, str) else v) for k, v in turn_to_example(t).items()}
    assert example_to_turn(ex) == t
