"""The public DeepSeek-MoE checkpoint format: its config.json and its tensors."""
