"""TrainConfig: the optimizer's hyperparameters, the run length and the loop's cadence
(logging, evaluation, checkpoints); gin-configurable."""

from __future__ import annotations

import dataclasses

import gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 250
  learning_rate: float = 3e-3
  warmup_steps: int = 25
  decay_at: tuple[float, ...] = (0.8, 0.9)
  decay_factor: float = 0.316
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  log_every: int = 10
  eval_every: int = 50
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  seed: int = 0
  # A released-format checkpoint directory to fine-tune from (moe.train.finetune): its
  # config.json, tokenizer and parameters start the run; a resume reads the run's own.
  init_from_hf: str | None = None

  def __post_init__(self):
    for field in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, field) <= 0:
        raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r} must be positive")
    if self.warmup_steps < 0 or self.learning_rate <= 0:
      raise ValueError(f"TrainConfig: learning_rate={self.learning_rate} must be positive and "
                       f"warmup_steps={self.warmup_steps} not negative")
