"""Mixed-precision AdamW: fp32 master weights, loss scaling, clipping.

:class:`MixedPrecisionOptimizer` wraps AdamW (apex ``FusedAdam`` on CUDA when importable, else
``torch.optim.AdamW``). For bf16 / fp16 models it keeps an fp32 master copy of every parameter,
steps the master copies with fp32 gradients and copies them back into the half parameters. For
fp32 models the master *is* the parameter. :class:`~megatron_lsh.parallel.distributed_optimizer.
DistributedOptimizer` (ZeRO-1) shares the step logic and shards masters and state over DP;
:func:`~megatron_lsh.parallel.optimizer_factory.build_optimizer` picks one of the two for a run.

One step (:meth:`MixedPrecisionOptimizer.step`), numbered as it happens:

1. gather fp32 gradients onto the masters (``param.main_grad`` from the DDP buffer, else
   ``param.grad`` cast to fp32);
2. fp16 (dynamic loss scaler): unscale by ``1/scale`` and check for inf/nan; the found-inf flag
   is all-reduced (MAX) over the whole world, so every rank of every group skips together;
   a skipped step still updates the scaler (back-off) and returns ``stepped=False``;
3. global grad norm (counting every parameter once across TP/PP/DP/EP) and clipping;
4. AdamW step on the masters (no weight decay for 1-D parameters: biases and norms);
5. copy the masters back into the model parameters.

The learning rate lives in ``optimizer.param_groups[i]["lr"]`` (a scheduler sets it there, or
calls :meth:`set_lr`).

Checkpoints: ``state_dict()`` holds the inner optimizer state, the loss scaler and (for half
models) the fp32 masters. It is replicated over data-parallel ranks, so DP rank 0 of each
(tp, pp, ep) position saves it; the ZeRO-1 optimizer's is per rank (see its module).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_lsh.config import OptimizerConfig
from megatron_lsh.parallel.data_parallel import DistributedDataParallel
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.grad_norm import clip_grads_by_norm, get_grad_norm
from megatron_lsh.parallel.loss_scaler import ConstantLossScaler, LossScaler

try:  # apex is optional; its FusedAdam is used on CUDA when present
    from apex.optimizers import FusedAdam as _ApexFusedAdam
except ImportError:  # pragma: no cover - apex is not installed in CI
    _ApexFusedAdam = None

STATE_FORMAT = "megatron_lsh.mixed_precision_optimizer/1"


class StepResult(NamedTuple):
    """What one optimizer step did (unpacks as a tuple)."""

    stepped: bool
    """False when the step was skipped for inf/nan gradients (fp16)."""
    grad_norm: float
    """Global gradient norm before clipping (NaN when the step was skipped)."""
    loss_scale: float
    """The loss scale used for this step's gradients."""


