"""Megatron-LM flags that are not settings here: accepted because they describe what this
project does anyway, or refused with one sentence saying what it does instead.

A Megatron-LM launch script should run with its flags kept. Flags that map to a setting are
declared on the config dataclasses (:mod:`megatron_lsh.config`); this module lists the rest:

* :data:`ACCEPTED`: no-ops, each with the sentence that says why nothing needs doing (the
  behaviour the flag asks for is already how this code works, or it tunes a kernel that is
  not used here). Some accept only certain values (:data:`ACCEPTED_VALUES`); other values are
  refused with the sentence in :data:`REFUSED_VALUES`.
* :data:`REFUSED`: features this project does not have; giving the flag stops the run before
  anything starts, with the reason and the alternative.

``tests/unit/test_megatron_scripts.py`` keeps Megatron-LM's example scripts' flags in
these lists.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Union

from megatron_lsh.config import ConfigError


@dataclass(frozen=True)
class CompatFlag:
    """A Megatron flag without a setting here: how many values it takes and the sentence."""

    nargs: Union[int, str]
    """0 for a switch, 1 for one value, or an argparse nargs string ('+', 3)."""
    reason: str


ACCEPTED: dict[str, CompatFlag] = {
    "--use-mcore-models": CompatFlag(0, "the models are written the Megatron Core way already"),
    "--use-legacy-models": CompatFlag(0, "there is one implementation of each model"),
    "--no-masked-softmax-fusion": CompatFlag(
        0, "attention runs through torch's scaled_dot_product_attention; there is no separate "
           "masked-softmax kernel to fuse"),
    "--attention-backend": CompatFlag(
        1, "attention runs through torch's scaled_dot_product_attention, which picks its "
           "kernel (flash, memory-efficient or math) itself"),
    "--use-flash-attn": CompatFlag(
        0, "torch's scaled_dot_product_attention uses flash attention where it can"),
    "--transformer-impl": CompatFlag(
        1, "the layers are this project's PyTorch implementation (Transformer Engine is not "
           "used; apex's fused norms are, when installed)"),
    "--moe-grouped-gemm": CompatFlag(0, "a rank's local experts already run as one batched "
                                        "matmul over all of them"),
    "--moe-token-dispatcher-type": CompatFlag(1, "tokens reach their experts by all-to-all"),
    "--moe-shared-expert-overlap": CompatFlag(
        0, "the shared expert runs where the token is, next to the routed experts"),
    "--overlap-grad-reduce": CompatFlag(
        0, "gradient buckets are all-reduced as soon as they are full, during backward"),
    "--overlap-param-gather": CompatFlag(
        0, "with --use-distributed-optimizer the updated shards are gathered right after the "
           "optimizer step"),
    "--no-gradient-accumulation-fusion": CompatFlag(
        0, "gradients accumulate into fp32 main-grad buffers with plain PyTorch ops"),
    "--no-bias-swiglu-fusion": CompatFlag(0, "activations are unfused PyTorch ops"),
    "--no-bias-gelu-fusion": CompatFlag(0, "activations are unfused PyTorch ops"),
    "--no-bias-dropout-fusion": CompatFlag(0, "bias, dropout and residual are unfused "
                                              "PyTorch ops"),
    "--no-rope-fusion": CompatFlag(0, "RoPE is an unfused PyTorch op"),
    "--cross-entropy-loss-fusion": CompatFlag(
        0, "the vocab-parallel cross entropy is one fp32 computation per micro-batch"),
    "--no-create-attention-mask-in-dataloader": CompatFlag(
        0, "attention masks are built inside the model, never by the data loader"),
    "--no-mmap-bin-files": CompatFlag(
        0, "the .bin files are memory-mapped and read lazily either way"),
    "--manual-gc": CompatFlag(0, "Python's garbage collector stays automatic"),
    "--empty-unused-memory-level": CompatFlag(
        1, "the CUDA caching allocator is left to manage its own memory"),
    "--log-throughput": CompatFlag(0, "the log line always shows tokens per second"),
    "--tiktoken-pattern": CompatFlag(
        1, "only the TikTokenizer reads it, and this project has none"),
    "--context-parallel-size": CompatFlag(1, "sequences are not split over ranks"),
    "--ckpt-format": CompatFlag(
        1, "checkpoints are torch files, one per rank, with checksums; they load into any "
           "parallel layout"),
}
"""Megatron flags accepted as no-ops, with the sentence that says why."""

ACCEPTED_VALUES: dict[str, tuple] = {
    "--moe-token-dispatcher-type": ("alltoall",),
    "--context-parallel-size": ("1",),
    "--ckpt-format": ("torch",),
    "--attention-backend": ("auto", "flash", "fused", "unfused", "local"),
    "--transformer-impl": ("local", "transformer_engine"),
}
"""Flags of :data:`ACCEPTED` that are no-ops only with these values."""

REFUSED_VALUES: dict[str, str] = {
    "--moe-token-dispatcher-type": "tokens always travel by all-to-all (the path LSH "
                                   "compresses): use --moe-token-dispatcher-type alltoall",
    "--context-parallel-size": "context parallelism is not supported: long sequences can be "
                               "split over the TP group with --sequence-parallel",
    "--ckpt-format": "checkpoints are saved per rank in torch format with checksums (and "
                     "reshard on load): use --ckpt-format torch (or leave it out)",
}
"""Why other values of a flag of :data:`ACCEPTED_VALUES` are refused."""

_FP8 = ("fp8 compute needs Transformer Engine, which is not used: train with --bf16 (the "
        "expert all-to-all can still send fp8 rows: --moe-a2a-compression cast)")
REFUSED: dict[str, CompatFlag] = {
    "--rampup-batch-size": CompatFlag(3, "batch-size ramp-up is not supported: the global "
                                         "batch size is constant (--global-batch-size)"),
    "--decoupled-lr": CompatFlag(1, "one learning-rate schedule (--lr, --min-lr) applies to "
                                    "every parameter, embeddings included"),
    "--decoupled-min-lr": CompatFlag(1, "one learning-rate schedule (--lr, --min-lr) applies "
                                        "to every parameter, embeddings included"),
    "--grad-reduce-in-bf16": CompatFlag(0, "gradients are always reduced in fp32"),
    "--calculate-per-token-loss": CompatFlag(
        0, "the loss is the mean over each micro-batch's tokens, averaged over micro-batches"),
    "--apply-layernorm-1p": CompatFlag(
        0, "norm weights are stored as they are applied, initialised to 1"),
    "--fp8-format": CompatFlag(1, _FP8),
    "--fp8-amax-history-len": CompatFlag(1, _FP8),
    "--fp8-amax-compute-algo": CompatFlag(1, _FP8),
    "--fp8-param-gather": CompatFlag(0, _FP8),
    "--profile": CompatFlag(0, "the torch profiler is not wired in: --timing-log-level 2 "
                               "times every stage of each iteration"),
    "--profile-step-start": CompatFlag(1, "the torch profiler is not wired in: "
                                          "--timing-log-level 2 times every stage"),
    "--profile-step-end": CompatFlag(1, "the torch profiler is not wired in: "
                                        "--timing-log-level 2 times every stage"),
    "--wandb-project": CompatFlag(1, "Weights & Biases is not supported: logs go to "
                                     "TensorBoard (--tensorboard-dir) and --metrics-jsonl"),
    "--wandb-exp-name": CompatFlag(1, "Weights & Biases is not supported: logs go to "
                                      "TensorBoard (--tensorboard-dir) and --metrics-jsonl"),
    "--wandb-save-dir": CompatFlag(1, "Weights & Biases is not supported: logs go to "
                                      "TensorBoard (--tensorboard-dir) and --metrics-jsonl"),
}
"""Megatron flags of features this project lacks, with what to do instead."""

_DEST_PREFIX = "compat_"


def _dest(flag: str) -> str:
    return _DEST_PREFIX + flag.lstrip("-").replace("-", "_")


def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    """Add every :data:`ACCEPTED` and :data:`REFUSED` flag to ``parser`` (values are kept)."""
    for title, table in (("Megatron-LM flags accepted as no-ops", ACCEPTED),
                         ("Megatron-LM flags refused (features this project lacks)", REFUSED)):
        group = parser.add_argument_group(title)
        for flag, spec in table.items():
            kwargs = dict(dest=_dest(flag), default=argparse.SUPPRESS,
                          help=spec.reason[0].upper() + spec.reason[1:] + ".")
            if spec.nargs == 0:
                kwargs["action"] = "store_true"
            elif spec.nargs != 1:
                kwargs["nargs"] = spec.nargs
            group.add_argument(flag, **kwargs)


def _given(namespace: argparse.Namespace, flag: str):
    return getattr(namespace, _dest(flag), None)


def check_compat_flags(namespace: argparse.Namespace) -> list:
    """Raise :class:`ConfigError` for refused flags or values; return the accepted no-ops
    given (flag names), after removing every compatibility flag from ``namespace``."""
    refused, accepted = [], []
    for flag in ACCEPTED:
        value = _given(namespace, flag)
        if value is None:
            continue
        allowed = ACCEPTED_VALUES.get(flag)
        if allowed is not None and str(value) not in allowed:
            refused.append(f"{flag} {value} is refused: "
                           + REFUSED_VALUES.get(flag, f"use one of {', '.join(allowed)}"))
        else:
            accepted.append(flag)
    for flag, spec in REFUSED.items():
        if _given(namespace, flag) is not None:
            refused.append(f"{flag} is refused: {spec.reason}")
    for name in [n for n in vars(namespace) if n.startswith(_DEST_PREFIX)]:
        delattr(namespace, name)
    if refused:
        more = "" if len(refused) == 1 else (f" ({len(refused) - 1} more refused: "
                                             + "; ".join(refused[1:]) + ")")
        raise ConfigError(refused[0] + more)
    return accepted


def describe(flag: str) -> Optional[str]:
    """The sentence for a compatibility flag (None when it is not one)."""
    spec = ACCEPTED.get(flag) or REFUSED.get(flag)
    return spec.reason if spec else None


def markdown_table() -> str:
    """The accepted and refused flags as markdown (``docs/MEGATRON.md`` holds this text)."""
    lines = ["| flag | accepted as a no-op because |", "|---|---|"]
    for flag, spec in ACCEPTED.items():
        values = ACCEPTED_VALUES.get(flag)
        shown = f"`{flag}`" + (f" ({', '.join(values)})" if values else "")
        lines.append(f"| {shown} | {spec.reason} |")
    lines += ["", "| flag or value | refused: what to do instead |", "|---|---|"]
    for flag, reason in REFUSED_VALUES.items():
        others = "other values" if flag in ACCEPTED_VALUES else "any value"
        lines.append(f"| `{flag}` ({others}) | {reason} |")
    for flag, spec in REFUSED.items():
        lines.append(f"| `{flag}` | {spec.reason} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
