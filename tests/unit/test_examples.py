"""Every launch script in ``examples/`` dry-runs (``DRY_RUN=1``) to a command whose flags the
entry point accepts, switches between dense and LSH with ``COMPRESSION``, and keeps its
checkpoints, TensorBoard events and metrics in one run folder that it also resumes from."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_lsh.arguments import parse_args_with_namespace
from megatron_lsh.training.entry import _recipe_flag, base_for

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (REPO / "examples").iterdir()
                 if p.suffix in (".sh", ".sbatch") and p.name != "lib.sh")
ARGS = {"pretrain_gpt_moe_local_cpu.sh": ["d", "vocab.json", "merges.txt"],
        "pretrain_gpt_moe_slurm.sbatch": ["d", "vocab.json", "merges.txt"],
        "pretrain_roberta_moe_v100_2x8.sh": ["d", "spm.model"],
        "pretrain_t5_moe_a100_4x8.sh": ["d", "spm.model"],
        "pretrain_swin_moe_a100_4x8.sh": ["imagenet"],
        "quickstart.sh": []}
ENV = {"NODE_RANK": "0", "MASTER_ADDR": "node0", "SLURM_NNODES": "2"}


def dry_run(script: str, **env) -> list:
    """The commands a script prints with DRY_RUN=1, each split into its words."""
    proc = subprocess.run(["bash", str(REPO / "examples" / script), *ARGS[script]],
                          env={**os.environ, **ENV, "DRY_RUN": "1", **env}, cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith("==")]


def entry_flags(words: list) -> tuple[str, list]:
    """The entry point of a command and the flags after it."""
    i = next(i for i, w in enumerate(words) if w.startswith("pretrain_") and w.endswith(".py"))
    return words[i], words[i + 1:]


def test_every_script_is_covered():
    assert set(SCRIPTS) == set(ARGS)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("compression", ["none", "lsh"])
def test_dry_run_prints_a_command_the_entry_point_accepts(script, compression):
    commands = [c for c in dry_run(script, COMPRESSION=compression, COMPRESSIONS=compression)
                if any(w.startswith("pretrain_") for w in c)]
    assert len(commands) == 1, commands
    entry, flags = entry_flags(commands[0])
    kind = entry[len("pretrain_"):-len("_moe.py")]
    config, namespace = parse_args_with_namespace(
        flags, lambda ns: base_for(ns, f"tiny-{kind}-moe"), extra_args_provider=_recipe_flag)
    assert config.moe.a2a_compression == compression
    ck = config.checkpoint
    assert ck.save and ck.save == ck.load               # re-running resumes
    run_dir = os.path.dirname(ck.save)
    assert config.logging.tensorboard_dir.startswith(run_dir)
    assert config.logging.metrics_jsonl.startswith(run_dir)
    assert compression in run_dir


def test_slurm_signal_reaches_the_training_processes():
    text = (REPO / "examples" / "pretrain_gpt_moe_slurm.sbatch").read_text()
    assert "#SBATCH --signal=TERM@" in text and "B:TERM" not in text
    (command,) = dry_run("pretrain_gpt_moe_slurm.sbatch")
    assert command[0] == "srun" and "torchrun" not in command and "--exit-signal-handler" in command


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in
                                    ("quickstart.sh", "pretrain_gpt_moe_slurm.sbatch")])
def test_launch_scripts_save_on_sigterm_and_exit_zero(script):
    """A pre-empted job must read as a success: the launcher is the SIGTERM-forwarding wrapper
    (plain torchrun exits 1 after its workers saved) and the ranks save on the signal."""
    (command,) = [c for c in dry_run(script) if any(w.startswith("pretrain_") for w in c)]
    assert command[1:3] == ["-m", "megatron_lsh.launch"], command[:4]
    assert "torchrun" not in command and "--exit-signal-handler" in command
