"""The model classes by kind name, for code that is given a kind as a string.

``build_model(kind, ...)``, parameter counts of recipes and ``synthetic_batch(kind, ...)`` look
the class up here; everything else they need comes from the class (see
:class:`~megatron_lsh.models.base.StageModel`). A new model kind is added by one line below.
"""
from __future__ import annotations

from typing import Dict, Type

from megatron_lsh.config import ConfigError
from megatron_lsh.models.base import StageModel
from megatron_lsh.models.classification import GPTClassifier
from megatron_lsh.models.gpt import GPTModel
from megatron_lsh.models.roberta import RobertaModel
from megatron_lsh.models.swin import SwinMoEModel
from megatron_lsh.models.t5 import T5Model

MODEL_CLASSES: Dict[str, Type[StageModel]] = {cls.kind: cls
                                              for cls in (GPTModel, RobertaModel, T5Model,
                                                          GPTClassifier, SwinMoEModel)}
"""Model kind -> model class."""


def model_class(kind: str) -> Type[StageModel]:
    """The model class of ``kind``; a clear error for an unknown kind."""
    if kind not in MODEL_CLASSES:
        raise ConfigError(f"model kind must be one of {sorted(MODEL_CLASSES)}, got {kind!r}")
    return MODEL_CLASSES[kind]
