"""Dropless dispatch backends by name (`ModelConfig.dispatch_backend`), built on first use
so that importing the model loads neither Pallas nor the C++ kernel.

    cpu_ffi          C++ XLA FFI kernel, whole experts per CPU thread (moe.dispatch.cpu_kernel)
    fused            one XLA loop per pass: gather, SwiGLU, scatter per chunk (fused_loop)
    tiled            XLA gathers + grouped matmul as loops over row tiles (tiled_gmm)
    ragged_dot       XLA gathers + jax.lax.ragged_dot
    ragged_or_fused  ragged_dot while XLA's dense expansion of it stays small, else fused
    pallas           Pallas DMA gathers + Pallas gmm/tgmm (Mosaic, TPU)
    pallas_interpret the same kernels with interpret=True (tests, anywhere)
    few_tokens       no sort: gathered expert weights per (token, choice), or all experts (decoding)
    tokamax          XLA gathers + tokamax.ragged_dot (Mosaic GPU kernels; optional package)

"auto" picks by platform: Pallas on TPU; on GPU tokamax where installed, else
`ragged_or_fused` (JAX 0.11's XLA:GPU expanded ragged_dot into a dense product per group,
like XLA:CPU; docs/bench_moe_gpu.md; moe.dispatch.gpu); and on CPU the C++ kernel where it
builds, else the fused loop.
"""

from __future__ import annotations

import functools

import jax

from moe.dispatch import sorting, tiled_gmm
from moe.dispatch.backend import Backend, FusedLoopBackend, RaggedOrFusedBackend, ragged_dot_gmm
from moe.dispatch.few_tokens import FewTokensBackend

BACKEND_NAMES = ("cpu_ffi", "fused", "tiled", "ragged_dot", "ragged_or_fused", "pallas",
                 "pallas_interpret", "few_tokens", "tokamax")
NAMES = ("auto", *BACKEND_NAMES)
AUTO = {"tpu": "pallas", "gpu": "ragged_or_fused", "cpu": "cpu_ffi"}

_XLA_MOVES = dict(permute=sorting.permute, combine=sorting.unpermute)


def _pallas(interpret: bool) -> Backend:
  from pallas_kernels import ops

  # The rows past sorting.n_routed are "no expert" pairs: the kernels copy none of them.
  return Backend(
      gmm=lambda lhs, rhs, gs: ops.gmm(lhs, rhs, gs, None, interpret),
      permute=lambda x, r, k: ops.permute(x, r.order, k, interpret, sorting.n_routed(r)),
      combine=lambda y, r, gates: ops.combine(y, r.order, gates, interpret, sorting.n_routed(r)),
  )


def _tokamax() -> Backend:
  from moe.dispatch import gpu

  usable, why = gpu.tokamax_status()
  if not usable:
    raise ValueError(f"dispatch backend 'tokamax': {why}")
  return Backend(gmm=gpu.tokamax_gmm, **_XLA_MOVES)


def _cpu_ffi() -> Backend:
  from moe.dispatch.cpu_kernel import CpuKernelBackend

  return CpuKernelBackend(gmm=tiled_gmm.gmm, **_XLA_MOVES)


_BUILDERS = {
    "cpu_ffi": _cpu_ffi,
    "fused": lambda: FusedLoopBackend(gmm=tiled_gmm.gmm, **_XLA_MOVES),
    "tiled": lambda: Backend(gmm=tiled_gmm.gmm, **_XLA_MOVES),
    "ragged_dot": lambda: Backend(gmm=ragged_dot_gmm, **_XLA_MOVES),
    "ragged_or_fused": lambda: RaggedOrFusedBackend(
        gmm=None, small=get("ragged_dot"), large=get("fused"), **_XLA_MOVES),
    "pallas": lambda: _pallas(interpret=False),
    "pallas_interpret": lambda: _pallas(interpret=True),
    "few_tokens": lambda: FewTokensBackend(gmm=tiled_gmm.gmm, **_XLA_MOVES),
    "tokamax": lambda: _tokamax(),
}
assert tuple(_BUILDERS) == BACKEND_NAMES


def _check(name: str) -> None:
  if name not in NAMES:
    raise ValueError(f"unknown dispatch backend {name!r}; use one of {NAMES}")


@functools.cache
def get(name: str) -> Backend:
  """The backend called `name` (not "auto"), built once."""
  _check(name)
  return _BUILDERS[name]()


def resolve(name: str, platform: str | None = None) -> Backend:
  """The backend called `name`; "auto" chooses by `platform` (default: JAX's default)."""
  _check(name)
  return get(default_name(platform) if name == "auto" else name)


def default_name(platform: str | None = None) -> str:
  """The backend "auto" picks on `platform` (default: this machine's default JAX platform);
  on CPU the C++ FFI kernel where it builds (moe.dispatch.cpu_kernel.status() says why
  not), else the fused loop."""
  platform = platform or jax.default_backend()
  if platform == "gpu":
    from moe.dispatch import gpu

    return gpu.default_name()
  name = AUTO.get(platform, "fused")
  if name == "cpu_ffi":
    from moe.dispatch import cpu_kernel

    if not cpu_kernel.available():
      return "fused"
  return name


def concrete_name(name: str, n_rows: int, rhs: jax.Array) -> str:
  """The backend that runs a layer of `n_rows` routed rows and expert weights like `rhs`
  ([G, k, n]) under `name` ("auto" and "ragged_or_fused" resolved)."""
  _check(name)
  name = default_name() if name == "auto" else name
  if name == "ragged_or_fused":
    return "ragged_dot" if get(name).picks_small(n_rows, rhs) else "fused"
  return name
