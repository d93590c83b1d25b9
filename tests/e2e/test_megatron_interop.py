"""Megatron-LM interop: a checkpoint converted by tools/checkpoint/convert_megatron.py loads
(strict) into Megatron-core's own GPTModel, whose logits equal ours (fp32, atol 1e-4), for a
Mixtral-style model and the paper-style tiny GPT-MoE (LayerNorm, learned positions, biases,
MoE on every 2nd layer), both trained on TP2 x EP2 with LSH.

Slow tier: needs megatron-core in its own virtual environment (see bench/megatron_peer.py),
named by ``MCORE_PYTHON`` (its python)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.e2e.util import REPO, run_entry

pytestmark = pytest.mark.slow
MCORE_PYTHON = os.environ.get("MCORE_PYTHON")

TRAIN = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
         "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--eval-iters", "0",
         "--moe-a2a-compression", "lsh", "--distributed-backend", "gloo"]


@pytest.mark.skipif(not MCORE_PYTHON, reason="set MCORE_PYTHON to a python with megatron-core")
@pytest.mark.parametrize("recipe", ["tiny-mixtral", "tiny-gpt-moe"])
def test_megatron_core_gives_our_logits(tmp_path, recipe):
    from megatron_lsh.convert.load import load_model
    from megatron_lsh.convert.megatron import architecture
    ckpt, converted = tmp_path / "ckpt", tmp_path / "megatron"
    run_entry("gpt", ["--model-recipe", recipe, *TRAIN, "--save", str(ckpt),
                      "--data-cache-path", str(tmp_path / "cache")], nproc=2)
    proc = subprocess.run([sys.executable, str(REPO / "tools/checkpoint/convert_megatron.py"),
                           "--load", str(ckpt), "--output", str(converted)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Megatron-LM model flags: --num-layers 4" in proc.stdout
    loaded = load_model(str(ckpt))
    (tmp_path / "arch.json").write_text(json.dumps(architecture(loaded)))
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run([MCORE_PYTHON, str(REPO / "bench" / "megatron_logits.py"),
                           "--checkpoint", str(converted), "--config", str(tmp_path / "arch.json"),
                           "--tokens", str(tmp_path / "tokens.pt"),
                           "--out", str(tmp_path / "theirs.pt")],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint version 3.0" in proc.stdout
    theirs = torch.load(tmp_path / "theirs.pt")
    with torch.no_grad():
        ours = loaded.model(input_ids=tokens)[0].transpose(0, 1)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
