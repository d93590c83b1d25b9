"""Loading a checkpoint into another parallel layout (TP / PP / EP / DP / ZeRO-1 sizes).

A checkpoint holds, per (tp, pp, ep) position, the model shard of that position (and, unless
the optimizer is sharded over DP, its optimizer state); with ZeRO-1 every DP rank also wrote
its own optimizer shard (see :mod:`~megatron_lsh.training.checkpointing`). Parameter names do
not depend on the layout (layers are numbered globally), so a tensor of the new layout is
rebuilt by name, one tensor at a time:

1. *local pieces*: for each source position holding the name, its local tensor (the model
   shard, or for ZeRO-1 optimizer state the union of the flat slices of the DP ranks);
2. *full tensor*: TP-partitioned tensors are concatenated along their partition dim in TP-rank
   order (the inverse of the initial sharding, fused strides included), expert tensors along
   dim 0 in EP-rank order, replicated ones taken from the first position;
3. *this rank's part*: cut out of the full tensor as the new layout's TP / EP rank owns it,
   and for a ZeRO-1 target, the flat slice of each of its shards.

Files are opened memory-mapped after their checksum is verified, and one full tensor is
assembled at a time, so a process allocates its own shard plus one full tensor; it still
reads every file that holds a piece it needs (for a TP or EP change, the whole checkpoint). The optimizer's fp32
masters, AdamW moments and step counts follow the same path; the learning-rate schedule, loss
scaler, iteration and consumed samples are layout-free and are taken as they are. RNG states
belong to ranks of the old layout and are not restored (the run says so): with dropout on,
the continuation is a different random stream, not an error.

Optimizer state can be resharded only from checkpoints that record the names of its
parameters (``param_names``, written since this module exists); older ones reshard the model
and ask for ``--no-load-optim``.
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Iterable, Optional

import torch

from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import shard_master_weight, unshard_master_weight
from megatron_lsh.training.checkpoint_files import (MODEL_FILE, CheckpointError, gather_problems,
                                                   raise_first, safe_load)

_POSITION = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_DP_FILE = re.compile(r"^distrib_optim_dp(\d{3})\.pt$")
ALIASES = {"output_layer.weight": "embedding.word_embeddings.weight"}
"""A tied output layer's copy on the last pipeline stage is the word embedding: a layout
without that stage split has only the embedding (and the other way round)."""


def parse_position(name: str, layout: dict) -> Optional[tuple[int, int, int]]:
    """``mp_rank_TT[_PPP][_EEE]`` -> (tp, pp, ep) under ``layout`` (None if not a position)."""
    m = _POSITION.match(name)
    if not m:
        return None
    parts = [int(x) for x in m.groups() if x is not None]
    tp = parts.pop(0)
    pp = parts.pop(0) if layout.get("pipeline_model_parallel_size", 1) > 1 else 0
    ep = parts.pop(0) if layout.get("expert_model_parallel_size", 1) > 1 else 0
    return (tp, pp, ep) if not parts else None


class TensorSpec:
    """How a tensor of the model is split: over TP (``partition_dim``, ``stride``) or EP."""

    def __init__(self, tensor: torch.Tensor):
        self.tp = bool(getattr(tensor, "tensor_model_parallel", False))
        self.partition_dim = getattr(tensor, "partition_dim", 0)
        self.stride = getattr(tensor, "partition_stride", 1)
        self.expert = bool(getattr(tensor, "is_expert", False))

    def full(self, local: dict, where: str, tp_size: int, ep_size: int) -> torch.Tensor:
        """The full tensor from ``{(tp, ep): local tensor}`` of the source positions (which
        need not hold every (tp, ep) pair: EP is carved out of the DP x TP ranks)."""
        def pick(tp=None, ep=None):
            for (t, e), tensor in sorted(local.items()):
                if (tp is None or t == tp) and (ep is None or e == ep):
                    return tensor
            missing = ", ".join(f"{k} rank {v}" for k, v in (("tp", tp), ("ep", ep))
                                if v is not None)
            raise CheckpointError(f"the checkpoint has no shard of {where!r} at {missing}")

        if self.tp and self.expert:
            per_ep = [unshard_master_weight([pick(t, e) for t in range(tp_size)], self.partition_dim,
                               self.stride) for e in range(ep_size)]
            return torch.cat(per_ep, dim=0)
        if self.tp:
            return unshard_master_weight([pick(tp=t) for t in range(tp_size)], self.partition_dim,
                            self.stride)
        if self.expert:
            return torch.cat([pick(ep=e) for e in range(ep_size)], dim=0)
        return pick()

    def mine(self, full: torch.Tensor, groups: ProcessGroups) -> torch.Tensor:
        """This rank's part of ``full`` in the new layout."""
        if self.expert and groups.ep_size > 1:
            full = full.chunk(groups.ep_size, dim=0)[groups.ep_rank]
        if self.tp and groups.tp_size > 1:
            full = shard_master_weight(full, self.partition_dim, groups.tp_size, groups.tp_rank,
                                       self.stride)
        return full


