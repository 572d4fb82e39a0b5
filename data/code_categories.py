"""What each token of Python source is: comment, docstring, string, keyword, identifier,
number, operator or whitespace; for asking whether experts specialise by token category.

Categories come from Python's own `tokenize`; a token of the SentencePiece model takes the
category of its first non-space character.
"""

from __future__ import annotations

import io
import keyword
import token as pytoken
import tokenize

import numpy as np

CATEGORIES = ("comment", "docstring", "string", "keyword", "identifier", "number", "operator",
              "whitespace")
_WS = CATEGORIES.index("whitespace")


def char_categories(source: str) -> np.ndarray:
  """source -> [len(source)] int8 index into CATEGORIES. Text that does not tokenize (a
  syntax error) keeps what was categorised before the error; the rest is whitespace."""
  cats = np.full(len(source), _WS, np.int8)
  line_starts = np.concatenate([[0], np.cumsum([len(l) for l in source.splitlines(keepends=True)])])
  prev = None  # the previous significant token type, to tell docstrings from strings
  try:
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
  except (tokenize.TokenError, SyntaxError, IndentationError):
    tokens = []
  for i, tok in enumerate(tokens):
    kind = _kind(tok, prev, tokens[i + 1] if i + 1 < len(tokens) else None)
    if kind is not None:
      start = line_starts[tok.start[0] - 1] + tok.start[1]
      end = line_starts[tok.end[0] - 1] + tok.end[1]
      cats[start:end] = CATEGORIES.index(kind)
    if tok.type not in (tokenize.NL, tokenize.COMMENT):
      prev = tok.type
  return cats


def _kind(tok, prev, nxt) -> str | None:
  if tok.type == tokenize.COMMENT:
    return "comment"
  if tok.type == tokenize.STRING:
    # A string alone on a logical line at the start of a block or module: a docstring.
    alone = prev in (None, tokenize.INDENT, tokenize.NEWLINE, tokenize.DEDENT, tokenize.ENCODING)
    ends = nxt is not None and nxt.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
    return "docstring" if alone and ends else "string"
  if tok.type == tokenize.NAME:
    return "keyword" if keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string) else "identifier"
  if tok.type == tokenize.NUMBER:
    return "number"
  if tok.type == tokenize.OP or tok.type == pytoken.ERRORTOKEN:
    return "operator"
  return None


def token_categories(sp, source: str) -> tuple[np.ndarray, np.ndarray]:
  """SentencePiece processor + source -> (ids [n] int32, categories [n] int8)."""
  cats = char_categories(source)
  # SentencePiece offsets count UTF-8 bytes: map each byte to its character.
  char_of_byte = np.repeat(np.arange(len(source)), [len(c.encode("utf-8")) for c in source])
  try:
    proto = sp.encode(source, return_type="proto")  # sentencepiece >= 0.2.1
  except TypeError:
    proto = sp.encode(source, out_type="immutable_proto")
  ids, out = [], []
  for piece in proto.pieces:
    ids.append(piece.id)
    chars = char_of_byte[piece.begin:piece.end] if piece.end > piece.begin else np.array([], int)
    text = [c for c in chars if not source[c].isspace()]
    out.append(cats[text[0]] if text else _WS)
  return np.asarray(ids, np.int32), np.asarray(out, np.int8)
