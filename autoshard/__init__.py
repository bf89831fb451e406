"""autoshard: a compiler-pass auto-sharder for PyTorch.

    sharded = autoshard.autoshard(model, mesh, example_inputs={"input_ids": ids})
    print(sharded.plan.report())
"""

from autoshard.api import autoshard, plan
from autoshard.distributed.initialize import init_weights
from autoshard.distributed.load import load
from autoshard.execute.materialize import meta_init
from autoshard.schema.errors import PlanError
from autoshard.schema.plan import Plan

__all__ = ["autoshard", "plan", "load", "init_weights", "meta_init", "Plan", "PlanError"]
__version__ = "0.1.0"
