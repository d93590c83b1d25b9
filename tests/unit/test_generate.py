"""Generation: the KV cache gives the logits of a full forward, greedy decoding is the argmax
of full forwards, and the samplers cut what they say."""
from __future__ import annotations

import pytest
import torch

from megatron_lsh.convert.generate import Sampling, choose, generate
from megatron_lsh.models import build_model
from megatron_lsh.models.recipes import get_recipe
from megatron_lsh.models.transformer import InferenceCache


def _model(name):
    recipe = get_recipe(name)
    torch.manual_seed(0)
    return build_model("gpt", recipe.model(), recipe.moe()).eval()


@pytest.mark.parametrize("name", ["tiny-gpt-moe", "tiny-mixtral"])   # learned / RoPE + GQA
def test_cached_decoding_gives_the_full_forward_logits(name):
    model = _model(name)
    tokens = torch.randint(0, 4000, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=tokens)[0]                       # [s, 1, V]
        cache = InferenceCache()
        parts = [model(input_ids=tokens[:, :12], cache=cache)[0]]
        for i in range(12, 20):
            parts.append(model(input_ids=tokens[:, i:i + 1], cache=cache)[0])
    assert cache.offset == 20
    torch.testing.assert_close(torch.cat(parts, dim=0), full, rtol=1e-5, atol=1e-5)


def test_greedy_is_the_argmax_of_full_forwards():
    model = _model("tiny-mixtral")
    prompt = [5, 17, 300, 42]
    got = generate(model, prompt, 10, Sampling(greedy=True))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(input_ids=torch.tensor([seq]))[0][-1, 0].argmax()))
    assert got == seq[len(prompt):]


def test_samplers():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -5.0])
    g = torch.Generator().manual_seed(0)
    assert {choose(logits, Sampling(top_k=1), g) for _ in range(20)} == {1}
    assert {choose(logits, Sampling(top_k=2), g) for _ in range(200)} == {1, 3}
    # top-p: token 1 alone has probability ~0.47 < 0.5, so token 3 joins the nucleus.
    assert {choose(logits, Sampling(top_p=0.5), g) for _ in range(200)} == {1, 3}
    assert {choose(logits, Sampling(top_p=0.01), g) for _ in range(20)} == {1}
    a = [choose(logits, Sampling(), torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [choose(logits, Sampling(), torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b
    with pytest.raises(ValueError, match="--top-p must be in"):
        Sampling(top_p=0.0)


def test_stops_at_the_stop_token_and_the_position_limit():
    model = _model("tiny-gpt-moe")   # learned positions: 64
    first = generate(model, [1, 2, 3], 5, Sampling(greedy=True))
    stop = first[1]
    assert generate(model, [1, 2, 3], 5, Sampling(greedy=True),
                    stop_id=stop) == first[:first.index(stop) + 1]
    assert len(generate(model, list(range(60)), 10, Sampling(greedy=True),
                        max_positions=64)) == 4
    with pytest.raises(ValueError, match="the prompt has 64 tokens; the model handles at most"):
        generate(model, list(range(64)), 1, Sampling(greedy=True), max_positions=64)
    assert all(t < 100 for t in generate(model, [1], 20, Sampling(), vocab_size=100))
