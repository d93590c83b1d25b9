"""Probe a trained checkpoint: what does target-rate clustering change in its loss and gradients?

The rate-quality runs (``bench/rate_quality.py``) say *whether* a compressed run ends worse
than dense; this probe says *where the error enters*. It loads a checkpoint (any layout, one
process), takes fixed validation batches, and evaluates the model with every MoE layer
computing its experts either exactly or on the centroids of ``--rates`` target-rate clusters
(the framework's error-driven splitting, per expert, ``ceil(rate x rows)`` clusters, no wire
format): ``y_i = E(c_i) + alpha (x_i - c_i)`` with ``alpha`` from ``--alphas`` (0: no
compensation, 1: the paper's residual). Autograd goes through the centroids exactly as the
compressed all-to-all's backward does (each row of a cluster gets the cluster's gradient
through ``E'(c)``, divided among its rows), so the gradient error is the one training sees.

Per setting it prints the loss against the exact model's, and per class of row (``mask``:
the input token is the mask token; ``pad``; ``other``), averaged over the MoE layers:

* ``x var``: residual variance ``sum |x - c|^2 / sum |x - m_e|^2`` (``m_e`` the mean row of
  the row's expert), the share of the token-specific part the centroids lose;
* ``y err``: ``sum |y - E(x)|^2 / sum |E(x) - mean|^2``, the same for the expert outputs;

and the relative gradient error ``|g - g_exact| / |g_exact|`` per parameter group (embeddings,
each layer's dense parameters, routers, experts). RoBERTa-MoE checkpoints (masked LM) only.

    .venv/bin/python bench/centroid_probe.py --load CKPT_DIR
    .venv/bin/python bench/centroid_probe.py --load CKPT_DIR --rates 0.05 0.1 --alphas 0 1 --json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_lsh.moe.compressors.clustering import cluster_budget, cluster_to_budget  # noqa: E402
from megatron_lsh.moe.compressors.lsh_ops import Clusters, segment_mean  # noqa: E402
from megatron_lsh.moe.layer import MoELayer  # noqa: E402

CLASSES = ("other", "mask", "pad")


def _centroid_moe(layer: MoELayer, setting: dict, record: list):
    """A forward for ``layer`` (one process, every expert local) that runs its experts on
    cluster centroids when ``setting['rate']`` is set, and exactly otherwise."""
    def forward(hidden_states):
        shape = hidden_states.shape
        x_TH = hidden_states.reshape(-1, layer.hidden_size)
        routing = layer.router(x_TH, None, num_sequences=shape[1] if len(shape) == 3 else 1)
        topk = routing.experts_TK.shape[1]
        order_R = torch.argsort(routing.experts_TK.reshape(-1), stable=True)
        expert_R = routing.experts_TK.reshape(-1)[order_R]
        token_R = torch.arange(x_TH.shape[0]).repeat_interleave(topk)[order_R]
        gate_R = routing.gates_TK.reshape(-1)[order_R]
        x_RH = x_TH.index_select(0, token_R)
        num_experts = layer.experts.num_experts
        rows_E = torch.bincount(expert_R, minlength=num_experts)
        if setting.get("rate") is None:
            y_RH = layer.experts(x_RH, rows_E.tolist())
        else:
            budget_E = cluster_budget(rows_E, setting["rate"])
            clusters = Clusters(*cluster_to_budget(x_RH, expert_R, budget_E))
            cluster_R = clusters.cluster_of_row
            # Differentiable centroids: the backward divides each cluster's gradient among its rows.
            c_CH = segment_mean(x_RH, clusters)
            y_CH = layer.experts(c_CH, clusters.centroids_per_expert.tolist())  # sorted by expert
            y_RH = y_CH.index_select(0, cluster_R)
            d_RH = x_RH - c_CH.index_select(0, cluster_R)
            alpha = setting.get("alpha", 0.0)
            if alpha:
                y_RH = y_RH + alpha * d_RH
            with torch.no_grad():
                exact_RH = layer.experts(x_RH, rows_E.tolist())
                mean_EH = torch.zeros(num_experts, x_RH.shape[1]).index_add_(0, expert_R, x_RH)
                mean_EH /= rows_E.clamp_min(1).unsqueeze(1).to(x_RH.dtype)
                class_R = setting["classes_T"].index_select(0, token_R)
                parts = {"x_err": d_RH.square().sum(1),
                         "x_var": (x_RH - mean_EH.index_select(0, expert_R)).square().sum(1),
                         "y_err": (y_RH - exact_RH).square().sum(1),
                         "y_var": (exact_RH - exact_RH.mean(0)).square().sum(1)}
                record.append({"clusters": clusters.num_clusters, "rows": int(x_RH.shape[0]),
                               "by_class": {name: {k: float(v[class_R == c].sum())
                                                   for k, v in parts.items()}
                                            for c, name in enumerate(CLASSES)}})
        out_TH = torch.zeros_like(x_TH).index_add(0, token_R, y_RH * gate_R.unsqueeze(1)
                                                  .to(y_RH.dtype))
        return out_TH.reshape(shape), {"aux_loss": routing.aux_loss, "z_loss": routing.z_loss}
    return forward


@contextlib.contextmanager
def centroid_forwards(model: torch.nn.Module, setting: dict, record: list):
    """Within the block every MoE layer of ``model`` uses :func:`_centroid_moe`."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("the model has no MoE layer")
    if any(m.groups.ep_size > 1 or m.groups.tp_size > 1 for m in layers):
        raise ValueError("the probe runs in one process (load the checkpoint with load_model)")
    for m in layers:
        m.forward = _centroid_moe(m, setting, record)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def param_group(name: str) -> str:
    """Which gradient group a parameter belongs to (see the module docstring)."""
    if ".experts." in name:
        return "experts"
    if ".router." in name:
        return "router"
    if name.startswith("embedding."):
        return "embed"
    match = re.search(r"layers\.(\d+)\.", name)
    return f"layer{match.group(1)}" if match else "head"