class SourceCheckpoint:
    """The files of one checkpoint folder, read lazily (memory-mapped, checksums verified)."""

    def __init__(self, folder: str, metadata: dict, layout: dict):
        self.folder, self.layout = folder, layout
        self.records = metadata.get("files") if isinstance(metadata.get("files"), dict) else None
        self.positions: dict = {}
        for name in sorted(os.listdir(folder)):
            position = parse_position(name, layout)
            if position is not None and os.path.isdir(os.path.join(folder, name)):
                self.positions[position] = name
        if not self.positions:
            raise CheckpointError(f"checkpoint {folder} holds no shard folders (mp_rank_*)")
        self.tp_size = layout.get("tensor_model_parallel_size", 1)
        self.ep_size = layout.get("expert_model_parallel_size", 1)
        self._cache: dict = {}

    def _load(self, relative: str):
        if relative not in self._cache:
            record = None
            if self.records is not None:
                record = self.records.get(relative)
                if record is None:
                    raise CheckpointError(f"checkpoint file {os.path.join(self.folder, relative)}"
                                          f" is not listed in its metadata")
            path = os.path.join(self.folder, relative)
            self._cache[relative] = safe_load(path, "cpu", record, mmap=True)
        return self._cache[relative]

    def model_file(self, position: tuple) -> dict:
        """The model / optimizer / rng file of a (tp, pp, ep) position."""
        state = self._load(f"{self.positions[position]}/{MODEL_FILE}")
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise CheckpointError(f"checkpoint file {self.positions[position]}/{MODEL_FILE} in "
                                  f"{self.folder} holds no model state")
        return state

    def dp_files(self, position: tuple) -> list:
        """The per-DP-rank files (ZeRO-1 optimizer shards) of a position, in DP-rank order."""
        folder = os.path.join(self.folder, self.positions[position])
        names = sorted(n for n in os.listdir(folder) if _DP_FILE.match(n))
        return [self._load(f"{self.positions[position]}/{n}") for n in names]


