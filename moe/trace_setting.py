"""A value the model reads while it is traced (the active mesh, an analysis intervention),
set for a block of code. Functions jitted inside the block see it; jit caches do not, so
jit afresh for each value."""

from __future__ import annotations

import contextlib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class TraceSetting(Generic[T]):
  def __init__(self, default: T):
    self._stack = [default]

  @property
  def value(self) -> T:
    return self._stack[-1]

  @contextlib.contextmanager
  def use(self, value: T) -> Iterator[T]:
    self._stack.append(value)
    try:
      yield value
    finally:
      self._stack.pop()
