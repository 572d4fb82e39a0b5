"""Running on many devices: meshes and the active mesh, the logical-axis sharding rules,
expert parallelism (shard_map + all_to_all), joining the hosts of a pod."""