class Resharder:
    """Rebuild this rank's model and optimizer state from a checkpoint of another layout."""

    def __init__(self, source: SourceCheckpoint, groups: ProcessGroups,
                 log: Callable[[str], None] = print):
        self.source, self.groups, self.log = source, groups, log
        self._problem: Optional[str] = None

    def _note(self, error: CheckpointError) -> None:
        """Remember this rank's first problem; every rank goes on to the same collectives
        and :meth:`_check` raises it everywhere (no rank left waiting in one)."""
        if self._problem is None:
            self._problem = str(error)

    def _check(self, what: str) -> None:
        """Raise the first rank's problem on every rank (collective)."""
        problem, self._problem = self._problem, None
        raise_first(gather_problems(problem), what)

    # -- the model --------------------------------------------------------------------------
    def _model_pieces(self, name: str) -> dict:
        for candidate in (name, ALIASES.get(name)):
            pieces = {}
            for (tp, pp, ep), _ in sorted(self.source.positions.items()):
                tensor = self.source.model_file((tp, pp, ep))["model"].get(candidate)
                if tensor is not None and (tp, ep) not in pieces:
                    pieces[(tp, ep)] = tensor
            if pieces:
                return pieces
        return {}

    @torch.no_grad()
    def load_model(self, model: torch.nn.Module,
                   ignore: Optional[Callable[[str], bool]] = None,
                   optional: Optional[Callable[[str], bool]] = None) -> None:
        """Fill every parameter and buffer of ``model`` (this rank's stage) from the checkpoint.

        ``ignore(name)``: checkpoint tensors the model may lack (e.g. a compressor's state
        when the model is built without compression). ``optional(name)``: model tensors the
        checkpoint may lack, left as initialised then (e.g. a fine-tuning head on a
        pretrained body)."""
        specs = {n: TensorSpec(t) for n, t in list(model.named_parameters())
                 + list(model.named_buffers())}
        state = model.state_dict()
        for name, target in state.items():
            if optional is not None and optional(name) and not self._model_pieces(name):
                continue
            try:
                self._load_tensor(name, target, specs.get(name) or TensorSpec(target))
            except CheckpointError as error:
                self._note(error)
                break
        unknown = {n for n in self._unknown_names(set(state)) if not (ignore and ignore(n))}
        if unknown:
            self._note(CheckpointError(
                f"checkpoint {self.source.folder} holds {len(unknown)} tensors this model does "
                f"not have, e.g. {sorted(unknown)[0]!r}: it was saved from another model"))
        self._check(f"resharding {self.source.folder}")

    def _load_tensor(self, name: str, target: torch.Tensor, spec: TensorSpec) -> None:
        pieces = self._model_pieces(name)
        if not pieces:
            raise CheckpointError(f"checkpoint {self.source.folder} has no tensor {name!r} "
                                  f"(was it saved from another model?)")
        value = spec.mine(spec.full(pieces, name, self.source.tp_size, self.source.ep_size),
                          self.groups)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)} in "
                                  f"this layout, the model needs {tuple(target.shape)}: it was "
                                  f"saved from another model")
        target.copy_(value)

    def _unknown_names(self, mine: set) -> set:
        """Names of the checkpoint that no stage of the new model has (checked stage-wide:
        names of other pipeline stages of the new layout are expected)."""
        import torch.distributed as dist
        names = set()
        for position in self.source.positions:
            names |= set(self.source.model_file(position)["model"])
        if dist.is_available() and dist.is_initialized():
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, sorted(mine))
            mine = set().union(*map(set, everyone))
        return {n for n in names - mine if not (n in ALIASES and ALIASES[n] in mine)}

    def loss_scaler_state(self) -> Optional[dict]:
        """The loss scaler's state (the same on every rank), or None when not saved."""
        position = min(self.source.positions)
        model_state = self.source.model_file(position)
        states = ([model_state.get("optimizer")] if "optimizer" in model_state
                  else [f.get("optimizer") for f in self.source.dp_files(position)])
        return next((s["loss_scaler"] for s in states if s and "loss_scaler" in s), None)

    # -- the optimizer ----------------------------------------------------------------------
    def _optimizer_pieces(self) -> dict:
        """``{name: {(tp, ep): {key: flat local tensor}, 'step': n}}`` over all positions."""
        out: dict = {}
        for (tp, pp, ep), _ in sorted(self.source.positions.items()):
            model_state = self.source.model_file((tp, pp, ep))
            if "optimizer" in model_state:
                states = [model_state["optimizer"]]
            else:
                states = [f.get("optimizer") for f in self.source.dp_files((tp, pp, ep))]
            if not states or any(s is None for s in states):
                raise CheckpointError(f"checkpoint {self.source.folder} has no optimizer state "
                                      f"for shard {self.source.positions[(tp, pp, ep)]}; load it "
                                      f"with --no-load-optim")
            for sd in states:
                for name, key, offset, flat, step in _optimizer_records(sd, model_state["model"]):
                    entry = out.setdefault(name, {"step": step})
                    entry["step"] = max(entry["step"], step)
                    local = entry.setdefault((tp, ep), {})
                    local.setdefault(key, []).append((offset, flat))
        return out

    @torch.no_grad()
    def load_optimizer(self, optimizer, names: dict) -> None:
        """Fill ``optimizer``'s fp32 masters and AdamW state; ``names``: param id -> name.

        A problem on one rank (state missing for a name, shards not covering a tensor) is
        raised on every rank after the optimizer's own collectives have run."""
        try:
            pieces = self._optimizer_pieces()
        except CheckpointError as error:
            self._note(error)
            pieces = None
        full_cache: dict = {}

        def local_value(param: torch.Tensor, key: str) -> torch.Tensor:
            try:
                return value(param, key)
            except CheckpointError as error:
                self._note(error)
                return torch.zeros(param.shape, dtype=torch.float32)

        def value(param: torch.Tensor, key: str) -> torch.Tensor:
            if pieces is None:
                raise CheckpointError("no optimizer state")
            name = names[id(param)]
            if name not in pieces and ALIASES.get(name) in pieces:
                name = ALIASES[name]
            if name not in pieces:
                raise CheckpointError(f"checkpoint {self.source.folder} has no optimizer state "
                                      f"for {name!r}")
            if (name, key) not in full_cache:
                spec = TensorSpec(param)
                shape = _local_shape(param, spec, self.groups, self.source.layout)
                local = {pos: _assemble(entry.get(key, []), shape, f"{name} ({key})")
                         for pos, entry in pieces[name].items() if pos != "step"}
                full_cache.clear()   # one full tensor at a time
                full = spec.full(local, name, self.source.tp_size, self.source.ep_size)
                full_cache[(name, key)] = spec.mine(full, self.groups)
            return full_cache[(name, key)]

        def step_of(param: torch.Tensor) -> int:
            name = names[id(param)]
            found = (pieces or {}).get(name, (pieces or {}).get(ALIASES.get(name), {}))
            return int(found.get("step", 0))

        optimizer.load_resharded_state(local_value, step_of)
        self._check(f"resharding the optimizer state of {self.source.folder}")


