"""Which mesh dim is tensor parallel, validated at plan time."""

from __future__ import annotations

import socket

from torch.distributed.device_mesh import DeviceMesh

from autoshard.schema.errors import PlanError


def tensor_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D sub-mesh autoshard shards over: the only dim of a 1-D mesh, else the one named "tp"."""
    if not isinstance(mesh, DeviceMesh):
        raise PlanError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    _check_membership(mesh)
    names = mesh.mesh_dim_names
    if mesh.ndim == 1:
        return mesh
    if not names or "tp" not in names:
        raise PlanError(
            f"a {mesh.ndim}-D mesh needs a dim named 'tp' to shard over; this mesh has shape {tuple(mesh.shape)} and "
            f"mesh_dim_names={names}. Build it with init_device_mesh(device, shape, mesh_dim_names=(\"dp\", \"tp\"))"
        )
    return mesh["tp"]


def _check_membership(mesh: DeviceMesh) -> None:
    """Every rank that calls autoshard must hold a place in the mesh, and the mesh may only name
    ranks that exist: otherwise the first collective would hang or fail deep inside forward."""
    import torch.distributed as dist

    ranks = mesh.mesh.flatten().tolist()
    if dist.is_initialized():
        world = dist.get_world_size()
        if max(ranks) >= world:
            raise PlanError(f"the mesh names ranks {sorted(r for r in ranks if r >= world)} but the world has {world} ranks (0..{world - 1})")
    if mesh.get_coordinate() is None:
        rank = dist.get_rank() if dist.is_initialized() else "this process"
        raise PlanError(
            f"rank {rank} is not in the mesh {mesh.mesh.tolist()}: call autoshard only on the mesh's ranks, "
            "or build the mesh over every rank (init_device_mesh)"
        )


def mesh_info(mesh: DeviceMesh) -> dict:
    tp = tensor_parallel_mesh(mesh)
    return {
        "shape": list(mesh.shape),
        "dim_names": list(mesh.mesh_dim_names or []),
        "tp_dim": (tp.mesh_dim_names or ["tp"])[0],
        "tp": tp.size(),
        "device_type": mesh.device_type,
    }


def free_port() -> int:
    """A TCP port free on this host now, for a local process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
