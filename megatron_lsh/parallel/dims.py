"""The parallel topology: one rank grid, every process group a slice of it.

``world = pp x dp x tp`` with the rank grid ``torch.arange(world).view(pp, dp, tp)``:
tensor-parallel ranks are adjacent (fastest links), pipeline stages are the slowest axis.
Expert parallelism is carved out of the ``dp x tp`` ranks of one pipeline stage: flattened in
(dp, tp) order they form a ``(dp*tp/ep, ep)`` matrix whose rows are the expert-parallel groups
and whose columns are the expert-data-parallel groups (expert parameters are replicated, and
their gradients reduced, along a column).

Groups are created once, all ranks calling ``new_group`` for every group in the same order,
and passed explicitly as a :class:`ProcessGroups` object. Nothing here reads globals or argv.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_lsh.config import ConfigError


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


class ParallelDims:
    """The rank grid of a run and the rank lists of every group kind; validates the layout."""

    def __init__(self, world_size: int, tp: int = 1, pp: int = 1, ep: int = 1,
                 dp: Optional[int] = None):
        for name, value in (("world size", world_size), ("tensor-model-parallel-size", tp),
                            ("pipeline-model-parallel-size", pp),
                            ("expert-model-parallel-size", ep)):
            _require(value >= 1, f"{name} must be at least 1, got {value}")
        if dp is None:
            _require(world_size % (tp * pp) == 0,
                     f"world size ({world_size}) is not divisible by tensor-model-parallel-size "
                     f"({tp}) x pipeline-model-parallel-size ({pp})")
            dp = world_size // (tp * pp)
        _require(tp * pp * dp == world_size,
                 f"world size ({world_size}) is not equal to tensor-model-parallel-size ({tp}) x "
                 f"pipeline-model-parallel-size ({pp}) x data-parallel-size ({dp})")
        _require((dp * tp) % ep == 0,
                 f"expert-model-parallel-size ({ep}) does not divide data-parallel-size ({dp}) x "
                 f"tensor-model-parallel-size ({tp}) = {dp * tp}")
        self.world_size, self.tp, self.pp, self.dp, self.ep = world_size, tp, pp, dp, ep
        self.grid = torch.arange(world_size).view(pp, dp, tp)

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert within a pipeline stage."""
        return self.dp * self.tp // self.ep

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        pp_rank, rest = divmod(rank, self.dp * self.tp)
        dp_rank, tp_rank = divmod(rest, self.tp)
        return pp_rank, dp_rank, tp_rank

    def _rows(self, t: torch.Tensor) -> list[list[int]]:
        return [row.tolist() for row in t.reshape(-1, t.shape[-1])]

    def tp_groups(self) -> list[list[int]]:
        """Ranks that shard one layer's weights."""
        return self._rows(self.grid)

    def pp_groups(self) -> list[list[int]]:
        """Ranks that hold consecutive stages of one model replica."""
        return self._rows(self.grid.permute(1, 2, 0))

    def dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same dense parameters."""
        return self._rows(self.grid.permute(0, 2, 1))

    def ep_groups(self) -> list[list[int]]:
        """Ranks that split the experts of a MoE layer among them (all-to-all partners)."""
        return self._rows(self.grid.reshape(self.pp, self.expert_dp, self.ep))

    def expert_dp_groups(self) -> list[list[int]]:
        """Ranks that hold the same experts (expert gradients are reduced here)."""
        stage = self.grid.reshape(self.pp, self.expert_dp, self.ep)
        return self._rows(stage.permute(0, 2, 1))

    def model_parallel_groups(self) -> list[list[int]]:
        """Ranks of one model replica (tp x pp): the grad norm is summed over these."""
        return self._rows(self.grid.permute(1, 0, 2).reshape(self.dp, -1))

    def embedding_groups(self) -> list[list[int]]:
        """First and last pipeline stage of each (dp, tp) position, for tied embeddings."""
        if self.pp == 1:
            return [[r] for r in range(self.world_size)]
        return [[int(self.grid[0, d, t]), int(self.grid[-1, d, t])]
                for d in range(self.dp) for t in range(self.tp)]

    def check_model(self, num_layers: int, num_attention_heads: int, num_experts: int = 0,
                    decoder_num_layers: Optional[int] = None) -> None:
        """Refuse a model that cannot be split over this layout (one sentence per problem)."""
        _require(num_attention_heads % self.tp == 0,
                 f"num-attention-heads ({num_attention_heads}) is not divisible by "
                 f"tensor-model-parallel-size ({self.tp})")
        _require(num_layers % self.pp == 0,
                 f"num-layers ({num_layers}) is not divisible by pipeline-model-parallel-size "
                 f"({self.pp})")
        if decoder_num_layers is not None:
            _require(decoder_num_layers % self.pp == 0,
                     f"decoder-num-layers ({decoder_num_layers}) is not divisible by "
                     f"pipeline-model-parallel-size ({self.pp})")
        if num_experts > 0:
            _require(num_experts % self.ep == 0,
                     f"num-experts ({num_experts}) is not divisible by "
                     f"expert-model-parallel-size ({self.ep})")
        elif self.ep > 1:
            raise ConfigError(f"expert-model-parallel-size ({self.ep}) needs num-experts > 0")

    def check_batch(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Return the number of micro-batches per step; refuse a batch that does not split."""
        per_step = micro_batch_size * self.dp
        _require(global_batch_size % per_step == 0,
                 f"global-batch-size ({global_batch_size}) is not divisible by micro-batch-size "
                 f"({micro_batch_size}) x data-parallel-size ({self.dp})")
        return global_batch_size // per_step

    def __repr__(self) -> str:
        return (f"ParallelDims(world={self.world_size}, pp={self.pp}, dp={self.dp}, "
                f"tp={self.tp}, ep={self.ep}, expert_dp={self.expert_dp})")


