"""A grain dataset over a stream of documents (a tfds dataset not prepared as ArrayRecord).

There is no random access: each host reads the whole stream and keeps its share of the
documents, and resuming re-reads the stream up to the saved position (it skips the
documents without tokenising them, but the time still grows with the position). Prepare
the dataset as ArrayRecord for an O(1) resume and a global shuffle.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import grain


class StreamDataset(grain.IterDataset):
  """Documents of `open_stream()` in stored order, every shard_count-th from shard_index;
  with repeat, the stream is reopened at its end (epochs)."""

  def __init__(self, open_stream: Callable[[], Iterator[Any]], shard_index: int = 0,
               shard_count: int = 1, repeat: bool = False):
    super().__init__()
    self.open_stream, self.repeat = open_stream, repeat
    self.shard_index, self.shard_count = shard_index, shard_count

  def __iter__(self) -> "StreamIterator":
    return StreamIterator(self)


class StreamIterator(grain.DatasetIterator):
  """State: the epoch and how many of its documents (all hosts' shares) were read."""

  def __init__(self, ds: StreamDataset):
    super().__init__()
    self._ds = ds
    self._epoch, self._read = 0, 0
    self._it: Iterator[Any] | None = None

  def _open(self) -> Iterator[Any]:
    it = self._ds.open_stream()
    for i in range(self._read):
      if next(it, _END) is _END:
        raise ValueError(f"the stream ended after {i} documents but the saved position is "
                         f"{self._read}: is this the dataset the checkpoint was saved with?")
    return it

  def __next__(self) -> Any:
    while True:
      if self._it is None:
        self._it = self._open()
      doc = next(self._it, _END)
      if doc is _END:
        if not self._ds.repeat or self._read == 0:
          raise StopIteration
        self._epoch, self._read, self._it = self._epoch + 1, 0, None
        continue
      index, self._read = self._read, self._read + 1
      if index % self._ds.shard_count == self._ds.shard_index:
        return doc

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "documents_read": self._read}

  def set_state(self, state: dict[str, Any]) -> None:
    self._epoch, self._read, self._it = int(state["epoch"]), int(state["documents_read"]), None


_END = object()