def make_adamw(param_groups: list, config: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``: apex FusedAdam if importable and the params are on CUDA."""
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    on_cuda = all(p.is_cuda for g in param_groups for p in g["params"])
    if _ApexFusedAdam is not None and torch.cuda.is_available() and on_cuda:
        return _ApexFusedAdam(param_groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


def weight_decay_groups(params: Sequence[torch.Tensor], decays: Sequence[bool],
                        weight_decay: float) -> list:
    """Two param groups: with ``weight_decay`` and without (biases and norms); empty ones dropped.

    Each group carries Megatron's ``wd_mult`` / ``lr_mult``: a scheduler that rewrites
    ``weight_decay = wd * wd_mult`` keeps biases and norms undecayed.
    """
    with_wd = [p for p, d in zip(params, decays) if d]
    without = [p for p, d in zip(params, decays) if not d]
    groups = [{"params": with_wd, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": without, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


def unscale_and_check(grads: list, inv_scale: float) -> bool:
    """Multiply ``grads`` by ``inv_scale`` in place; True if any is inf/nan (local only)."""
    if not grads:
        return False
    found_inf = torch.zeros(1, dtype=torch.float32, device=grads[0].device)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, found_inf, torch.full((1,), inv_scale, device=grads[0].device))
    except (RuntimeError, NotImplementedError):  # a backend without the fused kernel
        for g in grads:
            g.mul_(inv_scale)
            found_inf = torch.maximum(found_inf, (~torch.isfinite(g)).any().float().view(1))
    return bool(found_inf.item())


def world_any(flag: bool, device: torch.device) -> bool:
    """OR of ``flag`` over every rank of the world (all ranks must call together)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def unique_params(model_chunks: Sequence[nn.Module]) -> list:
    """Trainable parameters of all chunks, each once, in registration order."""
    seen, params = set(), []
    for chunk in model_chunks:
        for p in chunk.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class MixedPrecisionOptimizer:
    """AdamW with fp32 master weights, loss scaling, inf/nan skipping and global clipping.

    Args:
        model_chunks: the model (or its virtual-pipeline chunks), plain or wrapped in
            :class:`DistributedDataParallel` (then gradients come from ``main_grad``).
        config: learning rate, AdamW, clipping (``clip_grad``; 0 disables clipping).
        groups: process groups for the grad norm.
        loss_scaler: defaults to a constant scale of 1.
        check_for_nonfinite: skip steps with inf/nan gradients; defaults to
            ``loss_scaler.dynamic`` (fp16). Costs one world all-reduce per step.
    """

    def __init__(self, model_chunks: Union[nn.Module, Sequence[nn.Module]],
                 config: OptimizerConfig, groups: ProcessGroups,
                 loss_scaler: Optional[LossScaler] = None,
                 check_for_nonfinite: Optional[bool] = None):
        self.model_chunks = ([model_chunks] if isinstance(model_chunks, nn.Module)
                             else list(model_chunks))
        self.config = config
        self.groups = groups
        self.loss_scaler = loss_scaler or ConstantLossScaler()
        self.check_for_nonfinite = (self.loss_scaler.dynamic if check_for_nonfinite is None
                                    else check_for_nonfinite)
        self.model_params = unique_params(self.model_chunks)
        self.param_names: Optional[list] = None
        """Names of ``model_params`` (set by the trainer): saved with the state so a checkpoint
        can be resharded into another layout by name."""
        self._build_main_params()
        self.optimizer = (make_adamw(weight_decay_groups(self._main_params, self._decays,
                                                         config.weight_decay), config)
                          if self._main_params else None)

    # -- layout (overridden by the distributed optimizer) ---------------------------------------
    def _build_main_params(self) -> None:
        """One master per model parameter: the parameter itself when fp32, else an fp32 copy."""
        self._main_params = [p if p.dtype == torch.float32
                             else p.detach().clone().float() for p in self.model_params]
        self._attr_params = self.model_params  # supply is_expert / tensor_model_parallel
        self._decays = [p.ndim > 1 for p in self.model_params]
        self._grad_norm_dp_sharded = False

    def _load_main_grads(self) -> None:
        """Point each master's ``.grad`` at the fp32 gradient of its parameter."""
        for p, main in zip(self.model_params, self._main_params):
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is None:
                main.grad = None
            elif main is p and g is p.grad:
                pass  # fp32 without DDP: the gradient is already in place
            else:
                main.grad = g if g.dtype == torch.float32 else g.float()

    @torch.no_grad()
    def _copy_main_to_model(self) -> None:
        for p, main in zip(self.model_params, self._main_params):
            if main is not p:
                p.copy_(main)

    # -- public API -------------------------------------------------------------------------
    @property
    def param_groups(self) -> list:
        """The inner optimizer's param groups (each has ``lr`` and ``weight_decay``)."""
        return self.optimizer.param_groups if self.optimizer is not None else []

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every param group."""
        for group in self.param_groups:
            group["lr"] = lr

    def get_lr(self) -> float:
        """The learning rate of the first param group (the config's when there is none)."""
        return self.param_groups[0]["lr"] if self.param_groups else self.config.lr

    def get_loss_scale(self) -> float:
        """The current loss scale (the pipeline schedule multiplies each backward's loss by it)."""
        return self.loss_scaler.scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: call ``.backward()`` on this (a no-op scale of 1 for bf16 / fp32)."""
        scale = self.loss_scaler.scale
        return loss if scale == 1.0 else loss * scale

    def zero_grad(self) -> None:
        """Clear every gradient: DDP buffers, ``param.grad`` and master gradients."""
        for chunk in self.model_chunks:
            if isinstance(chunk, DistributedDataParallel):
                chunk.zero_grad_buffer()
        for p in self.model_params:
            p.grad = None
        for main in self._main_params:
            main.grad = None

    def _device(self) -> torch.device:
        return self.model_params[0].device if self.model_params else torch.device("cpu")

    @torch.no_grad()
    def step(self) -> StepResult:
        """One optimizer step on the reduced gradients; see the module docstring for the phases.

        Every rank of the world must call it (found-inf and grad-norm collectives).
        """
        loss_scale = self.loss_scaler.scale
        self._load_main_grads()
        grads = [m.grad for m in self._main_params]
        present = [g for g in grads if g is not None]
        if self.check_for_nonfinite:
            found_inf = unscale_and_check(present, self.loss_scaler.inv_scale)
            found_inf = world_any(found_inf, self._device())
            self.loss_scaler.update(found_inf)
            if found_inf:
                self._clear_main_grads()
                return StepResult(False, float("nan"), loss_scale)
        elif loss_scale != 1.0 and present:
            torch._foreach_mul_(present, self.loss_scaler.inv_scale)
        grad_norm = get_grad_norm(self._attr_params, self.groups, grads=grads,
                                  dp_sharded=self._grad_norm_dp_sharded)
        if self.config.clip_grad > 0:
            clip_grads_by_norm(present, self.config.clip_grad, grad_norm)
        if self.optimizer is not None:
            self.optimizer.step()
        self._clear_main_grads()
        self._copy_main_to_model()
        return StepResult(True, grad_norm, loss_scale)

    def _clear_main_grads(self) -> None:
        for main in self._main_params:
            main.grad = None

    def _layout(self) -> list:
        return [tuple(p.shape) for p in self.model_params]

    def state_dict(self) -> dict:
        """Inner optimizer, loss scaler and fp32 masters of half parameters (None for fp32)."""
        half = any(m is not p for p, m in zip(self.model_params, self._main_params))
        return {
            "format": STATE_FORMAT,
            "layout": self._layout(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "loss_scaler": self.loss_scaler.state_dict(),
            "main_params": ([m.detach().clone() for m in self._main_params] if half else None),
            "param_names": self.param_names,
        }

    def _set_adam_state(self, main: torch.Tensor, step: int, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor) -> None:
        """AdamW's state of one master, as torch's AdamW keeps it (nothing before a step)."""
        if self.optimizer is None or step <= 0:
            return
        self.optimizer.state[main] = {
            "step": torch.tensor(float(step), dtype=torch.float32),
            "exp_avg": exp_avg.to(main.device, torch.float32).reshape(main.shape).clone(),
            "exp_avg_sq": exp_avg_sq.to(main.device, torch.float32).reshape(main.shape).clone()}

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Copy the model's weights into the fp32 masters: after weights were loaded into the
        model without optimizer state (``--finetune``, ``--no-load-optim``, a pretrained
        body), else the next step would write the masters' stale values back."""
        for p, main in zip(self.model_params, self._main_params):
            if main is not p:
                main.copy_(p)

    @torch.no_grad()
    def load_resharded_state(self, value_of, step_of) -> None:
        """Set masters and AdamW state from another layout's checkpoint: ``value_of(param,
        key)`` is this rank's part of ``param``'s ``master`` / ``exp_avg`` / ``exp_avg_sq``
        (its local shape), ``step_of(param)`` its AdamW step count."""
        for p, main in zip(self.model_params, self._main_params):
            main.copy_(value_of(p, "master").reshape(main.shape))
            self._set_adam_state(main, step_of(p), value_of(p, "exp_avg"),
                                 value_of(p, "exp_avg_sq"))
        self._copy_main_to_model()

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output; refuses one saved for a different layout."""
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer checkpoint has format {state_dict.get('format')!r}, "
                             f"this optimizer needs {STATE_FORMAT!r}")
        if list(map(tuple, state_dict["layout"])) != self._layout():
            raise ValueError("optimizer checkpoint was saved for different parameter shapes "
                             "than this model's")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        self.loss_scaler.load_state_dict(state_dict["loss_scaler"])
        if state_dict["main_params"] is not None:
            for main, saved in zip(self._main_params, state_dict["main_params"]):
                main.copy_(saved)
            self._copy_main_to_model()

