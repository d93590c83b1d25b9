"""Learning-rate and weight-decay schedule: Megatron's ``OptimizerParamScheduler`` in iterations.

The learning rate at step ``n`` (optimizer steps taken so far, ``n = 0`` before the first):

- warmup, ``n <= W`` (when ``W > 0``): ``init_lr + (max_lr - init_lr) * n / W``;
- ``constant``: ``max_lr`` after warmup;
- past the decay, ``n > D``: ``min_lr``;
- otherwise, with ``r = (n - W) / (D - W)``: ``linear``: ``min_lr + (max_lr - min_lr) * (1 - r)``;
  ``cosine``: ``min_lr + (max_lr - min_lr) * (1 + cos(pi r)) / 2``.

``W`` is ``lr_warmup_iters`` or ``lr_warmup_fraction * D`` (may be fractional, as in Megatron),
``D`` is ``lr_decay_iters`` or ``train_iters``. Weight decay is constant.

Like Megatron, the scheduler writes into ``optimizer.param_groups`` (any object with that
attribute: a list of dicts), honouring per-group ``lr_mult`` and ``wd_mult`` (``wd_mult = 0``
for biases and norms) and per-group ``max_lr`` / ``min_lr`` overrides.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from megatron_lsh.config import ConfigError, OptimizerConfig


def resolve_schedule(optimizer_config: OptimizerConfig, train_iters: int) -> tuple[float, int]:
    """(warmup iters, decay iters) of a config (see ``OptimizerConfig.schedule_iters``)."""
    return optimizer_config.schedule_iters(train_iters)


class OptimizerParamScheduler:
    """Sets each param group's ``lr`` and ``weight_decay`` from the step count (see module doc)."""

    _HYPERPARAMETERS = ("max_lr", "min_lr", "init_lr", "lr_warmup_iters", "lr_decay_iters",
                        "lr_decay_style", "weight_decay")

    def __init__(self, optimizer: Any, *, max_lr: float, min_lr: float = 0.0,
                 lr_warmup_iters: float = 0, lr_decay_iters: int, lr_decay_style: str = "cosine",
                 weight_decay: float = 0.0, init_lr: float = 0.0):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer {type(optimizer).__name__} has no param_groups")
        if lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"lr_decay_style must be 'constant', 'linear' or 'cosine', "
                              f"got {lr_decay_style!r}")
        if not 0.0 <= min_lr <= max_lr:
            raise ConfigError(f"min_lr ({min_lr}) must be in [0, max_lr ({max_lr})]")
        if lr_decay_iters <= 0:
            raise ConfigError(f"lr_decay_iters must be positive, got {lr_decay_iters}")
        if not 0 <= lr_warmup_iters < lr_decay_iters:
            raise ConfigError(f"the learning-rate warmup ({lr_warmup_iters} iterations) must end "
                              f"before lr_decay_iters ({lr_decay_iters})")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = float(max_lr), float(min_lr), float(init_lr)
        self.lr_warmup_iters, self.lr_decay_iters = lr_warmup_iters, lr_decay_iters
        self.lr_decay_style, self.weight_decay = lr_decay_style, float(weight_decay)
        self.num_steps = 0
        self.step(0)

    @classmethod
    def from_config(cls, optimizer: Any, optimizer_config: OptimizerConfig,
                    train_iters: int) -> "OptimizerParamScheduler":
        """Build from the run's optimizer config (decay over train_iters unless set)."""
        warmup_iters, decay_iters = resolve_schedule(optimizer_config, train_iters)
        return cls(optimizer, max_lr=optimizer_config.lr, min_lr=optimizer_config.min_lr,
                   lr_warmup_iters=warmup_iters, lr_decay_iters=decay_iters,
                   lr_decay_style=optimizer_config.lr_decay_style,
                   weight_decay=optimizer_config.weight_decay)

    def get_lr(self, param_group: Optional[dict] = None) -> float:
        """Learning rate at the current step (for ``param_group``'s max/min overrides if given)."""
        group = param_group or {}
        max_lr = group.get("max_lr", self.max_lr)
        min_lr = group.get("min_lr", self.min_lr)
        n = self.num_steps
        if self.lr_warmup_iters > 0 and n <= self.lr_warmup_iters:
            return self.init_lr + (max_lr - self.init_lr) * n / self.lr_warmup_iters
        if self.lr_decay_style == "constant":
            return max_lr
        if n > self.lr_decay_iters:
            return min_lr
        ratio = (n - self.lr_warmup_iters) / (self.lr_decay_iters - self.lr_warmup_iters)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)

    def get_wd(self) -> float:
        """Weight decay at the current step (constant)."""
        return self.weight_decay

    def step(self, increment: int = 1) -> None:
        """Advance ``increment`` optimizer steps and write lr / weight decay into the groups."""
        self.num_steps += increment
        wd = self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = self.get_lr(group) * group.get("lr_mult", 1.0)
            group["weight_decay"] = wd * group.get("wd_mult", 1.0)

    def state_dict(self) -> dict:
        """Step count and hyperparameters (plain python values)."""
        state = {name: getattr(self, name) for name in self._HYPERPARAMETERS}
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: dict, *, use_checkpoint_values: bool = False) -> list[str]:
        """Resume at the saved step; returns the hyperparameters that differ from the checkpoint.

        By default the current (command-line) hyperparameters win, so a resumed run may change
        e.g. ``--train-iters``; with ``use_checkpoint_values`` the saved ones are restored
        (Megatron's ``--use-checkpoint-opt_param-scheduler``). The lr is reapplied either way.
        """
        if "num_steps" not in state:
            raise ConfigError("learning-rate scheduler state has no 'num_steps' entry")
        differing = [name for name in self._HYPERPARAMETERS
                     if name in state and state[name] != getattr(self, name)]
        if use_checkpoint_values:
            for name in differing:
                setattr(self, name, state[name])
        self.num_steps = 0
        self.step(int(state["num_steps"]))
        return differing
