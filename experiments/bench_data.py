"""Input pipeline benchmark: throughput, and the time to resume at a late step, for the
dataset prepared as ArrayRecord (O(1) restore) and as TFRecord (streamed, re-read).

  python -m experiments.bench_data [--steps=10000] [--gin.DataConfig.batch_size=16 ...]

For each format: read --steps batches (train split) timing them, save the iterator's
state, then time a fresh pipeline's restore to that state and its first batch. The
TFRecord copy is prepared beside the ArrayRecord one (data_dir/tfrecord). Prints a table.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging

from data.config import DataConfig
from data.input_pipeline import batches, tokenizer_for
from experiments import common_flags, errors, gin_flags

_STEPS = common_flags.steps()  # default 10_000: batches read before the state is saved


def measure(cfg: DataConfig, steps: int) -> dict[str, float]:
  tok = tokenizer_for(cfg)
  make = lambda: iter(batches(cfg, tok, cfg.train_split, tok.vocab_size, train=True))
  warm = make()  # tfds and the reader loaded once, as a resuming run has by then
  next(warm)
  warm.close()
  t = time.perf_counter()
  it = make()
  next(it)
  start_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps - 1):
    next(it)
  read_s = time.perf_counter() - t
  state, expected = it.get_state(), next(it)
  it.close()
  t = time.perf_counter()
  resumed = make()
  resumed.set_state(state)
  first = next(resumed)
  resume_s = time.perf_counter() - t
  resumed.close()
  assert all((first[k] == expected[k]).all() for k in first), "resumed batch differs"
  rows = cfg.batch_size * cfg.seq_len
  return {"batches_per_s": (steps - 1) / read_s, "tokens_per_s": (steps - 1) * rows / read_s,
          "start_s": start_s, "resume_s": resume_s}


def main(argv):
  gin_flags.parse(argv)
  logging.set_verbosity(logging.WARNING)
  cfg = DataConfig()
  steps = _STEPS.value or 10_000
  tfrecord = dataclasses.replace(cfg, file_format="tfrecord", data_dir=os.path.join(cfg.root, "tfrecord"),
                                 tokenizer_path=tokenizer_for(cfg).path)
  print(f"{cfg.dataset}, batch {cfg.batch_size} x {cfg.seq_len}, read_threads {cfg.read_threads}, "
        f"{os.cpu_count()} CPUs; resume at step {steps}")
  print("| prepared as | batches/s | tokens/s | first batch at step 0 (s) | first batch resumed at step N (s) |")
  print("|---|---:|---:|---:|---:|")
  for name, c in (("ArrayRecord (random access)", cfg), ("TFRecord (stream)", tfrecord)):
    r = measure(c, steps)
    print(f"| {name} | {r['batches_per_s']:.0f} | {r['tokens_per_s']:,.0f} | {r['start_s']:.2f} "
          f"| {r['resume_s']:.2f} |", flush=True)


if __name__ == "__main__":
  errors.run(main, flags_parser=gin_flags.flags_parser)