def loss_and_grads(model, batches: list, mask_id: int, setting: dict, record: list):
    """Mean masked-LM loss over ``batches`` and the gradient of their summed means."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        classes = torch.zeros_like(batch["tokens"])
        classes[batch["tokens"] == mask_id] = 1
        classes[~batch["padding_mask"].bool()] = 2
        setting["classes_T"] = classes.t().reshape(-1)          # tokens are [s, b]-major
        with centroid_forwards(model, setting, record):
            per_token, _ = model(input_ids=batch["tokens"],
                                 padding_mask=batch["padding_mask"].bool(),
                                 labels=batch["labels"])
        weight = batch["loss_mask"].float()
        if per_token.shape != weight.shape:
            per_token = per_token.t()
        loss = (per_token.float() * weight).sum() / weight.sum().clamp_min(1.0)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return total / len(batches), grads


def probe(model, batches: list, mask_id: int, settings: list) -> list:
    """One result dict per setting (``{'rate': None}`` is exact), the exact one first."""
    exact_loss, exact_grads = loss_and_grads(model, batches, mask_id, {"rate": None}, [])
    rows = [{"rate": None, "alpha": 0.0, "loss": exact_loss, "vs_exact": 0.0}]
    for setting in settings:
        record: list = []
        loss, grads = loss_and_grads(model, batches, mask_id, dict(setting), record)
        err: dict = {}
        for name, g0 in exact_grads.items():
            acc = err.setdefault(param_group(name), [0.0, 0.0])
            acc[0] += float((grads[name] - g0).square().sum())
            acc[1] += float(g0.square().sum())
        by_class = {}
        for name in CLASSES:
            sums = {k: sum(r["by_class"][name][k] for r in record) for k in
                    ("x_err", "x_var", "y_err", "y_var")}
            if sums["x_var"] > 0:
                by_class[name] = {"x_var": sums["x_err"] / sums["x_var"],
                                  "y_err": sums["y_err"] / max(sums["y_var"], 1e-30)}
        rows.append({"rate": setting["rate"], "alpha": setting.get("alpha", 0.0),
                     "loss": loss, "vs_exact": loss / exact_loss - 1,
                     "clusters_per_row": sum(r["clusters"] for r in record)
                     / max(sum(r["rows"] for r in record), 1),
                     "by_class": by_class,
                     "grad_rel_err": {k: (a / max(b, 1e-30)) ** 0.5 for k, (a, b) in
                                      err.items()}})
    return rows


def validation_batches(data_prefix: str, tokenizer_dir: Path, seq_length: int, count: int,
                       size: int, seed: int) -> tuple[list, int]:
    """``count`` batches of ``size`` masked-LM samples of ``data_prefix``, and the mask id."""
    from megatron_lsh.data.mlm_dataset import MLMDataset
    from megatron_lsh.data.special_tokens import SpecialTokenIds
    from megatron_lsh.tokenizer import build_tokenizer
    tokenizer = build_tokenizer("GPT2BPETokenizer", str(tokenizer_dir / "vocab.json"),
                                str(tokenizer_dir / "merges.txt"))
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    dataset = MLMDataset(data_prefix, None, count * size, seq_length, seed, special,
                         name="valid")
    batches = []
    for b in range(count):
        items = [dataset[i] for i in range(b * size, (b + 1) * size)]
        batches.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return batches, special.mask


def main(argv=None) -> None:
    """Load, probe, print the table (or JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (any parallel layout)")
    p.add_argument("--data", default=str(REPO / "data/shakespeare/valid_text_sentence"),
                   help="sentence-level indexed dataset prefix to draw the batches from")
    p.add_argument("--tokenizer-dir", type=Path, default=REPO / "data/tokenizer")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result rows as JSON")
    args = p.parse_args(argv)
    from megatron_lsh.convert.load import load_model
    from megatron_lsh.training.checkpoint_files import CheckpointError
    try:
        loaded = load_model(args.load)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    if loaded.kind != "roberta":
        raise SystemExit(f"error: {args.load} holds a {loaded.kind} model; the probe handles "
                         f"RoBERTa-MoE (masked LM) checkpoints only")
    if not Path(args.data + ".idx").exists():
        raise SystemExit(f"error: {args.data}.idx does not exist (preprocess with "
                         f"tools/preprocess_data.py --split-sentences)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    batches, mask_id = validation_batches(args.data, args.tokenizer_dir,
                                          loaded.model_config.seq_length, args.batches,
                                          args.batch_size, args.seed)
    settings = [{"rate": r, "alpha": a} for r in args.rates for a in args.alphas]
    rows = probe(loaded.model.eval(), batches, mask_id, settings)
    if args.json:
        print(json.dumps({"iteration": loaded.iteration, "rows": rows}))
        return
    print(f"checkpoint {loaded.folder} (iteration {loaded.iteration}), "
          f"{args.batches} x {args.batch_size} validation samples")
    print(f"{'rate':>5s} {'alpha':>5s} {'loss':>8s} {'vs exact':>9s}  "
          f"{'x var (other/mask/pad)':>24s}  {'y err (other/mask/pad)':>24s}  grad rel err")
    for r in rows:
        if r["rate"] is None:
            print(f"{'exact':>5s} {'':>5s} {r['loss']:8.4f}")
            continue
        cls = r["by_class"]
        xs = "/".join(f"{cls[c]['x_var']:.4f}" if c in cls else "-" for c in CLASSES)
        ys = "/".join(f"{cls[c]['y_err']:.4f}" if c in cls else "-" for c in CLASSES)
        gs = " ".join(f"{k} {v:.3f}" for k, v in r["grad_rel_err"].items())
        print(f"{r['rate']:5.2f} {r['alpha']:5.2f} {r['loss']:8.4f} {100 * r['vs_exact']:+8.3f}%  "
              f"{xs:>24s}  {ys:>24s}  {gs}")


if __name__ == "__main__":
    main()
