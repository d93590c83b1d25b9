"""GPT-MoE, RoBERTa-MoE, T5-MoE and Swin-MoE built from parallel layers; recipes of the
paper's sizes.

- ``base``: :class:`StageModel`, what every model class declares (layer counts, tokens per
  sample, synthetic batches); ``registry``: ``MODEL_CLASSES`` (kind -> class), ``model_class``;
- ``gpt`` / ``roberta`` / ``t5``: the language models; ``transformer``, ``embedding``: their
  parts; ``classification``: GPT-MoE with a GLUE classification head; ``swin``: Swin-MoE;
- ``recipes``: named configurations, ``build_model(kind, ...)``, ``count_parameters``;
- ``synthetic``: ``synthetic_batch(kind, ...)`` for benchmarks and tests.

The names below are loaded from their module on first use, so that ``python -m
megatron_lsh.models.recipes`` does not import the module twice (runpy warns) and importing
the package stays cheap.
"""

_FROM_RECIPES = ("RECIPES", "build_model", "count_parameters", "get_recipe")
_FROM_REGISTRY = ("MODEL_CLASSES", "model_class")

__all__ = [*_FROM_RECIPES, *_FROM_REGISTRY]


def __getattr__(name: str):
    """Import the defining module on first access to one of the exported names (PEP 562)."""
    if name in _FROM_RECIPES:
        from megatron_lsh.models import recipes
        return getattr(recipes, name)
    if name in _FROM_REGISTRY:
        from megatron_lsh.models import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
