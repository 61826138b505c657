"""Data: readers (TopiOCQA, QReCC, generic, embedded benchmark), collections, input pipeline."""

from cqr_jax.data.collection import FileCollection, MemoryCollection
from cqr_jax.data.dataset import Dataset, load_dataset
from cqr_jax.data.pipeline import TurnBatches
from cqr_jax.data.types import Collection, DataError, Passage, Qrels, Turn

__all__ = ["Collection", "DataError", "Dataset", "FileCollection", "MemoryCollection", "Passage",
           "Qrels", "Turn", "TurnBatches", "load_dataset"]