def _optimizer_records(sd: dict, model_state: dict) -> Iterable[tuple]:
    """``(name, key, flat offset, flat tensor, step)`` of an optimizer state dict (plain or
    ZeRO-1 shard) that records its ``param_names``."""
    names = sd.get("param_names")
    if names is None:
        raise CheckpointError("the checkpoint's optimizer state does not record its parameter "
                              "names (it predates resharding); load it into another layout "
                              "with --no-load-optim")
    inner = sd.get("optimizer") or {"state": {}}
    layout = sd["layout"]
    zero = "positions" in sd
    if zero:   # one entry per shard: (param_index, shape, param_offset, numel)
        entries = [(names[i], tuple(shape), offset, n) for i, shape, offset, n in layout]
        masters = sd["main_params"]
    else:      # one entry per parameter: its shape
        entries = [(names[i], tuple(shape), 0, None) for i, shape in enumerate(layout)]
        masters = sd.get("main_params")
    # torch numbers AdamW state over the param groups: decayed (ndim > 1) first, then the rest.
    decays = [len(shape) > 1 for _, shape, _, _ in entries]
    order = [i for i, d in enumerate(decays) if d] + [i for i, d in enumerate(decays) if not d]
    state_of = {entry: inner["state"].get(k, {}) for k, entry in enumerate(order)}
    for i, (name, shape, offset, n) in enumerate(entries):
        # Views of the memory-mapped files: nothing is read until a tensor is assembled.
        if masters is not None:
            master = masters[i].reshape(-1)
        else:   # fp32 training: the master is the weight itself
            master = model_state[name].reshape(-1)
        state = state_of.get(i, {})
        step = int(state["step"]) if "step" in state else 0
        yield name, "master", offset, master, step
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)   # None before the first step: zeros
            yield name, key, offset, (value.reshape(-1) if value is not None
                                      else master.numel()), step


def _local_shape(param: torch.Tensor, spec: TensorSpec, groups: ProcessGroups,
                 layout: dict) -> tuple:
    """Shape of ``param``'s local tensor in the source layout (``param`` is this rank's part
    in the new one: scale up to the full shape, then down by the source's sizes)."""
    shape = list(param.shape)
    if spec.tp:
        shape[spec.partition_dim] = (shape[spec.partition_dim] * groups.tp_size
                                     // layout.get("tensor_model_parallel_size", 1))
    if spec.expert:
        shape[0] = shape[0] * groups.ep_size // layout.get("expert_model_parallel_size", 1)
    return tuple(shape)


def _assemble(parts: list, shape: tuple, where: str) -> torch.Tensor:
    """A local tensor of ``shape`` from its ``(flat offset, flat piece)`` parts (a piece may be
    an element count: zeros)."""
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=torch.float32)
    covered = 0
    for offset, piece in parts:
        if isinstance(piece, int):   # state not created yet: zeros of that many elements
            covered += piece
            continue
        flat[offset:offset + piece.numel()] = piece.float()
        covered += piece.numel()
    if covered != numel:
        raise CheckpointError(f"the checkpoint's optimizer shards of {where} cover {covered} of "
                              f"its {numel} elements")
    return flat.view(shape)


def describe_change(saved: dict, now: dict) -> str:
    """``tp 1 -> 2, ep 4 -> 2`` for the sizes that differ."""
    short = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp",
             "expert_model_parallel_size": "ep", "data_parallel_size": "dp",
             "use_distributed_optimizer": "zero1"}
    return ", ".join(f"{short.get(k, k)} {saved.get(k)} -> {now.get(k)}" for k in short
                     if saved.get(k) != now.get(k))


__all__ = ["Resharder", "SourceCheckpoint", "TensorSpec", "describe_change", "parse_position"]
