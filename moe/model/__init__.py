"""The model: ModelConfig and presets, layers, attention, routers and routing math, the MoE
layer, the decoder-only Transformer, the training objective, parameter and FLOP counts.
Imports nothing from train, research or experiments, and no kernel until one is resolved."""
