"""The dispatch benchmark runs end to end at a tiny shape and reports what it promises."""

import json
import math

import pytest

from experiments import bench_moe, bench_routers, probe_ragged_dot
from moe.dispatch import cpu_kernel


def test_layer_benchmark_rows_and_json(tmp_path):
  rows = bench_moe.layer_rows(t=32, d=16, e=4, f=8, k=2, s=1, reps=1, interpret=8,
                              only=("fused", "cpu_ffi", "tiled", "floor", "capacity", "ragged_dot"))
  names = [r.path for r in rows]
  assert names[0].startswith("dense SwiGLU width 24")
  assert any("fused" in n for n in names) and any("ragged_dot" in n for n in names)
  assert sum("floor" in n for n in names) == 3 and "interpret" in names[-1]
  assert [r.default for r in rows].count(True) == 1, "exactly one row is the model's default path"
  default_row = next(r.path for r in rows if r.default)
  assert ("FFI" in default_row) if cpu_kernel.available() else ("fused" in default_row), default_row
  for r in rows:
    assert r.fwd_ms > 0 and r.fwd_bwd_ms > 0 and math.isfinite(r.ratio_to_dense), r
    assert r.peak_temp_bytes >= 0, r
  assert rows[0].ratio_to_dense == 1.0
  out = tmp_path / "bench.json"
  bench_moe.write_json(rows, str(out))
  data = json.loads(out.read_text())
  assert [d["path"] for d in data] == names
  assert set(data[0]) == {"path", "fwd_ms", "fwd_bwd_ms", "peak_temp_bytes", "ratio_to_dense", "default"}
  assert "| path | fwd ms |" in bench_moe.format_table(rows)


def test_ragged_dot_probe_reports_the_dense_expansion():
  result = probe_ragged_dot.probe(rows=64, k=16, n=8, groups=4, dtype="float32", reps=1)
  assert set(result) == {"fwd_ms", "fwd_bwd_ms", "dense_fwd_ms", "fwd_temp_mib", "fwd_bwd_temp_mib",
                         "dense_expansion_mib"}
  assert all(v > 0 for v in result.values()), result
  # XLA:CPU expands ragged_dot densely: what moe.dispatch.backend.ragged_dot_bytes (ragged_or_fused's rule) predicts.
  assert result["fwd_temp_mib"] >= 0.9 * result["dense_expansion_mib"], result
  with pytest.raises(ValueError, match="multiple of --groups"):
    probe_ragged_dot.probe(rows=63, k=16, n=8, groups=4, dtype="float32", reps=1)


def test_router_benchmark_rows_and_the_null_share_table():
  """bench_routers: a routing-only and a whole-layer row per router, each half against topk; the
  zero-compute table's real experts per token and rows multiplied fall with their number."""
  rows = bench_routers.router_rows(t=32, d=16, e=8, f=8, k=2, s=1, reps=1)
  names = [r.path for r in rows]
  assert len(rows) == 8 and names[0].startswith("routing only: topk") and names[4].startswith("layer: topk")
  assert rows[0].ratio_to_dense == rows[4].ratio_to_dense == 1.0
  assert all(r.fwd_bwd_ms > 0 for r in rows)
  table = bench_routers.null_share_table(t=64, d=16, e=8, f=8, k=4, s=1, reps=1).splitlines()[2:]
  cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
  assert [int(c[0]) for c in cells] == [0, 2, 4, 8]
  real = [float(c[1]) for c in cells]
  multiplied = [int(c[2].replace(",", "")) for c in cells]
  assert real[0] == 4.0 and real[-1] < real[0] and multiplied[0] == 64 * 4
  assert multiplied == [round(r * 64) for r in real]  # rows multiplied = the real pairs
