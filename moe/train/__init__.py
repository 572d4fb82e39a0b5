"""Training: TrainConfig, the optimizer, state, jitted steps, the loop, evaluation,
checkpoints, run files, metrics, and the ahead-of-time memory plan of the sharded step."""
