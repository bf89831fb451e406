"""Which mesh dim is tensor parallel, validated at plan time."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from autoshard.errors import PlanError


def tensor_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D sub-mesh autoshard shards over: the only dim of a 1-D mesh, else the one named "tp"."""
    if not isinstance(mesh, DeviceMesh):
        raise PlanError(f"mesh must be a torch.distributed DeviceMesh, got {type(mesh).__name__}")
    names = mesh.mesh_dim_names
    if mesh.ndim == 1:
        return mesh
    if not names or "tp" not in names:
        raise PlanError(
            f"a {mesh.ndim}-D mesh needs a dim named 'tp' to shard over; this mesh has mesh_dim_names={names}. "
            "Build it with init_device_mesh(device, shape, mesh_dim_names=(\"dp\", \"tp\"))"
        )
    return mesh["tp"]


def mesh_info(mesh: DeviceMesh) -> dict:
    tp = tensor_parallel_mesh(mesh)
    return {
        "shape": list(mesh.shape),
        "dim_names": list(mesh.mesh_dim_names or []),
        "tp_dim": (tp.mesh_dim_names or ["tp"])[0],
        "tp": tp.size(),
        "device_type": mesh.device_type,
    }
