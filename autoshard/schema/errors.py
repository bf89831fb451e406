"""Errors autoshard raises at plan time, before any collective runs."""


class PlanError(ValueError):
    """The model/mesh/input combination cannot be sharded as asked.

    The message names the constraint, the model attribute involved and the legal choices, so the
    user can fix the call instead of debugging a crash deep inside forward.
    """


class MemoryBudgetError(PlanError):
    """No legal plan fits `memory_budget` per rank (activation checkpointing may still make one fit)."""
