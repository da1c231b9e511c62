"""Run under torchrun by test_faults.py: prints the timeout of every kind of group a job creates after
`init_distributed(timeout_s=7)` (default group, a DeviceMesh sub-group, the async-checkpoint gloo group)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from automoe.parallel import init_distributed, shutdown_distributed

if __name__ == "__main__":
    env = init_distributed(timeout_s=7)
    mesh = init_device_mesh("cpu", (1, env.world_size), mesh_dim_names=("a", "b"))
    groups = {"default": None, "mesh_a": mesh.get_group("a"), "mesh_b": mesh.get_group("b")}
    groups["new_group"] = dist.new_group(backend="gloo")
    for name, group in groups.items():
        seconds = (
            (group or dist.group.WORLD)._get_backend(torch.device("cpu")).options._timeout.total_seconds()
        )
        print(f"rank{env.rank} {name} timeout {seconds:g}s", flush=True)
    shutdown_distributed()
