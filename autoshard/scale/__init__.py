"""Planning at scale: plan deep models by capturing a few of their identical layers.

    from autoshard.scale import plan_layers_once
    result = plan_layers_once(model, mesh, {"input_ids": ids})   # result.plan, result.timings
"""

from autoshard.scale.fast import PlanningResult, plan_layers_once
from autoshard.graph.layers import LayerStack, find_layer_stack, truncated

__all__ = ["PlanningResult", "plan_layers_once", "LayerStack", "find_layer_stack", "truncated"]