@dataclass
class ProcessGroups:
    """This rank's groups of every kind, plus its coordinates in the grid.

    A group is ``None`` when it holds only this rank (or when torch.distributed is not
    initialised, for single-process use): code checks ``*_size == 1`` and skips the collective.
    """

    dims: ParallelDims
    rank: int
    tp: Optional[dist.ProcessGroup]
    pp: Optional[dist.ProcessGroup]
    dp: Optional[dist.ProcessGroup]
    ep: Optional[dist.ProcessGroup]
    expert_dp: Optional[dist.ProcessGroup]
    model_parallel: Optional[dist.ProcessGroup]
    embedding: Optional[dist.ProcessGroup]
    pp_ranks: list
    embedding_ranks: list
    ep_ranks: list = None
    """Global ranks of this rank's expert-parallel group, in EP-rank order."""
    ranks_per_node: int = 1
    """Processes per node (torchrun's LOCAL_WORLD_SIZE): ranks r and s share a node when
    r // ranks_per_node == s // ranks_per_node."""

    def same_node(self, global_rank: int) -> bool:
        """Whether ``global_rank`` runs on this rank's node."""
        return global_rank // self.ranks_per_node == self.rank // self.ranks_per_node

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def ep_size(self) -> int:
        return self.dims.ep

    @property
    def expert_dp_size(self) -> int:
        return self.dims.expert_dp

    @property
    def tp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.dims.coordinates(self.rank)[0]

    @property
    def ep_rank(self) -> int:
        return (self.dp_rank * self.tp_size + self.tp_rank) % self.ep_size

    @property
    def expert_dp_rank(self) -> int:
        return (self.dp_rank * self.tp_size + self.tp_rank) // self.ep_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def single(cls) -> "ProcessGroups":
        """Groups of a one-process run (no torch.distributed needed)."""
        return cls(ParallelDims(1), 0, None, None, None, None, None, None, None, [0], [0], [0], 1)

    @classmethod
    def build(cls, dims: ParallelDims, rank: Optional[int] = None,
              ranks_per_node: Optional[int] = None) -> "ProcessGroups":
        """Create every group of ``dims``; all ranks must call this together, once.

        ``ranks_per_node``: processes per node; torchrun's ``LOCAL_WORLD_SIZE`` when None.
        """
        if not dist.is_initialized():
            _require(dims.world_size == 1,
                     f"torch.distributed is not initialised but the layout needs "
                     f"{dims.world_size} processes")
            return cls.single()
        _require(dist.get_world_size() == dims.world_size,
                 f"world size ({dist.get_world_size()}) is not equal to tensor-model-parallel-"
                 f"size ({dims.tp}) x pipeline-model-parallel-size ({dims.pp}) x "
                 f"data-parallel-size ({dims.dp})")
        rank = dist.get_rank() if rank is None else rank

        def mine(all_ranks: list[list[int]]):
            # Every rank creates every group (new_group is collective), keeps its own.
            chosen, chosen_ranks = None, [rank]
            for ranks in all_ranks:
                group = (dist.new_group(ranks, timeout=_collective_timeout)
                         if len(ranks) > 1 else None)
                if rank in ranks:
                    chosen, chosen_ranks = group, ranks
            return chosen, chosen_ranks

        tp, _ = mine(dims.tp_groups())
        pp, pp_ranks = mine(dims.pp_groups())
        dp, _ = mine(dims.dp_groups())
        ep, ep_ranks = mine(dims.ep_groups())
        expert_dp, _ = mine(dims.expert_dp_groups())
        model_parallel, _ = mine(dims.model_parallel_groups())
        embedding, embedding_ranks = mine(dims.embedding_groups())
        if ranks_per_node is None:
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", dims.world_size))
        _require(ranks_per_node >= 1, f"ranks per node must be positive, got {ranks_per_node}")
        return cls(dims, rank, tp, pp, dp, ep, expert_dp, model_parallel, embedding,
                   pp_ranks, embedding_ranks, list(ep_ranks), ranks_per_node)


