"""Options of today's MoE models (Mixtral, Qwen-MoE, DeepSeek): each does what it says.

Layout equivalence of the same options is in ``tests/distributed/test_model_layouts.py``
(the "modern" jobs); here each option is checked on its own in one process, against a
definition written out in the test: RoPE's relative-position property, grouped-query
attention as multi-head attention with shared key / value heads, RMSNorm's formula, sigmoid
scores and the per-sequence load-balancing loss, the shared expert, the expert width, and
Megatron's ``--moe-layer-freq`` forms.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_lsh.arguments import parse_args
from megatron_lsh.config import ConfigError, ModelConfig, MoEConfig, parse_moe_layer_freq
from megatron_lsh.models import build_model
from megatron_lsh.models.rotary import RotaryEmbedding, apply_rotary, rotary_angles
from megatron_lsh.models.transformer import ParallelAttention
from megatron_lsh.moe.router import TopKRouter
from megatron_lsh.parallel.dims import ProcessGroups
from megatron_lsh.parallel.layers import build_layernorm
from megatron_lsh.parallel.random import model_parallel_seed

SINGLE = ProcessGroups.single()
SMALL = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
             seq_length=12, vocab_size=100, hidden_dropout=0.0, attention_dropout=0.0)


# -- RoPE -------------------------------------------------------------------------------------

def test_rope_scores_depend_only_on_the_distance():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    cos, sin = rotary_angles(32, 8, 10000.0)

    def score(i, j):
        qi = apply_rotary(q, cos[i:i + 1], sin[i:i + 1])
        kj = apply_rotary(k, cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(3, 1), score(20, 18), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_rope_keeps_norms_and_a_partial_rotation_keeps_the_other_channels():
    x = torch.randn(2, 3, 10, 8)
    rope = RotaryEmbedding(rotary_dim=4, base=10000)
    q, k = rope(x, x)
    torch.testing.assert_close(q.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(q[..., 4:], x[..., 4:], rtol=0, atol=0)
    assert not torch.allclose(q[..., 1:, :4], x[..., 1:, :4])


def test_rope_model_has_no_position_table_and_sees_order():
    # One layer: without positions, the last position's output of a causal layer is a
    # function of the set of earlier tokens, not of their order.
    rope = ModelConfig(**{**SMALL, "num_layers": 1}, position_embedding_type="rope")
    model = build_model("gpt", rope, MoEConfig())
    assert model.embedding.position_embeddings is None
    none = build_model("gpt", replace(rope, position_embedding_type="none"), MoEConfig())
    tokens = torch.randint(0, 100, (1, 12))
    swapped = tokens.clone()
    swapped[0, [0, 1]] = tokens[0, [1, 0]]
    model.eval()
    none.eval()
    with torch.no_grad():
        last = lambda m, t: m(input_ids=t)[0][-1]   # noqa: E731 - logits of the last position
        torch.testing.assert_close(last(none, tokens), last(none, swapped))
        assert not torch.allclose(last(model, tokens), last(model, swapped))


def test_position_flags_as_megatron_reads_them():
    assert parse_args(["--no-position-embedding"]).model.position_embedding_type == "none"
    both = parse_args(["--position-embedding-type", "rope", "--no-position-embedding"])
    assert both.model.position_embedding_type == "rope"
    assert (parse_args(["--use-rotary-position-embeddings"]).model.position_embedding_type
            == "rope")
    with pytest.raises(ConfigError, match="rotary-percent"):
        ModelConfig(**SMALL, position_embedding_type="rope", rotary_percent=0.1)


# -- grouped-query attention -----------------------------------------------------------------

def _attention(config):
    torch.manual_seed(0)
    return ParallelAttention(config, SINGLE, attention_type="self", causal=True,
                             sequence_parallel=False, selective_recompute=False)


def test_gqa_is_mha_whose_heads_share_keys_and_values_within_a_group():
    gqa_cfg = ModelConfig(**SMALL, group_query_attention=True, num_query_groups=2)
    mha_cfg = ModelConfig(**SMALL)
    gqa, mha = _attention(gqa_cfg), _attention(mha_cfg)
    d, per = gqa_cfg.kv_channels, 2
    assert gqa.qkv.weight.shape == ((4 + 2 * 2) * d, 32)
    w = gqa.qkv.weight.detach().view(2, per + 2, d, 32)          # (group, [q q k v], d, h)
    b = gqa.qkv.bias.detach().view(2, per + 2, d)
    mha_w = torch.stack([torch.stack([w[h // per, h % per], w[h // per, per],
                                      w[h // per, per + 1]]) for h in range(4)])
    mha_b = torch.stack([torch.stack([b[h // per, h % per], b[h // per, per],
                                      b[h // per, per + 1]]) for h in range(4)])
    with torch.no_grad():
        mha.qkv.weight.copy_(mha_w.reshape(-1, 32))
        mha.qkv.bias.copy_(mha_b.reshape(-1))
        mha.out.weight.copy_(gqa.out.weight)
        mha.out.bias.copy_(gqa.out.bias)
    x = torch.randn(12, 2, 32)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-6)


def test_gqa_settings_are_checked():
    with pytest.raises(ConfigError, match="needs --num-query-groups"):
        ModelConfig(**SMALL, group_query_attention=True)
    with pytest.raises(ConfigError, match="not divisible by --num-query-groups"):
        ModelConfig(**SMALL, group_query_attention=True, num_query_groups=3)
    # As in Megatron, --num-query-groups alone leaves one key / value head per query head.
    assert ModelConfig(**SMALL, num_query_groups=2).num_query_groups == 4


# -- RMSNorm ---------------------------------------------------------------------------------

def test_rmsnorm_formula_and_parameters():
    norm = build_layernorm(16, 1e-6, normalization="RMSNorm")
    assert [n for n, _ in norm.named_parameters()] == ["weight"]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 16)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)
    model = build_model("gpt", ModelConfig(**SMALL, normalization="RMSNorm"), MoEConfig())
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)


# -- router: sigmoid scores, load-balancing types ---------------------------------------------

def _router(**kw):
    return TopKRouter(8, 4, 2, aux_loss_coeff=0.1, seed=3, **kw)


def test_sigmoid_scores_renormalised_over_the_top_k():
    router = _router(score_function="sigmoid")
    x = torch.randn(6, 8)
    out = router(x)
    scores = torch.sigmoid(x @ router.weight.t())
    top, idx = scores.topk(2, dim=-1)
    assert torch.equal(out.experts_TK, idx)
    torch.testing.assert_close(out.gates_TK, top / top.sum(-1, keepdim=True))


def test_seq_aux_loss_is_the_mean_of_per_sequence_aux_losses():
    s, b = 5, 3
    x = torch.randn(s * b, 8)      # [s, b] order: token t belongs to sequence t % b
    seq = _router(load_balancing_type="seq_aux_loss")(x, num_sequences=b).aux_loss
    plain = _router()
    per_sequence = [plain(x.view(s, b, 8)[:, i]).aux_loss for i in range(b)]
    torch.testing.assert_close(seq, torch.stack(per_sequence).mean())
    assert not torch.allclose(seq, plain(x).aux_loss)
    torch.testing.assert_close(_router(load_balancing_type="seq_aux_loss")(x).aux_loss,
                               plain(x).aux_loss)   # one sequence: the plain loss


def test_no_load_balancing_whatever_the_coefficient():
    out = _router(load_balancing_type="none")(torch.randn(6, 8))
    assert out.aux_loss.item() == 0.0 and out.aux_loss.requires_grad


# -- shared expert, expert width, layer pattern ----------------------------------------------

def _moe_model(**moe):
    model_parallel_seed(5, SINGLE)
    return build_model("gpt", ModelConfig(**SMALL),
                       MoEConfig(num_experts=4, moe_layer_freq=2, **moe), seed=5)


def test_shared_expert_adds_a_dense_mlp_to_the_routed_output():
    plain, shared = _moe_model(), _moe_model(shared_expert_intermediate_size=24)
    layer = shared.decoder.layers["1"]
    assert layer.shared_expert.fc1.weight.shape == (24, 32)
    assert shared.decoder.layers["2"].shared_expert is None   # dense layers have none
    state = shared.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if "shared_expert" not in k})
    tokens = torch.randint(0, 100, (2, 12))
    assert not torch.allclose(shared(input_ids=tokens)[0], plain(input_ids=tokens)[0])
    with torch.no_grad():
        for m in shared.modules():
            if getattr(m, "shared_expert", None) is not None:
                m.shared_expert.fc2.weight.zero_()
    torch.testing.assert_close(shared(input_ids=tokens)[0], plain(input_ids=tokens)[0])


def test_expert_width_apart_from_the_dense_ffn():
    model = _moe_model(moe_ffn_hidden_size=40)
    assert model.decoder.layers["1"].mlp.experts.fc1_weight.shape[-1] == 40
    assert model.decoder.layers["2"].mlp.fc1.weight.shape == (64, 32)


def test_moe_layer_freq_as_megatron_reads_it():
    assert [n for n, l in _moe_model().decoder.layers.items() if l.is_moe] == ["1", "3"]
    assert parse_moe_layer_freq("([0]*3+[1]*1)*2") == [0, 0, 0, 1, 0, 0, 0, 1]
    assert parse_moe_layer_freq("'[1,0]'") == [1, 0]   # quotes a launch script left in
    assert parse_args(["--moe-layer-freq", "[0,1,1,0]", "--num-experts", "2"]
                      ).moe.moe_layer_freq == [0, 1, 1, 0]
    for bad in ("__import__('os')", "[1, 2]", "0"):
        with pytest.raises(ConfigError, match="--moe-layer-freq"):
            MoEConfig(moe_layer_freq=bad)
    with pytest.raises(ConfigError, match="gives 2 layers, but the stack has 4"):
        build_model("gpt", ModelConfig(**SMALL), MoEConfig(num_experts=2, moe_layer_freq=[0, 1]))


def test_swiglu_width_default_is_megatrons():
    assert ModelConfig(hidden_size=256, activation="swiglu").ffn_hidden_size == 640
    assert ModelConfig(hidden_size=256).ffn_hidden_size == 1024


def test_compression_skip_layers_send_the_named_layers_uncompressed():
    from megatron_lsh.models.gpt import GPTModel
    from megatron_lsh.moe.compressors import compression
    lsh = _moe_model(**compression("lsh", num_hashes=2), a2a_compression_skip_layers=(1,))
    cast = _moe_model(**compression("lsh", num_hashes=2), a2a_compression_skip_layers="1",
                      a2a_compression_skip_dtype="fp8")
    plain = _moe_model()
    names = {n: type(l.mlp.compressor).name for n, l in lsh.decoder.layers.items() if l.is_moe}
    assert names == {"1": "none", "3": "lsh"}
    first = cast.decoder.layers["1"].mlp.compressor
    assert type(first).name == "cast" and first.options.dtype == "fp8"
    # The skipped layer computes exactly what the uncompressed model's layer computes.
    x = torch.randn(12, 2, 32, generator=torch.Generator().manual_seed(1))
    out_skip, _ = lsh.decoder.layers["1"].mlp(x)
    out_plain, _ = plain.decoder.layers["1"].mlp(x)
    torch.testing.assert_close(out_skip, out_plain, rtol=0, atol=0)
    out_lsh, _ = lsh.decoder.layers["3"].mlp(x)
    out_none3, _ = plain.decoder.layers["3"].mlp(x)
    assert not torch.equal(out_lsh, out_none3)
    with pytest.raises(ConfigError, match="skip-layers names layer 2, which is not an MoE layer"):
        GPTModel.moe_layer_numbers(ModelConfig(**SMALL),
                                   MoEConfig(num_experts=4, moe_layer_freq=2,
                                             a2a_compression_skip_layers=(2,)))
    for bad, reason in (("0", "1-based"), ("a", "comma-separated")):
        with pytest.raises(ConfigError, match=f"--moe-a2a-compression-skip-layers: .*{reason}"):
            MoEConfig(num_experts=4, a2a_compression_skip_layers=bad)
