"""Model-parallel random numbers: two streams per rank, and RNG-exact activation checkpointing.

Tensor parallelism needs two kinds of dropout:

- on *replicated* activations (the residual stream, the hidden dropout after a row-parallel
  layer without sequence parallelism) every rank of a TP group must draw the same mask,
  or the replicas diverge: this uses torch's default generator, seeded identically
  within a TP group by :func:`model_parallel_seed`;
- on activations *split* over TP (attention probabilities of this rank's heads, and any
  sequence-parallel activation) every rank must draw a different mask, or the heads /
  positions of different ranks get correlated masks: this runs inside
  ``get_rng_tracker().fork()``, which swaps in a per-TP-rank stream and swaps it back.

The :class:`RNGStatesTracker` is Megatron's ``CudaRNGStatesTracker`` made device-agnostic:
each named stream holds a CPU generator state and, when CUDA is available, a CUDA one, and
``fork`` swaps both, so dropout on either device uses the stream. Like torch's default
generator it is process-wide state, so one tracker per process (:func:`get_rng_tracker`) is
the natural scope; functions take an explicit ``tracker`` for tests.

Activation checkpointing (:func:`checkpoint`) must replay the same masks when it recomputes
a region in backward. It is built on ``torch.utils.checkpoint`` (non-reentrant), which
already restores the default CPU / CUDA generators, and uses its ``context_fn`` hook to
restore the tracker's streams as they were when the region first ran. That was chosen over
Megatron's reentrant custom autograd Function because the non-reentrant implementation also
supports keyword arguments, regions whose inputs do not require grad, ``torch.autograd.grad``
and early-stopped recomputation, and we would only have added the tracker states to it.

Initialisation seeds (:class:`SeedPart`, :func:`layer_seed`, :func:`mix_seed`, :func:`seeded`)
live here too, in one place, because every layer must derive them the same way: parameters
are drawn from seeds computed from the run's ``--seed`` and *what* is being built (layer
number, part), never from generator state left by earlier builds, so a model starts with the
same weights whichever pipeline stage, TP or EP rank builds which piece.
"""
from __future__ import annotations

import contextlib
import enum
import random as py_random
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.utils.checkpoint

from megatron_lsh.parallel.dims import ProcessGroups

MODEL_PARALLEL_RNG = "model-parallel-rng"
"""Name of the per-TP-rank stream used for dropout on TP-split activations."""

_TP_SEED_OFFSET = 2718  # Megatron's offsets, so seeds mean the same as in Megatron runs.
_PP_SEED_STRIDE = 100


class SeedPart(enum.IntEnum):
    """The parts of a model that draw their initial weights from seeds of their own.

    Two derivations from the run's seed ``s`` use these numbers:

    - per-layer parts, ``layer_seed(s, n, part)`` for layer ``n`` (0 for parts of no layer):
      ``LAYER`` (a transformer layer's norms, attention and dense MLP), ``MOE`` (its MoE FFN,
      which derives router / expert seeds from this one with :func:`mix_seed`),
      ``SHARED_EXPERT`` (the shared expert of a MoE layer),
      ``FINAL_LAYERNORM`` (the norm closing a stack, layer 0), ``MLM_HEAD`` (RoBERTa's
      dense + LayerNorm head, layer 0), ``CLASSIFICATION_HEAD`` (a classifier's output
      layer, layer 0) and ``PATCH_MERGING`` (Swin's merging after the stage ending at
      block n);
    - model-level parts, ``s + part``: ``EMBEDDING`` (the word embedding, its position
      embedding uses ``s + EMBEDDING + 1``; every tied copy of it, e.g. the output layer of a
      later pipeline stage, uses the same seed so the copies start equal) and ``OUTPUT`` (an
      output layer that is not tied to the embedding).

    The values are fixed: changing one changes every initial weight it seeds.
    """

    LAYER = 0
    MOE = 1
    FINAL_LAYERNORM = 7
    EMBEDDING = 17
    OUTPUT = 29
    MLM_HEAD = 31
    SHARED_EXPERT = 37
    CLASSIFICATION_HEAD = 41
    PATCH_MERGING = 43


