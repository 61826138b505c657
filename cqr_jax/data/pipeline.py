"""The training input pipeline: deterministic shuffled batches of turns, resumable (issue 5).

Order: epoch e visits the turns in the permutation that grain's `MapDataset.shuffle(seed)` gives
for indices [e*N, (e+1)*N) (a fresh permutation per epoch, a function of (seed, e) only); batch b
of an epoch is positions [b*B, (b+1)*B) of it. drop_last drops an epoch's final partial batch, as
the paper's samplers do (method.md 3.4, 4.8). The position (epoch, batch) is the whole state:
`get_state()` gives a JSON-able dict to save beside a checkpoint and `set_state` resumes exactly.
On several processes every process computes the same global batch and keeps its own slice.
"""

from __future__ import annotations

from typing import Any, Generic, Iterator, Sequence, TypeVar

import grain

T = TypeVar("T")


class TurnBatches(Generic[T]):
  """Iterator of batches (lists) of turns over epochs.

  Args:
    turns: a random-access sequence (a list of Turn, or a lazily decoded array_record source).
    batch_size: global batch size (prompts per step).
    seed: shuffle seed.
    drop_last: drop each epoch's last partial batch.
    shuffle: False keeps the data order (evaluation).
    num_epochs: stop after this many epochs (None: forever).
    process_index, process_count: this process's slice of every global batch.
  """

  def __init__(self, turns: Sequence[T], batch_size: int, seed: int = 0, drop_last: bool = True,
               shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
               process_count: int = 1):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    n = len(turns)
    if n == 0 or (drop_last and n < batch_size):
      raise ValueError(f"{n} turns cannot fill one batch of {batch_size} (drop_last={drop_last})")
    self.turns, self.batch_size, self.seed = turns, batch_size, seed
    self.drop_last, self.shuffle, self.num_epochs = drop_last, shuffle, num_epochs
    self.process_index, self.process_count = process_index, process_count
    self._order = grain.MapDataset.range(n).shuffle(seed=seed) if shuffle else None
    self.epoch, self.batch = 0, 0

  @property
  def batches_per_epoch(self) -> int:
    n, b = len(self.turns), self.batch_size
    return n // b if self.drop_last else -(-n // b)

  def global_indices(self, epoch: int, batch: int) -> list[int]:
    """Turn indices of global batch `batch` of epoch `epoch`."""
    n = len(self.turns)
    lo, hi = batch * self.batch_size, min((batch + 1) * self.batch_size, n)
    if self._order is None:
      return list(range(lo, hi))
    return [int(self._order[epoch * n + i]) for i in range(lo, hi)]

  def __iter__(self) -> Iterator[list[T]]:
    return self

  def __next__(self) -> list[T]:
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    idx = self.global_indices(self.epoch, self.batch)
    self.batch += 1
    if self.batch >= self.batches_per_epoch:
      self.epoch, self.batch = self.epoch + 1, 0
    per = -(-len(idx) // self.process_count)
    mine = idx[self.process_index * per:(self.process_index + 1) * per]
    return [self.turns[i] for i in mine]

  @property
  def step(self) -> int:
    """Global batches yielded so far."""
    return self.epoch * self.batches_per_epoch + self.batch

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed,
            "num_turns": len(self.turns), "batch_size": self.batch_size,
            "shuffle": self.shuffle, "drop_last": self.drop_last}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resumes at a saved position; refuses a state saved with other data or settings."""
    mine = self.get_state()
    for k in ("seed", "num_turns", "batch_size", "shuffle", "drop_last"):
      if k in state and state[k] != mine[k]:
        raise ValueError(f"data state was saved with {k}={state[k]!r} but this pipeline has "
                         f"{k}={mine[k]!r}; resuming would not continue the same data order")
    epoch, batch = int(state["epoch"]), int(state["batch"])
    if not 0 <= batch < self.batches_per_epoch or epoch < 0:
      raise ValueError(f"data state position (epoch {epoch}, batch {batch}) is out of range")
    self.epoch, self.batch = epoch, batch
