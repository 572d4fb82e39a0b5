"""A checkpoint directory's files as untrusted input: names that stay inside the directory,
regular files only (a FIFO is never waited on), JSON that must parse to an object, and
safetensors headers checked against the format before any tensor byte is trusted.

A safetensors file is an 8-byte little-endian header length n (at most 100 MB, as the
format caps it), n bytes of a UTF-8 JSON object {name: {'dtype', 'shape', 'data_offsets'}}
(plus an optional '__metadata__' {str: str}), then the data section, which the tensors'
[begin, end) offsets must cover exactly: sorted by begin, from 0, each where the last
ended, the last at the file's end (as safetensors' own loader requires).
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import IO, Any

from moe.hub.hf_config import CheckpointFormatError, is_int, short_repr

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's cap on its JSON header
MAX_JSON_BYTES = 100_000_000    # config.json and the index: far above any real one
# Bytes per element of the format's dtypes; others (sub-byte floats, new ones) are passed
# on unchecked here and refused by name if a parameter needs them.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
            "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
            "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def file_in(directory: str, name: Any, what: str) -> str:
  """The path of `name` in `directory` if it is a plain file name (no separators, not '.'
  or '..') whose real path, symlinks followed, stays inside the directory (or a hub cache
  snapshot's blobs); `what` names where the name came from for the error."""
  if (not isinstance(name, str) or not name or name in (".", "..") or "\0" in name
      or any(sep and sep in name for sep in (os.sep, os.altsep, "/"))):
    raise CheckpointFormatError(f"{what} names file {short_repr(name)}: not a plain file name in "
                                f"{directory} (no paths outside the checkpoint directory)")
  path = os.path.join(directory, name)
  if not any(_inside(os.path.realpath(path), root) for root in _allowed_roots(directory)):
    raise CheckpointFormatError(f"{path}: a symlink to {os.path.realpath(path)}, outside the "
                                f"checkpoint directory; copy the file in instead")
  return path


def _inside(path: str, root: str) -> bool:
  return os.path.commonpath([root, path]) == root


def _allowed_roots(directory: str) -> list[str]:
  """Where a checkpoint's files may really live: the directory itself, and for a Hugging
  Face hub cache snapshot (<repo>/snapshots/<revision>/, its files links into <repo>/blobs/)
  that repository's blobs."""
  root = os.path.realpath(directory)
  roots = [root]
  if os.path.basename(os.path.dirname(root)) == "snapshots":
    roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
  return roots


def open_regular(path: str) -> IO[bytes]:
  """`path` opened for binary reading, refused unless it is a regular file. Opened
  non-blocking first, so a FIFO (or device) is refused rather than waited on."""
  try:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    raise CheckpointFormatError(f"{path}: cannot be opened ({e.strerror})") from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a file"
      raise CheckpointFormatError(f"{path}: {kind}, not a regular file")
    if hasattr(os, "set_blocking"):
      os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def read_json_object(path: str) -> dict[str, Any]:
  """The JSON object in a regular file of at most MAX_JSON_BYTES."""
  with open_regular(path) as f:
    text = f.read(MAX_JSON_BYTES + 1)
  if len(text) > MAX_JSON_BYTES:
    raise CheckpointFormatError(f"{path}: over {MAX_JSON_BYTES} bytes; not a checkpoint's JSON file")
  try:
    obj = json.loads(text.decode("utf-8"))
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise CheckpointFormatError(f"{path}: not valid JSON ({str(e)[:200]})") from None
  if not isinstance(obj, dict):
    raise CheckpointFormatError(f"{path}: holds a JSON {type(obj).__name__}, not an object")
  return obj


def _tensor_span(path: str, name: str, h: Any) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype, shape, begin, end) of one header entry, each field's type and range checked."""
  def bad(why: str):
    raise CheckpointFormatError(f"{path}: tensor {short_repr(name)}: {why}")
  if not isinstance(h, dict):
    bad(f"header entry is a {type(h).__name__}, not an object")
  missing = {"dtype", "shape", "data_offsets"} - set(h)
  if missing:
    bad(f"header entry has no {sorted(missing)}")
  dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
  if not isinstance(dtype, str):
    bad(f"dtype {short_repr(dtype)} is not a string")
  if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
    bad(f"shape {short_repr(shape)} is not a list of non-negative integers")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
      or not 0 <= offsets[0] <= offsets[1]):
    bad(f"data_offsets {short_repr(offsets)} are not two integers 0 <= begin <= end")
  begin, end = offsets
  if dtype in ITEMSIZE and end - begin != ITEMSIZE[dtype] * math.prod(shape):
    bad(f"bytes [{begin}, {end}) do not hold {dtype} {short_repr(shape)} ({ITEMSIZE[dtype] * math.prod(shape)} bytes)")
  return dtype, tuple(shape), begin, end


def read_header(path: str) -> tuple[int, dict[str, Any]]:
  """(offset of the data section, {name: {'dtype', 'shape', 'data_offsets'}}) of a
  safetensors file, refused (CheckpointFormatError naming the file and tensor) unless it
  is a regular file whose header is well-formed and whose tensors tile its data exactly."""
  with open_regular(path) as f:
    size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(f.read(8), "little")
    try:
      if n > MAX_HEADER_BYTES:  # refused before reading it: the format's own cap
        raise ValueError(f"header length {n} is over the format's cap of {MAX_HEADER_BYTES} bytes")
      if size < 8 or not 2 <= n <= size - 8:
        raise ValueError(f"header length {n} does not fit a file of {size} bytes")
      header = json.loads(f.read(n).decode("utf-8"))
      if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (ValueError, RecursionError) as e:
      raise CheckpointFormatError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
  meta = header.pop("__metadata__", {})
  if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
    raise CheckpointFormatError(f"{path}: __metadata__ is not an object of strings")
  spans = [(name,) + _tensor_span(path, name, h) for name, h in header.items()]
  data, at, last = size - 8 - n, 0, None
  for name, dtype, shape, begin, end in sorted(spans, key=lambda s: (s[3], s[4])):
    if end > data:
      raise CheckpointFormatError(f"{path}: tensor {short_repr(name)}'s bytes [{begin}, {end}) do not hold "
                                  f"{short_repr(dtype)} {short_repr(list(shape))} within the file's {data} data bytes "
                                  f"(truncated or corrupt)")
    if begin != at:  # a gap (bytes no tensor owns) or an overlap (bytes two tensors share)
      what = (f"overlap tensor {short_repr(last)}'s, which end at {at}" if begin < at
              else f"leave bytes [{at}, {begin}) that no tensor owns")
      raise CheckpointFormatError(f"{path}: tensor {short_repr(name)}'s bytes [{begin}, {end}) {what} "
                                  f"(corrupt header)")
    at, last = end, name
  if at != data:
    raise CheckpointFormatError(f"{path}: {data - at} bytes after the last tensor's end "
                                f"(appended or corrupt)")
  return 8 + n, header
