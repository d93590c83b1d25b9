"""GPT-MoE, RoBERTa-MoE and T5-MoE built from parallel layers; recipes of the paper's sizes.

The names below are loaded from :mod:`megatron_lsh.models.recipes` on first use, so that
``python -m megatron_lsh.models.recipes`` does not import the module twice (runpy warns).
"""

__all__ = ["RECIPES", "build_model", "count_parameters", "get_recipe"]


def __getattr__(name: str):
    """Import ``recipes`` on first access to one of the exported names (PEP 562)."""
    if name in __all__:
        from megatron_lsh.models import recipes
        return getattr(recipes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
