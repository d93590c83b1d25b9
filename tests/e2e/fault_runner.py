"""Entry point for fault-injection tests: runs pretrain_*_moe with one fault patched in.

FAULT=kill_during_save:N  SIGKILL this process while it writes the checkpoint of iteration N.
FAULT=nan_loss:N          the lm loss becomes NaN from iteration N on.
FAULT=nan_rank1:N         on rank 1 only, the loss of the N-th micro-batch (from 1) is NaN.
FAULT=stop_rank1:N        rank 1 stops itself (SIGSTOP) as iteration N begins: a hung rank.
FAULT=kill_rank1_once:N   in the first attempt of an elastic run (TORCHELASTIC_RESTART_COUNT 0)
                          rank 1 SIGKILLs itself as iteration N begins.
"""
import os
import signal
import sys

import torch

from megatron_lsh.training import checkpointing, tasks
from megatron_lsh.training.entry import main


def _install(fault: str) -> None:
    name, _, arg = fault.partition(":")
    at = int(arg)
    if name == "kill_during_save":
        original = checkpointing.save_checkpoint

        def save(iteration, state, save_dir, groups, **kwargs):
            if iteration == at:
                def on_stage(stage, path):
                    if stage == "file":  # the first file of this checkpoint is on disk
                        os.kill(os.getpid(), signal.SIGKILL)
                kwargs["on_stage"] = on_stage
            return original(iteration, state, save_dir, groups, **kwargs)
        checkpointing.save_checkpoint = save
    elif name == "nan_loss":
        original_loss = tasks.Task.loss
        calls = {"n": 0}

        def loss(per_token_loss, batch):
            calls["n"] += 1
            value = original_loss(per_token_loss, batch)
            return value * float("nan") if calls["n"] >= at else value
        tasks.Task.loss = staticmethod(loss)
    elif name == "nan_rank1":
        original_loss = tasks.Task.loss
        calls = {"n": 0}

        def loss(per_token_loss, batch):
            value = original_loss(per_token_loss, batch)
            if os.environ.get("RANK") != "1" or not per_token_loss.requires_grad:
                return value
            calls["n"] += 1
            return value * float("nan") if calls["n"] == at else value
        tasks.Task.loss = staticmethod(loss)
    elif name in ("stop_rank1", "kill_rank1_once"):
        from megatron_lsh.training.loop import Trainer
        original_step = Trainer.train_step
        sig = signal.SIGSTOP if name == "stop_rank1" else signal.SIGKILL
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

        def train_step(self, iterator):
            if (self.iteration + 1 == at and os.environ.get("RANK") == "1"
                    and (name == "stop_rank1" or first_attempt)):
                os.kill(os.getpid(), sig)
            return original_step(self, iterator)
        Trainer.train_step = train_step
    else:
        raise SystemExit(f"unknown FAULT {fault!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _install(os.environ["FAULT"])
    sys.exit(main(sys.argv[1], default_recipe=f"tiny-{sys.argv[1]}-moe", argv=sys.argv[2:]))