def layer_seed(seed: int, layer_number: int, part: int = SeedPart.LAYER) -> int:
    """A per-layer initialisation seed, independent of which stage builds the layer."""
    return (seed * 1_000_003 + layer_number * 101 + int(part)) % (2 ** 63)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic, no Python hash randomisation)."""
    value = 0x2545F4914F6CDD1D
    for part in parts:
        value = (value * 0x9E3779B97F4A7C15 + int(part) + 0x632BE59BD9B4E019) % (2 ** 64)
        value ^= value >> 29
    return value % (2 ** 63)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global CPU generator seeded, restoring the previous state after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)




class RNGStatesTracker:
    """Named random streams that can temporarily replace the default generators.

    ``add(name, seed)`` creates a stream; ``with fork(name):`` runs its body on that stream
    and saves where the stream got to, leaving the default generators exactly as before.
    ``devices`` lists the generators to swap (``"cpu"``, ``"cuda"``: the current CUDA
    device); by default the CPU one plus CUDA when available, resolved at first use.
    """

    def __init__(self, devices: Optional[Sequence[str]] = None):
        self._devices = tuple(devices) if devices is not None else None
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self._seeds: set[int] = set()

    @property
    def devices(self) -> tuple[str, ...]:
        """The generators this tracker swaps."""
        if self._devices is None:
            self._devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        return self._devices

    @property
    def names(self) -> list[str]:
        """The streams added so far."""
        return list(self._states)

    def reset(self) -> None:
        """Forget every stream (and the seeds used)."""
        self._states.clear()
        self._seeds.clear()

    def _current(self) -> dict[str, torch.Tensor]:
        states = {}
        for device in self.devices:
            states[device] = (torch.get_rng_state() if device == "cpu"
                              else torch.cuda.get_rng_state())
        return states

    def _install(self, states: dict[str, torch.Tensor]) -> None:
        for device, state in states.items():
            if device == "cpu":
                torch.set_rng_state(state)
            else:
                torch.cuda.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        """Create stream ``name`` seeded with ``seed``; names and seeds must be new."""
        if name in self._states:
            raise ValueError(f"random stream {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another random stream")
        states = {}
        for device in self.devices:
            if device == "cpu":
                states[device] = torch.Generator().manual_seed(seed).get_state()
            else:
                # Seed the current device's generator, read it, put the old state back.
                saved = torch.cuda.get_rng_state()
                torch.cuda.manual_seed(seed)
                states[device] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved)
        self._states[name] = states
        self._seeds.add(seed)

    def get_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """A copy of every stream's current state (for checkpoints and recomputation)."""
        return {name: {d: s.clone() for d, s in states.items()}
                for name, states in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Replace every stream's state with (copies of) ``states``."""
        self._states = {name: {d: s.clone() for d, s in st.items()}
                        for name, st in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the body on stream ``name``; the default generators are untouched afterwards."""
        if name not in self._states:
            raise KeyError(f"random stream {name!r} does not exist (call model_parallel_seed "
                           f"or add() first)")
        outside = self._current()
        self._install(self._states[name])
        try:
            yield
        finally:
            # Also on exceptions (e.g. checkpoint's early-stopped recompute): the caller's
            # generators must never be left on the forked stream.
            self._states[name] = self._current()
            self._install(outside)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (process-wide like the generators it wraps)."""
    return _TRACKER


def model_parallel_seed(seed: int, groups: ProcessGroups,
                        tracker: Optional[RNGStatesTracker] = None) -> RNGStatesTracker:
    """Seed every generator of this rank the way Megatron does; returns the tracker.

    The default generators (python, numpy, torch CPU and CUDA) get ``seed + 100 * pp_rank``:
    identical on all ranks of a TP group and of a DP group (so replicas initialise the same
    weights), different per pipeline stage (different layers). The tracker's
    ``model-parallel-rng`` stream gets ``seed + 100 * pp_rank + 2718 + tp_rank``: different
    on every TP rank, identical across data-parallel replicas.
    """
    tracker = _TRACKER if tracker is None else tracker
    stage_seed = seed + _PP_SEED_STRIDE * groups.pp_rank
    py_random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)  # also seeds every CUDA device
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, stage_seed + _TP_SEED_OFFSET + groups.tp_rank)
    return tracker


def state_dict(tracker: Optional[RNGStatesTracker] = None) -> dict[str, Any]:
    """Every RNG state of this rank: python, numpy, torch CPU, CUDA (all devices), tracker.

    RNG states differ per rank, so checkpoints store one per rank. Only plain python values
    and tensors: loadable with ``torch.load(..., weights_only=True)``.
    """
    tracker = _TRACKER if tracker is None else tracker
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": py_random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tracker.get_states(),
    }


def load_state_dict(state: dict[str, Any], tracker: Optional[RNGStatesTracker] = None) -> None:
    """Restore what :func:`state_dict` captured, so the random streams continue exactly."""
    tracker = _TRACKER if tracker is None else tracker
    version, internal, gauss_next = state["python"]
    py_random.setstate((version, tuple(internal), gauss_next))  # lists after some loaders
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        # A resume may see fewer devices than the save did; each rank uses its own anyway.
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    tracker.set_states(state["tracker"])


class _ReplayTrackerStates:
    """Context manager for the recompute: the tracker's streams restart where the first
    forward found them, and continue from where they were once the recompute ends.

    A class, not a generator, because a retained graph can recompute more than once.
    """

    def __init__(self, tracker: RNGStatesTracker, states: dict):
        self._tracker, self._states, self._outside = tracker, states, []

    def __enter__(self):
        self._outside.append(self._tracker.get_states())
        self._tracker.set_states(self._states)

    def __exit__(self, *exc_info):
        self._tracker.set_states(self._outside.pop())
        return False


def checkpoint(function: Callable, *args: Any, tracker: Optional[RNGStatesTracker] = None,
               **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` without keeping its activations; they are recomputed in
    backward with the same random numbers (default generators and tracker streams), so
    dropout inside the region, forked or not, gives identical masks and exact gradients.
    """
    tracker = _TRACKER if tracker is None else tracker

    def context_fn():
        # Called when the region first runs, before ``function``.
        return contextlib.nullcontext(), _ReplayTrackerStates(tracker, tracker.get_states())

    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=context_fn, **kwargs)
