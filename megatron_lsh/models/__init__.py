"""GPT-MoE, RoBERTa-MoE and T5-MoE built from parallel layers; recipes of the paper's sizes."""
from megatron_lsh.models.recipes import RECIPES, build_model, count_parameters, get_recipe

__all__ = ["RECIPES", "build_model", "count_parameters", "get_recipe"]
