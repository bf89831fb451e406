"""A ParallelStyle torch does not ship, for plans exported to `parallelize_module`."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class ReplicateParameters(ParallelStyle):
    """Make a module's parameters replicated DTensors, leaving its inputs and outputs alone.

    For parameters applied to sharded activations (Qwen3's per-head `q_norm`/`k_norm`, K/V
    projections kept whole when KV heads cannot be split): as plain tensors their gradients would
    be one rank's partial sum — silently wrong; as `Replicate` DTensors DTensor sums them.

    Example::
        >>> parallelize_module(model, mesh, {"model.layers.0.self_attn.q_norm": ReplicateParameters()})
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name, mod, mesh):
            for pname, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]), requires_grad=p.requires_grad))

        return distribute_module(module, device_mesh, replicate)
