"""Hugging Face export: a Mixtral-style GPT-MoE trained on 2 processes (TP2 x EP2, LSH on)
exports as ``MixtralForCausalLM``, ``transformers`` loads it and its logits equal ours (fp32,
atol 1e-4); its tokenizer exports with the same ids; a model Mixtral cannot express is one
sentence naming why, and no output is left."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from tests.e2e.util import REPO, run_entry

TRAIN = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
         "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
         "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-3", "--eval-iters", "0",
         "--moe-a2a-compression", "lsh", "--distributed-backend", "gloo"]


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "checkpoint" / "export_hf.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for recipe in ("tiny-mixtral", "tiny-gpt-moe"):
        ckpt = root / recipe
        run_entry("gpt", ["--model-recipe", recipe, *TRAIN, "--save", str(ckpt),
                          "--data-cache-path", str(root / "cache")], nproc=2)
        out[recipe] = ckpt
    return root, out


def test_transformers_loads_the_export_and_its_logits_are_ours(checkpoints):
    from megatron_lsh.convert.load import load_model
    root, ckpts = checkpoints
    proc = export("--load", ckpts["tiny-mixtral"], "--output", root / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "exported to" in proc.stdout and "no tokenizer files" in proc.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32)
    assert type(hf).__name__ == "MixtralForCausalLM"
    ours = load_model(str(ckpts["tiny-mixtral"]))
    tokens = torch.randint(0, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.eval()(tokens).logits
        mine = ours.model(input_ids=tokens)[0].transpose(0, 1)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)


def test_a_model_mixtral_cannot_express_is_refused_and_nothing_is_written(checkpoints):
    root, ckpts = checkpoints
    proc = export("--load", ckpts["tiny-gpt-moe"], "--output", root / "refused")
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message.startswith("error: this checkpoint has no Hugging Face Mixtral equivalent: "
                              "--normalization is LayerNorm (Mixtral: RMSNorm); positions are "
                              "learned_absolute"), message
    assert "linear layers have biases" in message and "\n" not in message
    assert not os.path.exists(root / "refused")
    assert not [n for n in os.listdir(root) if n.startswith(".refused")]


def test_missing_checkpoint_is_one_sentence(tmp_path):
    proc = export("--load", tmp_path / "nothing", "--output", tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: checkpoint folder {tmp_path / 'nothing'} does not exist"


def test_gpt2_bpe_tokenizer_exports_with_the_same_ids(tmp_path):
    from megatron_lsh.convert.hf import _tokenizer_files
    from megatron_lsh.tokenizer import build_tokenizer
    from megatron_lsh.tokenizer.train import train_bpe
    from tests.fixtures.data_helpers import excerpt_texts
    texts = excerpt_texts()
    files = train_bpe(texts, 400, str(tmp_path / "tok"), log=lambda s: None)
    data = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": files["vocab.json"],
            "merge_file": files["merges.txt"]}
    (tmp_path / "hf").mkdir()
    assert _tokenizer_files({"data": data, "model": {"seq_length": 64}}, str(tmp_path / "hf"),
                            {}) is None
    ours = build_tokenizer("GPT2BPETokenizer", vocab_file=files["vocab.json"],
                           merge_file=files["merges.txt"])
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in texts[:5]:
        assert hf.encode(text, add_special_tokens=False) == ours.tokenize(text)
    assert hf.eos_token_id == ours.eod


def test_generate_from_a_sharded_checkpoint(checkpoints):
    """tools/generate.py on the TP2 x EP2 checkpoint: the last stdout line is the greedy
    continuation our model gives in one process; statistics go to stderr."""
    from megatron_lsh.convert.generate import Sampling, generate
    from megatron_lsh.convert.load import load_model
    from megatron_lsh.tokenizer import NullTokenizer
    _, ckpts = checkpoints
    tool = str(REPO / "tools" / "generate.py")
    proc = subprocess.run([sys.executable, tool, "--load", str(ckpts["tiny-mixtral"]),
                           "--prompt", "7 8 9 10", "--max-new-tokens", "6", "--greedy"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ours = load_model(str(ckpts["tiny-mixtral"]))
    tok = NullTokenizer(500)
    want = generate(ours.model, [7, 8, 9, 10], 6, Sampling(greedy=True),
                    vocab_size=tok.vocab_size, stop_id=tok.eod)
    assert proc.stdout.strip().splitlines()[-1] == tok.detokenize([t for t in want
                                                                   if t != tok.eod])
    assert "4 prompt tokens" in proc.stderr and "tokens/s" in proc.stderr
    seeded = [subprocess.run([sys.executable, tool, "--load", str(ckpts["tiny-mixtral"]),
                              "--prompt", "7 8", "--max-new-tokens", "5", "--top-k", "5",
                              "--seed", "3"], capture_output=True, text=True, timeout=300).stdout
              for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0].strip()
