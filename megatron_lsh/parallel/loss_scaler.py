"""Loss scalers for mixed-precision training (Megatron semantics).

fp16 gradients underflow without scaling, so the loss is multiplied by ``scale`` before
backward and the gradients divided by it before the optimizer step. A dynamic scaler halves the
scale when gradients overflow (inf/nan) and doubles it after ``growth_interval`` clean steps; the
optimizer skips every step whose gradients overflowed. bf16 and fp32 have fp32's exponent range
and use a constant scale of 1.
"""
from __future__ import annotations


class LossScaler:
    """Interface: ``scale`` (float), ``update(found_inf)``, ``state_dict`` / ``load_state_dict``."""

    dynamic = False
    """True when overflow checks matter (the optimizer skips overflowing steps)."""

    def __init__(self, initial_scale: float):
        if not initial_scale > 0:
            raise ValueError(f"initial loss scale must be positive, got {initial_scale}")
        self._scale = float(initial_scale)

    @property
    def scale(self) -> float:
        """The current loss scale."""
        return self._scale

    @property
    def inv_scale(self) -> float:
        """1 / scale, by which the optimizer multiplies the gradients."""
        return 1.0 / self._scale

    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step; ``found_inf`` is the world-wide overflow flag."""

    def state_dict(self) -> dict:
        """Everything needed to resume the scale schedule exactly."""
        return {"scale": self._scale}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (a tensor scale, as Megatron saves, works)."""
        self._scale = float(state_dict["scale"])


class ConstantLossScaler(LossScaler):
    """A fixed scale (1 for bf16 / fp32): no overflow checks, no skipped steps."""

    def __init__(self, scale: float = 1.0):
        super().__init__(scale)


class StaticLossScaler(ConstantLossScaler):
    """Megatron's ``--loss-scale``: a fixed scale, but overflowing steps are still detected and
    skipped (as Megatron's ``ConstantGradScaler`` does); the scale never changes."""

    dynamic = True


class DynamicLossScaler(LossScaler):
    """The fp16 scaler: back off on overflow (after ``hysteresis`` overflows), grow when clean.

    Exactly Megatron's ``DynamicGradScaler``:

    * on an overflowing step the growth tracker resets and the hysteresis tracker drops by one;
      once it reaches 0 the scale is multiplied by ``backoff_factor`` (never below
      ``min_scale``), and every further overflow backs off again until the scale grows;
    * after ``growth_interval`` consecutive clean steps the scale is multiplied by
      ``growth_factor`` and the hysteresis tracker is refilled to ``hysteresis``.

    So ``hysteresis`` overflows are tolerated before the first back-off; the tracker is refilled
    only when the scale grows (a clean step alone does not refill it), as in Megatron. The step of
    every overflowing iteration is skipped by the optimizer whatever the hysteresis says.
    """

    dynamic = True

    def __init__(self, initial_scale: float, min_scale: float = 1.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, hysteresis: int = 2):
        super().__init__(initial_scale)
        if not 0 < min_scale <= initial_scale:
            raise ValueError(f"min loss scale must be in (0, initial scale {initial_scale}], "
                             f"got {min_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"loss scale growth factor must exceed 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"loss scale backoff factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"loss scale window must be at least 1, got {growth_interval}")
        if hysteresis < 1:
            raise ValueError(f"hysteresis must be at least 1, got {hysteresis}")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        """Back off (respecting hysteresis) on overflow; grow after a clean window."""
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict:
        """Scale and both trackers (the same keys as Megatron's checkpoints)."""
        return {"scale": self._scale, "growth_tracker": self._growth_tracker,
                "hysteresis_tracker": self._hysteresis_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore scale and trackers."""
        self._scale = float(state_dict["scale"])
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])

    def __repr__(self) -> str:
        return (f"DynamicLossScaler(scale={self._scale}, growth_tracker={self._growth_tracker}, "
                f"hysteresis_tracker={self._hysteresis_tracker})")
