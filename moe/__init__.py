"""DeepSeekMoE in JAX/Flax (NNX). One concern per subpackage, from the bottom up; each
imports only itself and those above it in this list (tests/test_layout.py checks):

    dispatch  how (token, choice) rows reach experts: sorting, capacity slots, backends
              (XLA loops, the C++ CPU kernel, Pallas), built when first resolved
    parallel  meshes, logical-axis sharding rules, expert parallelism, multi-host setup
    model     the config, presets, layers, routers, the MoE layer, the decoder, counts
    hub       the public DeepSeek-MoE checkpoint format
    train     state, steps, the loop, evaluation, optimizer, checkpoints, metrics, AOT plan
    research  sweeps and the paper's analyses

The top-level modules `cache`, `cpu_threads` and `scoped` are leaves that any of them may use.
"""

from moe.cpu_threads import reserve_collective_threads

reserve_collective_threads()  # before any JAX backend starts (see moe/cpu_threads.py)
