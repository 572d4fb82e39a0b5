"""transformers' implementation of this codebase's model, holding the same weights: a peer
that computes the same function, for parity tests and training-step benchmarks
(moe.train.peer_step, experiments/bench_train.py).

    peer = build_peer(cfg, params)       # PeerLM: DeepseekOcr2TextModel + bias-free LM head
    logits = peer(input_ids)             # [B, S, vocab] f32, as Transformer(cfg)(tokens)[0]

`transformers.DeepseekOcr2TextModel` has DeepSeekMoE v1's structure (softmax top-k routing,
raw gates, the shared experts as one wide SwiGLU, dense layers first). Its weights come from
moe.hub.safetensors_export.public_tensors, so the peer reads exactly what an export writes.

torch and transformers are imported inside the functions: importing moe.hub needs neither.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from moe.hub.safetensors_export import public_tensors
from moe.model.config import ModelConfig

if TYPE_CHECKING:
  import torch

IGNORE_INDEX = -100  # torch's cross_entropy default: labels of positions without a loss
_GATE_UP, _DOWN = ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj"


def hf_text_config(cfg: ModelConfig, attn_implementation: str | None = None,
                   experts_implementation: str | None = None):
  """The DeepseekOcr2TextConfig of `cfg`; refuses what that model does not compute.
  attn_implementation, experts_implementation: transformers' (None: its defaults, sdpa and
  grouped_mm where this torch has them)."""
  import transformers

  if cfg.is_moe_model:
    if cfg.router != "topk":
      raise ValueError(f"ModelConfig.router={cfg.router!r}: the peer (DeepSeekMoE v1) routes by "
                       f"softmax top-k only ('topk')")
    for field, plain in (("norm_topk_prob", False), ("n_null_experts", 0)):
      if getattr(cfg, field) != plain:
        raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r}: the peer has no such "
                         f"option (only {plain!r})")
  if cfg.dtype != "float32" or cfg.param_dtype != "float32":
    raise ValueError(f"ModelConfig.dtype={cfg.dtype!r}, param_dtype={cfg.param_dtype!r}: the "
                     f"peer runs in float32 only")
  moe = cfg.is_moe_model
  return transformers.DeepseekOcr2TextConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.dense_ffn_width,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len,
      rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      mlp_layer_types=["sparse" if k == "moe" else "dense" for k in cfg.layer_kinds],
      # A dense model builds no MoE layer: the expert fields need only be valid.
      n_routed_experts=cfg.n_routed_experts if moe else 1,
      n_shared_experts=cfg.n_shared_experts if moe else 0,
      num_experts_per_tok=cfg.n_activated_experts if moe else 1,
      moe_intermediate_size=cfg.expert_width if moe else 1,
      topk_method="greedy", routed_scaling_factor=cfg.routed_scaling_factor, n_group=1, topk_group=1,
      initializer_range=cfg.init_std, tie_word_embeddings=False,
      attn_implementation=attn_implementation, experts_implementation=experts_implementation)


@functools.lru_cache(maxsize=None)
def _peer_class():
  import torch

  class PeerLM(torch.nn.Module):
    """DeepseekOcr2TextModel (`model`) and a bias-free LM head (`lm_head`): state_dict names
    are the public ones, but for the stacked routed experts (public_parts)."""

    def __init__(self, model, lm_head):
      super().__init__()
      self.model, self.lm_head = model, lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
      """input_ids: [B, S] int64 -> logits [B, S, vocab] f32."""
      return self.lm_head(self.model(input_ids=input_ids).last_hidden_state)

  return PeerLM


def public_parts(state: Mapping[str, Any]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """{peer state_dict name: (the public tensors it holds, in order; each one's shape)}.
  Routed experts are stacked: gate_up_proj [E, 2F, d] holds each expert's gate_proj rows
  then its up_proj rows; down_proj [E, d, F] each expert's down_proj. Every other name is
  the public one (the body sits under `model.`, as in the released checkpoints)."""
  out = {}
  for name, t in state.items():
    shape = tuple(t.shape)
    if name.endswith(_GATE_UP):
      prefix = name[:-len("gate_up_proj")]
      out[name] = (tuple(f"{prefix}{e}.{p}.weight" for e in range(shape[0])
                         for p in ("gate_proj", "up_proj")), (shape[1] // 2, shape[2]))
    elif name.endswith(_DOWN):
      prefix = name[:-len("down_proj")]
      out[name] = tuple(f"{prefix}{e}.down_proj.weight" for e in range(shape[0])), shape[1:]
    else:
      out[name] = (name,), shape
  return out


def load_public(peer, tensors: Mapping[str, np.ndarray]) -> None:
  """Overwrite every parameter of `peer` with public-name tensors. Raises KeyError for a
  tensor the peer needs and `tensors` lacks, ValueError for one it does not use or of the
  wrong shape. Zero-size tensors (shared experts of width 0) may be absent."""
  import torch

  state = peer.state_dict()
  new, used = {}, set()
  for name, (names, shape) in public_parts(state).items():
    if state[name].numel() == 0 and not any(n in tensors for n in names):
      new[name] = state[name]
      continue
    missing = [n for n in names if n not in tensors]
    if missing:
      raise KeyError(f"peer parameter {name!r} needs public tensor {missing[0]!r} "
                     f"({len(missing)} missing)")
    for n in names:
      if tuple(np.shape(tensors[n])) != shape:
        raise ValueError(f"public tensor {n!r} has shape {tuple(np.shape(tensors[n]))}; peer "
                         f"parameter {name!r} needs {shape}")
    # torch.tensor copies: exported arrays may be read-only views of device buffers.
    parts = [torch.tensor(np.asarray(tensors[n], np.float32)) for n in names]
    new[name] = torch.stack(parts).reshape(state[name].shape)
    used.update(names)
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"{len(unused)} public tensor(s) have no peer parameter, e.g. {unused[:3]}")
  peer.load_state_dict(new, strict=True)


def peer_tensors(peer) -> dict[str, np.ndarray]:
  """The peer's parameters under the public names (f32 host copies): load_public's inverse."""
  out, state = {}, peer.state_dict()
  for name, (names, shape) in public_parts(state).items():
    t = state[name].detach().float().numpy()
    if t.size:
      out.update(zip(names, np.copy(t.reshape((len(names),) + shape))))
  return out


def new_peer(cfg: ModelConfig, attn_implementation: str | None = None,
             experts_implementation: str | None = None):
  """A peer (PeerLM, in training mode) of model `cfg` with transformers' random weights."""
  import torch
  import transformers

  hf = hf_text_config(cfg, attn_implementation, experts_implementation)
  return _peer_class()(transformers.DeepseekOcr2TextModel(hf).float(),
                       torch.nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)).train()


def build_peer(cfg: ModelConfig, params: Any, attn_implementation: str | None = None,
               experts_implementation: str | None = None):
  """The peer (PeerLM, in training mode) of model `cfg` holding `params`, the model's
  nnx.Param state (any mesh: each tensor is fetched to the host)."""
  peer = new_peer(cfg, attn_implementation, experts_implementation)
  load_public(peer, dict(public_tensors(cfg, params)))
  return peer


def peer_batch(batch: Mapping[str, np.ndarray]):
  """A training batch dict (inputs, targets, weights, segment_ids) -> (input_ids, labels),
  [B, S] int64 torch tensors, labels IGNORE_INDEX where the weight is 0. The peer attends
  causally over whole rows: the batch must hold one document per row, weights 0 or 1."""
  import torch

  weights, seg = np.asarray(batch["weights"]), np.asarray(batch["segment_ids"])
  if not np.all((weights == 0) | (weights == 1)):
    raise ValueError("peer_batch: weights must be 0 or 1 (the peer's loss is a plain mean)")
  if np.any(seg != seg[:, :1]) or np.any(seg == 0):
    raise ValueError("peer_batch: each row must be one document (the peer has no document mask)")
  labels = np.where(weights > 0, np.asarray(batch["targets"]), IGNORE_INDEX)
  return (torch.as_tensor(np.asarray(batch["inputs"], np.int64)),
          torch.as_tensor(labels.astype(np.int64)))


def peer_lm_loss(peer, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Mean next-token cross-entropy over the labelled positions (moe.model.loss.lm_loss)."""
  import torch.nn.functional as F

  logits = peer(input_ids)
  return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