def default_backend() -> str:
    """NCCL when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


GLOO_THREAD_NAMES = ("pt_gloo_runloop", "gloo_tcp_loop")
"""Names torch gives the threads a gloo process group owns (its work loops and TCP loop)."""


def gloo_threads() -> list:
    """Names of this process's gloo threads (Linux ``/proc``; empty elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in GLOO_THREAD_NAMES:
            names.append(name)
    return names


_collective_timeout: Optional[timedelta] = None
"""The timeout the world group was created with; every subgroup gets the same (``new_group``
would otherwise use the backend's default of 30 minutes, so a stuck expert all-to-all would
ignore ``--distributed-timeout-minutes``)."""


def lingering_gloo_threads(wait_s: float = 2.0) -> list:
    """:func:`gloo_threads` after a garbage collection, waiting up to ``wait_s`` for them to end.

    A gloo TCP loop can take a moment to end after its group is gone (seen once in ~500 test
    workers), so only threads still running after the wait count as leaked.
    """
    import gc
    import time
    gc.collect()
    deadline = time.monotonic() + wait_s
    threads = gloo_threads()
    while threads and time.monotonic() < deadline:
        time.sleep(0.02)
        threads = gloo_threads()
    return threads


def init_process_group(backend: str, **kwargs) -> None:
    """``dist.init_process_group`` after importing ``torch.distributed.nn``.

    ``torch.distributed.nn.functional`` declares ``group=group.WORLD`` as default arguments,
    which are evaluated when the module is first imported: imported while a default group
    exists, its functions keep that group (and its gloo threads) alive past
    ``destroy_process_group``, invisibly to the garbage collector (a tuple of pybind objects is
    not tracked). ``torch._dynamo`` imports it, and building the first ``torch.optim``
    optimizer imports ``torch._dynamo``. Imported before any group exists (10 ms), the
    defaults are None and hold nothing.
    """
    import torch.distributed.nn  # noqa: F401
    global _collective_timeout
    _collective_timeout = kwargs.get("timeout")
    dist.init_process_group(backend, **kwargs)


def init_distributed(backend: Optional[str] = None, timeout_minutes: float = 10) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment; returns (rank, world_size).

    Without RANK/WORLD_SIZE in the environment (a plain ``python script.py``) this is a
    one-process run and nothing is initialised.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size == 1:
        return 0, 1
    backend = backend or default_backend()
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
    timeout = timedelta(minutes=timeout_minutes)
    # The launcher's store outlives a restart (torchrun --max-restarts): keys of the failed
    # attempt (its ranks' gloo addresses) would be read by the new one, which then connects to
    # dead peers ("connectFullMesh failed ... Connection refused"). One prefix per attempt.
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"megatron_lsh/attempt_{attempt}", store)
    init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size
