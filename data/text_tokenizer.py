"""One tokenizer interface (TextTokenizer) for the input pipeline, evaluation and checkpoint
directories, two implementations: our SentencePiece models (data.tokenizer.Tokenizer) and
`tokenizer.json` files through the `tokenizers` library (HFTokenizer: the released
checkpoints'). `load_tokenizer` picks by the files present; `write_tokenizer_files` puts a
tokenizer into an exported checkpoint directory.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Protocol

import numpy as np
import tokenizers

from data.tokenizer import Tokenizer

TOKENIZER_JSON, TOKENIZER_CONFIG, SPM_MODEL = "tokenizer.json", "tokenizer_config.json", "tokenizer.model"


class TextTokenizer(Protocol):
  path: str
  eos_id: int                # appended to every document by the input pipeline
  add_bos: bool              # whether a text the model reads starts with bos_id (with_bos)

  @property
  def vocab_size(self) -> int: ...  # ids lie in [0, vocab_size)
  @property
  def bos_id(self) -> int | None: ...
  @property
  def pad_id(self) -> int | None: ...
  def encode(self, text: str) -> np.ndarray: ...  # [n] int32, no special tokens added
  def decode(self, ids) -> str: ...


def _json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


class HFTokenizer:
  """A `tokenizer.json`. Special ids: the tokens tokenizer_config.json names (bos_token,
  eos_token, pad_token), else the ids in config.json (bos_token_id, ...), both read from the
  file's directory."""

  def __init__(self, path: str):
    if not os.path.exists(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    self.path = path
    self.tok = tokenizers.Tokenizer.from_file(path)
    directory = os.path.dirname(os.path.abspath(path))
    token_cfg, model_cfg = _json(os.path.join(directory, TOKENIZER_CONFIG)), _json(os.path.join(directory, "config.json"))

    def special(kind: str) -> int | None:
      token = token_cfg.get(f"{kind}_token")
      token = token.get("content") if isinstance(token, dict) else token
      if token is not None and self.tok.token_to_id(token) is not None:
        return self.tok.token_to_id(token)
      i = model_cfg.get(f"{kind}_token_id")
      return i[0] if isinstance(i, list) else i

    self._bos, self._pad = special("bos"), special("pad")
    eos = special("eos")
    if eos is None:
      raise ValueError(f"tokenizer {path!r}: no EOS id in {TOKENIZER_CONFIG} (eos_token) or "
                       f"config.json (eos_token_id)")
    self.eos_id = eos
    # The released checkpoints were trained with BOS first (tokenizer_config's add_bos_token,
    # true when absent as in LLaMA-style configs); our exports write it false.
    self.add_bos = self._bos is not None and bool(token_cfg.get("add_bos_token", True))

  @property
  def vocab_size(self) -> int:
    return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def pad_id(self) -> int | None:
    return self._pad

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def with_bos(tok: TextTokenizer, ids) -> np.ndarray:
  """ids: [n] -> [n] or [1 + n] int32: BOS first where the tokenizer's model was trained so."""
  ids = np.asarray(ids, np.int32)
  return np.concatenate([np.asarray([tok.bos_id], np.int32), ids]) if tok.add_bos else ids


def load_tokenizer(path: str) -> TextTokenizer:
  """A checkpoint directory's tokenizer (tokenizer.json, else tokenizer.model), or one file:
  `*.json` through `tokenizers`, anything else as a SentencePiece model."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    for name, kind in ((TOKENIZER_JSON, HFTokenizer), (SPM_MODEL, Tokenizer)):
      if os.path.exists(os.path.join(path, name)):
        return kind(os.path.join(path, name))
    raise FileNotFoundError(f"{path}: no {TOKENIZER_JSON} or {SPM_MODEL}")
  return HFTokenizer(path) if path.endswith(".json") else Tokenizer(path)


def spm_to_tokenizers(tok: Tokenizer) -> tokenizers.Tokenizer:
  """A SentencePiece model as an equivalent `tokenizers` one (transformers' converter, which
  follows the model's own normalizer settings); ValueError if any id differs on a probe
  text that holds every piece."""
  from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

  proto = import_protobuf().ModelProto()
  with open(tok.path, "rb") as f:
    proto.ParseFromString(f.read())
  vocab = {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)}
  out = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  probe = tok.decode(range(tok.vocab_size)) + " x  y\n\tz é€😀 <s></s> ▁a"
  for text in (probe, probe[::-1], " " + probe):
    if list(tok.encode(text)) != out.encode(text, add_special_tokens=False).ids:
      raise ValueError(f"converting {tok.path!r} to {TOKENIZER_JSON} changes its ids")
  return out


def write_tokenizer_files(tok: TextTokenizer, out_dir: str, max_length: int) -> tuple[list[str], list[str]]:
  """Put `tok` into a checkpoint directory -> (files written, notes). A tokenizer.json is
  copied with its tokenizer_config.json; a SentencePiece model is copied as tokenizer.model
  and converted to tokenizer.json where transformers can do so exactly (else a note says why)."""
  if isinstance(tok, HFTokenizer):
    written = []
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, "special_tokens_map.json", SPM_MODEL):
      src = os.path.join(os.path.dirname(os.path.abspath(tok.path)), name)
      if name == TOKENIZER_JSON or os.path.exists(src):
        shutil.copyfile(tok.path if name == TOKENIZER_JSON else src, os.path.join(out_dir, name))
        written.append(name)
    return written, []
  shutil.copyfile(tok.path, os.path.join(out_dir, SPM_MODEL))
  piece = lambda i: tok.sp.id_to_piece(i) if i is not None else None
  with open(os.path.join(out_dir, TOKENIZER_CONFIG), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(tok.bos_id),
               "eos_token": piece(tok.eos_id), "unk_token": piece(tok.sp.unk_id()),
               "pad_token": piece(tok.pad_id), "model_max_length": max_length,
               "add_bos_token": False, "add_eos_token": False}, f, indent=2)
  written = [SPM_MODEL, TOKENIZER_CONFIG]
  try:
    spm_to_tokenizers(tok).save(os.path.join(out_dir, TOKENIZER_JSON))
  except (ImportError, ValueError) as e:
    return written, [f"no {TOKENIZER_JSON}: {e}; {SPM_MODEL} is the tokenizer (SentencePiece)"]
  return written + [TOKENIZER_JSON], []
