"""Train state: the (model, optimizer) pair as an nnx graphdef and state, created on one
device, abstractly (nothing allocated), or directly in its shards on a mesh."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from moe.model.config import ModelConfig
from moe.model.decoder import Transformer
from moe.parallel.rules import state_shardings
from moe.train.config import TrainConfig
from moe.train.optim import optimizer_of


def create_state(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """(graphdef, state) of (model, optimizer); state is what checkpoints hold."""
  model = Transformer(model_cfg, nnx.Rngs(train_cfg.seed))
  optimizer = nnx.Optimizer(model, optimizer_of(train_cfg, nnx.state(model, nnx.Param)), wrt=nnx.Param)
  return nnx.split((model, optimizer))


def abstract_state(model_cfg: ModelConfig, train_cfg: TrainConfig):
  """(graphdef, state of ShapeDtypeStructs): nothing is allocated."""
  graphdefs = []

  def init():
    graphdef, state = create_state(model_cfg, train_cfg)
    graphdefs.append(graphdef)
    return state

  state = jax.eval_shape(init)
  return graphdefs[0], state


def init_state(model_cfg: ModelConfig, train_cfg: TrainConfig, mesh: Mesh | None):
  """(graphdef, state): on one device, or created directly in its shards on the mesh."""
  if mesh is None:
    return create_state(model_cfg, train_cfg)
  graphdef, abstract = abstract_state(model_cfg, train_cfg)
  shardings = state_shardings(abstract, mesh)
  return graphdef, jax.jit(lambda: create_state(model_cfg, train_cfg)[1], out_shardings=shardings)()
