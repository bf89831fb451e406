from autoshard.choose.strategy import choose

__all__ = ["choose"]
