"""ScopedValue: a value the model reads while it is traced (the active mesh, an analysis
intervention), bound for a block of code.

Functions jitted inside the block see the bound value when they are traced; jit's cache
does not key on it, so jit a fresh function for each value.
"""

from __future__ import annotations

import contextlib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class ScopedValue(Generic[T]):
  def __init__(self, default: T):
    self._stack = [default]

  @property
  def current(self) -> T:
    return self._stack[-1]

  @contextlib.contextmanager
  def bound_to(self, value: T) -> Iterator[T]:
    self._stack.append(value)
    try:
      yield value
    finally:
      self._stack.pop()
