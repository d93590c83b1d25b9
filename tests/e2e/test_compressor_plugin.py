"""A new compressor is one new file: copy the package, add a file, train with it by name.

The copy lives in a temporary folder, so the source tree is not touched; nothing but the new
file differs from the checkout (checked), yet the trainer accepts ``--moe-a2a-compression
expert-mean`` and the compressor's own flag, trains, and reports its compression rate.
"""
from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import textwrap

from tests.e2e.util import REPO, read_metrics, tiny_run_args, write_synthetic_corpus

TOY = textwrap.dedent('''
    """``expert-mean``: a toy compressor that sends one row per expert, the mean of its rows."""
    from dataclasses import dataclass

    import torch

    from megatron_lsh.config import check_positive, setting
    from megatron_lsh.moe.compressors import register_compressor
    from megatron_lsh.moe.compressors.base import Compressor


    @dataclass
    class ExpertMeanOptions:
        """Settings of the toy compressor."""

        scale: float = setting(1.0, "--moe-expert-mean-scale", "Multiply what is sent by this.")

        def __post_init__(self):
            check_positive(self, "scale")


    @register_compressor
    class ExpertMeanCompressor(Compressor):
        """Every row of an expert gets the expert's output of their mean."""

        name = "expert-mean"
        Options = ExpertMeanOptions

        def compress(self, rows, timer):
            e = rows.expert_of_row_R
            counts = rows.rows_per_expert_E
            sums = rows.rows_RH.new_zeros((self.num_experts, rows.x_TH.shape[1])).index_add(
                0, e, rows.rows_RH)
            present = counts > 0
            means = sums[present] / counts[present].unsqueeze(1).to(sums.dtype)
            slot = torch.cumsum(present.long(), 0) - 1
            return means * self.options.scale, present.long(), slot[e]

        def combine(self, expert_out_PH, context, rows, timer):
            restored = expert_out_PH.index_select(0, context)
            weighted = restored * rows.gate_of_row_R.to(restored.dtype).unsqueeze(1)
            return restored.new_zeros((rows.x_TH.shape[0], restored.shape[1])).index_add(
                0, rows.token_of_row_R, weighted)
''')


def test_a_compressor_in_one_new_file_trains_by_name(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(REPO / "megatron_lsh", copy / "megatron_lsh",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pretrain_gpt_moe.py", copy / "pretrain_gpt_moe.py")
    new_file = copy / "megatron_lsh" / "moe" / "compressors" / "expert_mean.py"
    new_file.write_text(TOY)

    # The copy differs from the checkout by exactly the new file.
    def differences(cmp, prefix=""):
        out = [prefix + n for n in cmp.left_only + cmp.right_only + cmp.diff_files]
        for name, sub in cmp.subdirs.items():
            out += differences(sub, f"{prefix}{name}/")
        return out
    cmp = filecmp.dircmp(REPO / "megatron_lsh", copy / "megatron_lsh",
                         ignore=["__pycache__"])
    assert differences(cmp) == ["moe/compressors/expert_mean.py"]

    data = write_synthetic_corpus(str(tmp_path / "corpus"))
    metrics = str(tmp_path / "metrics.jsonl")
    args = tiny_run_args("gpt", data, str(tmp_path), iters=4)
    args[args.index("--moe-a2a-compression") + 1] = "expert-mean"
    args += ["--moe-expert-mean-scale", "1.0", "--expert-model-parallel-size", "2",
             "--metrics-jsonl", metrics]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(copy))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(copy / "pretrain_gpt_moe.py"), *args]
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    rates = [layer["compression_rate"] for r in rows for layer in r["moe"]]
    # One row per expert present out of 64+ routed rows per rank and layer.
    assert rates and max(rates) < 0.1, rates

    help_text = subprocess.run([sys.executable, str(copy / "pretrain_gpt_moe.py"), "--help"],
                               cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert "--moe-expert-mean-scale" in help_text.stdout
    assert "expert-mean" in help_text.stdout
    bad = subprocess.run([sys.executable, str(copy / "pretrain_gpt_moe.py"),
                          "--moe-a2a-compression", "expert-mean",
                          "--moe-expert-mean-scale", "0"],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--moe-expert-mean-scale must be positive, got 0.0" in bad.stderr
