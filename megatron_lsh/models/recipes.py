"""Model recipes: the paper's configurations (Table 1) and tiny ones that train on 2 CPU cores.

``python -m megatron_lsh.models.recipes --count NAME`` builds a recipe on the meta device (no
memory is allocated) and prints its total and MoE parameter counts; the last line is the
total as an integer.

Assumptions common to the paper recipes (the paper does not state them):
- vocabulary 50257 (GPT-2 BPE), padded to a multiple of 128 -> 50304 embedding rows;
- learned absolute position embeddings (2048 positions for GPT, 512 for RoBERTa/T5);
- biases on every linear layer, pre-LayerNorm with weight and bias, a final LayerNorm;
- the output layer is tied to the word embedding (no extra parameters), RoBERTa and T5 add
  a vocabulary-sized output bias and RoBERTa the MLM head (dense h x h + LayerNorm);
- 64-dimensional heads (heads = hidden / 64); top-2 routing; routers have no bias;
- MoE every 2nd layer (layers 2, 4, ..., 1-based, as fairseq places them) unless noted,
  written as a ``--moe-layer-freq`` pattern (Megatron's int k would put MoE on layers
  1, 1+k, ...); load-balancing loss weight 0.01.

The tiny recipes place MoE the same way. Given ``--num-layers`` (and no ``--moe-layer-freq``),
the entry points rebuild a recipe's pattern for that many layers (:meth:`Recipe.moe`).
``mixtral-8x7b`` is Mixtral's published
shape (grouped-query attention, RoPE, RMSNorm, SwiGLU experts, no biases, untied output).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_lsh.config import ModelConfig, MoEConfig, replace_config


def every(k: int, layers: int) -> list:
    """A ``--moe-layer-freq`` pattern with MoE on layers k, 2k, ... (1-based) of ``layers``."""
    return [int(n % k == 0) for n in range(1, layers + 1)]


@dataclass(frozen=True)
class Recipe:
    """A named model: its task kind plus complete model and MoE configs.

    ``model()`` and ``moe()`` return fresh copies (configs are mutable; a run may adjust its
    copy, e.g. the vocabulary size from the tokenizer).
    """

    name: str
    kind: str
    """The task that trains it: 'gpt', 'roberta', 't5' or 'swin'."""
    model_config: ModelConfig
    moe_config: MoEConfig
    doc: str = ""
    moe_every: Optional[int] = None
    """MoE on every k-th layer starting with the k-th: the MoE config's ``moe_layer_freq`` is
    that pattern, rebuilt by :meth:`moe` for another layer count."""

    def model(self) -> ModelConfig:
        """A copy of the model config."""
        return replace_config(self.model_config)

    def moe(self, num_layers: Optional[int] = None) -> MoEConfig:
        """A copy of the MoE config; ``num_layers`` (a ``--num-layers`` override) rebuilds a
        ``moe_every`` placement pattern for that many layers."""
        if self.moe_every and num_layers:
            return replace_config(self.moe_config,
                                  moe_layer_freq=every(self.moe_every, num_layers))
        return replace_config(self.moe_config)


_PAPER_MODEL = ModelConfig(vocab_size=50257)
"""What the paper recipes share (see the module docstring); each replaces the shape."""
_PAPER_MOE = MoEConfig(num_experts=16, router_topk=2, aux_loss_coeff=1e-2)


def _gpt(layers: int, hidden: int, ffn: int, experts: int, seq: int = 2048):
    return (replace_config(_PAPER_MODEL, num_layers=layers, hidden_size=hidden,
                           ffn_hidden_size=ffn, num_attention_heads=hidden // 64, seq_length=seq),
            replace_config(_PAPER_MOE, num_experts=experts, moe_layer_freq=every(2, layers)))


RECIPES: dict[str, Recipe] = {}


def _register(recipe: Recipe) -> None:
    RECIPES[recipe.name] = recipe


_register(Recipe("gpt-moe-15b", "gpt", *_gpt(12, 768, 3072, 512),
                 doc="GPT-MoE 15B (fairseq moe_lm): 12 layers, d 768, ffn 3072, 512 experts "
                     "every 2nd layer; Table 1: 14629M total, 14507M in experts.", moe_every=2))
_register(Recipe("gpt-moe-52b", "gpt", *_gpt(24, 1024, 4096, 512),
                 doc="GPT-MoE 52B: 24 layers, d 1024, ffn 4096, 512 experts every 2nd layer; "
                     "Table 1: 51740M total, 51539M in experts.", moe_every=2))
_register(Recipe(
    "roberta-moe", "roberta",
    replace_config(_PAPER_MODEL, num_layers=12, hidden_size=768, ffn_hidden_size=3072,
                   num_attention_heads=12, seq_length=512),
    replace_config(_PAPER_MOE, moe_layer_freq=every(3, 12)),
    doc="RoBERTa-MoE: 12 layers, d 768, ffn 3072, 16 experts. Table 1 gives 302M expert and "
        "394M total parameters. 16 experts of 2 x 768 x 3072 weights are 75.5M per MoE layer, "
        "so 302M is exactly 4 MoE layers, not the 6 that 'every 2nd layer' would give (453M). "
        "We therefore place MoE on every 3rd layer (layers 3, 6, 9, 12): 302M in experts and "
        "about 408M in total, 3.5% above the table's 394M (which the dense remainder of a "
        "12-layer, 50k-vocabulary encoder cannot reach with 4 MoE layers); with every 2nd "
        "layer the total would be 15% above.", moe_every=3))
_register(Recipe(
    "t5-moe", "t5",
    replace_config(_PAPER_MODEL, num_layers=16, decoder_num_layers=16, hidden_size=1024,
                   ffn_hidden_size=16384, num_attention_heads=16, seq_length=512,
                   decoder_seq_length=128),
    replace_config(_PAPER_MOE, moe_layer_freq=every(2, 16)),
    doc="T5-MoE: 16 encoder + 16 decoder layers, d 1024, ffn 16384, 16 experts every 2nd "
        "layer of each stack (16 MoE layers); Table 1: 9288M total, 8594M in experts.",
    moe_every=2))

_TINY_MODEL = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128,
                          num_attention_heads=4, seq_length=64, vocab_size=4096,
                          hidden_dropout=0.0, attention_dropout=0.0)
_TINY_MOE = MoEConfig(num_experts=4, moe_layer_freq=every(2, 4), router_topk=2,
                      aux_loss_coeff=1e-2)
_register(Recipe("tiny-gpt-moe", "gpt", _TINY_MODEL, _TINY_MOE, moe_every=2,
                 doc="A 4-layer GPT-MoE (d 64, 4 experts every 2nd layer) for CPU runs."))
_register(Recipe("tiny-roberta-moe", "roberta", _TINY_MODEL, _TINY_MOE, moe_every=2,
                 doc="A 4-layer RoBERTa-MoE for CPU runs."))
_register(Recipe("tiny-t5-moe", "t5",
                 replace_config(_TINY_MODEL, num_layers=2, decoder_num_layers=2,
                                decoder_seq_length=16),
                 replace_config(_TINY_MOE, moe_layer_freq=every(2, 2)), moe_every=2,
                 doc="A 2+2-layer T5-MoE for CPU runs."))

_MIXTRAL_STYLE = dict(normalization="RMSNorm", position_embedding_type="rope",
                      activation="swiglu", add_bias_linear=False,
                      untie_embeddings_and_output_weights=True, group_query_attention=True,
                      hidden_dropout=0.0, attention_dropout=0.0)
_register(Recipe(
    "mixtral-8x7b", "gpt",
    ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                num_query_groups=8, seq_length=4096, max_position_embeddings=32768,
                vocab_size=32000, rotary_base=1000000, **_MIXTRAL_STYLE),
    MoEConfig(num_experts=8, router_topk=2, moe_layer_freq=1, aux_loss_coeff=1e-2),
    doc="Mixtral 8x7B: 32 layers, d 4096, 32 query / 8 key-value heads, 8 SwiGLU experts of "
        "14336 on every layer, top-2, RoPE (base 1e6), RMSNorm, vocabulary 32000, untied; "
        "published total 46.7B parameters, 12.9B active per token."))
_register(Recipe(
    "tiny-mixtral", "gpt",
    ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, seq_length=64, vocab_size=4096, **_MIXTRAL_STYLE),
    MoEConfig(num_experts=4, router_topk=2, moe_layer_freq=1, aux_loss_coeff=1e-2),
    doc="A 4-layer Mixtral-style GPT-MoE (GQA 4/2 heads, RoPE, RMSNorm, SwiGLU experts on "
        "every layer, no biases, untied) for CPU runs."))


def swin_moe_pattern(depths) -> list:
    """Swin-MoE's placement as a ``--moe-layer-freq`` pattern over all blocks: MoE in every
    other block (the 2nd, 4th, ... of a stage) of the last two stages, dense elsewhere."""
    pattern = []
    for stage, depth in enumerate(depths):
        late = stage >= len(depths) - 2
        pattern += [int(late and i % 2 == 1) for i in range(depth)]
    return pattern


_SWIN_L = ModelConfig(num_layers=24, hidden_size=192, num_attention_heads=6,
                      swin_depths=(2, 2, 18, 2), swin_num_heads=(6, 12, 24, 48), img_size=224,
                      patch_dim=4, window_size=7, num_classes=1000, seq_length=3136,
                      hidden_dropout=0.0, attention_dropout=0.0, label_smoothing=0.1)
_register(Recipe(
    "swin-moe-l", "swin", _SWIN_L,
    MoEConfig(num_experts=32, router_topk=2, aux_loss_coeff=1e-2,
              moe_layer_freq=swin_moe_pattern((2, 2, 18, 2))),
    doc="Swin-MoE-L: Swin-L (embed 192, depths 2/2/18/2, heads 6/12/24/48, window 7, 224 px, "
        "patch 4; the dense Swin-L has 196.5M parameters, published 197M) with 32 experts, "
        "top-2, in every other block of stages 3 and 4 (10 MoE blocks), as Swin-MoE places "
        "them; 1000 classes."))
_register(Recipe(
    "tiny-swin-moe", "swin",
    ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=2, swin_depths=(2, 2),
                swin_num_heads=(2, 4), img_size=32, patch_dim=4, window_size=4, num_classes=10,
                seq_length=64, hidden_dropout=0.0, attention_dropout=0.0),
    MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=1e-2,
              moe_layer_freq=swin_moe_pattern((2, 2))),
    doc="A 2-stage Swin-MoE (32 px, 8 x 8 patches, windows of 4, widths 32/64, 4 experts in "
        "the 2nd block of each stage, 10 classes) for CPU runs."))


def get_recipe(name: str) -> Recipe:
    """Look up a recipe by name, with a clear message listing the known ones."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def build_model(kind: str, model: ModelConfig, moe: MoEConfig, groups=None, *, seed: int = 1234,
                sequence_parallel: bool = False, device=None) -> torch.nn.Module:
    """Build this rank's stage of a model of ``kind`` (a ``MODEL_CLASSES`` name: 'gpt',
    'roberta', 't5'), single process by default."""
    from megatron_lsh.models.registry import model_class
    from megatron_lsh.parallel.dims import ProcessGroups

    groups = groups or ProcessGroups.single()
    return model_class(kind)(model, moe, groups, seed=seed, sequence_parallel=sequence_parallel,
                             device=device)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, in experts) parameter counts, each parameter counted once."""
    seen, total, expert = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if getattr(p, "is_expert", False):
            expert += p.numel()
    return total, expert


def count_recipe(name: str) -> tuple[int, int]:
    """Build ``name`` on the meta device and count its parameters."""
    recipe = get_recipe(name)
    model = build_model(recipe.kind, recipe.model(), recipe.moe(), device="meta")
    return count_parameters(model)


def main(argv=None) -> int:
    """CLI: ``--count NAME`` prints parameter counts; ``--list`` prints the recipes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", metavar="NAME", help="count the parameters of a recipe")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    args = parser.parse_args(argv)
    if args.list or not args.count:
        for name, recipe in sorted(RECIPES.items()):
            print(f"{name:18s} {recipe.doc}")
        return 0
    try:
        total, expert = count_recipe(args.count)
    except KeyError as e:
        parser.exit(2, f"error: {e.args[0]}\n")
    print(f"recipe: {args.count}")
    print(f"moe parameters: {expert:,} ({expert / 1e6:.0f}M)")
    print(f"dense parameters: {total - expert:,} ({(total - expert) / 1e6:.0f}M)")
    print(f"total parameters: {total:,} ({total / 1e6:.0f}M)")
    print(total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
