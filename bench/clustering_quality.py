"""Distortion and cost of exact-count clustering vs SimHash LSH buckets, on real hidden states.

Inputs: contextual hidden states of real text (``megatron_lsh.moe.text_states``: word embeddings
mixed by fixed random causal attention) of the first ``--tokens`` tokens of
``data/shakespeare/train.jsonl`` (its first plays) when it exists, else of
``tests/fixtures/moe/hamlet_act1_scene1.txt`` (1874 tokens, so at most 1874 are used; the
text is never repeated, which would plant near-duplicate rows). Each token goes to
the top-2 of 8 experts of a fixed random router (softmax of ``x @ W``); the rows are sorted by
expert. At each target rate r every expert gets ``ceil(r * rows_e)`` clusters, and:

* ``simhash``: sign bits of ``x @ P`` (P Gaussian, L columns), one cluster per (expert, bits);
  L is the largest whose cluster count is closest to, and not above, the total budget; the
  ``rate`` column is the count it actually reached;
* ``split``: error-driven splitting (``cluster_to_budget``, searching in a ``--sketch``-dim
  random projection when H is larger), exactly the budget;
* ``split+lloydN``: the same followed by N Lloyd passes;
* ``simhash-init+split``: SimHash buckets (the largest L with every expert within its budget)
  as the initial partition, then splitting up to the budget (hashing time included).

Columns: rate (clusters / rows), mean cosine of rows to their centroid, 1 - cos, relative
residual energy ``sum |x - c|^2 / sum |x|^2``, median wall time of ``--repeats`` runs on
``--threads`` threads (default 1), and that time over one expert FFN forward + backward
(``H -> 4H -> H``, gelu, fp32) on all the rows, the cost the compression is meant to save
(a 5% overhead budget means ``vs_ffn <= 0.05``); ``vs_ffn_cpu`` is the same ratio in CPU time
of this process, steadier on a shared machine. Writes ``bench/out/clustering_quality.json``.

    .venv/bin/python bench/clustering_quality.py                  # H=128 and 1024 (~1 min)
    .venv/bin/python bench/clustering_quality.py --hidden 128 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from megatron_lsh.moe.compressors.clustering import (  # noqa: E402
    canonical_numbering, cluster_budget, cluster_centroids, cluster_to_budget, distortion)
from megatron_lsh.moe.text_states import text_states, word_ids  # noqa: E402

CORPUS = os.path.join(REPO, "data", "shakespeare", "train.jsonl")
FIXTURE = os.path.join(REPO, "tests", "fixtures", "moe", "hamlet_act1_scene1.txt")
MAX_BITS = 24


def load_text() -> tuple[str, str]:
    """(text, source path): the Shakespeare corpus when present, else the Hamlet fixture."""
    if os.path.exists(CORPUS):
        parts = []
        with open(CORPUS, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    parts.append(rec.get("text", "") if isinstance(rec, dict) else str(rec))
                if sum(len(p) for p in parts) > 200_000:
                    break
        return "\n".join(parts), CORPUS
    with open(FIXTURE, encoding="utf-8") as f:
        return f.read(), FIXTURE


def routed_rows(x_TH: torch.Tensor, num_experts: int, topk: int, seed: int):
    """Rows ``[R, H]`` (R = T * topk) sorted by expert and their experts ``[R]``."""
    gen = torch.Generator().manual_seed(seed + 1)
    w_HE = torch.randn(x_TH.shape[1], num_experts, generator=gen) / x_TH.shape[1] ** 0.5
    probs_TE = torch.softmax(x_TH @ w_HE, dim=-1)
    expert_TK = probs_TE.topk(topk, dim=-1).indices
    order_R = torch.argsort(expert_TK.reshape(-1), stable=True)
    token_R = torch.arange(x_TH.shape[0]).repeat_interleave(topk)[order_R]
    return x_TH[token_R].contiguous(), expert_TK.reshape(-1)[order_R].contiguous()


def simhash_ids(x_RH, expert_R, proj_HB, bits, num_experts):
    """Canonical clusters of (expert, first ``bits`` sign bits of ``x @ proj``)."""
    bits_RB = (x_RH @ proj_HB[:, :bits] > 0).to(torch.int64)
    key_R = expert_R * (1 << bits) + (bits_RB << torch.arange(bits)).sum(1)
    return canonical_numbering(key_R, expert_R, num_experts)


def timed(fn, repeats):
    """(result of the last call, (median wall ms, median CPU ms of this process))."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return out, (statistics.median(wall), statistics.median(cpu))


def ffn_ms(rows, hidden, repeats):
    """(wall, CPU) median ms of an FFN forward + backward (H -> 4H -> H, gelu) on ``rows`` rows."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, hidden, generator=gen)
    w1 = (torch.randn(hidden, 4 * hidden, generator=gen) / hidden ** 0.5).requires_grad_()
    w2 = (torch.randn(4 * hidden, hidden, generator=gen) / (4 * hidden) ** 0.5).requires_grad_()
    grad = torch.randn(rows, hidden, generator=gen)

    def step():
        y = torch.nn.functional.gelu(x @ w1) @ w2
        y.backward(grad)
        w1.grad = w2.grad = None
    step()
    return timed(step, repeats)[1]


def run_hidden(hidden, args, text):
    """All methods at all rates for one hidden size; list of result dicts."""
    ids_T, _ = word_ids(text)
    tokens = min(args.tokens, ids_T.shape[0])
    x_TH = text_states(text, hidden, num_tokens=tokens, seed=args.seed)
    x_RH, expert_R = routed_rows(x_TH, args.experts, args.topk, args.seed)
    rows = x_RH.shape[0]
    rows_E = torch.bincount(expert_R, minlength=args.experts)
    proj_HB = torch.randn(hidden, MAX_BITS, generator=torch.Generator().manual_seed(args.seed + 2))
    ffn = ffn_ms(rows, hidden, args.repeats)
    per_bits = [simhash_ids(x_RH, expert_R, proj_HB, b, args.experts) for b in
                range(1, MAX_BITS + 1)]
    results = []

    def record(method, rate, part, times, extra=None):
        cl_R, count_C = part[0], part[1]
        stats = distortion(x_RH, cl_R, cluster_centroids(x_RH, cl_R, count_C.numel()))
        row = {"hidden": hidden, "method": method, "target_rate": rate,
               "rate": count_C.numel() / rows, "mean_cos": stats["mean_cos"],
               "one_minus_cos": 1 - stats["mean_cos"], "rel_residual": stats["rel_residual"],
               "ms": times[0], "vs_ffn": times[0] / ffn[0], "cpu_ms": times[1],
               "vs_ffn_cpu": times[1] / ffn[1]}
        row.update(extra or {})
        results.append(row)

    for rate in args.rates:
        budget_E = cluster_budget(rows_E, rate)
        total = int(budget_E.sum())
        fits = [b for b in range(1, MAX_BITS + 1) if per_bits[b - 1][1].numel() <= total]
        bits = max(fits) if fits else 1
        part, ms = timed(lambda: simhash_ids(x_RH, expert_R, proj_HB, bits, args.experts),
                         args.repeats)
        record("simhash", rate, part, ms, {"bits": bits})
        opts = {"sketch_dim": args.sketch}
        part, ms = timed(lambda: cluster_to_budget(x_RH, expert_R, budget_E, **opts),
                         args.repeats)
        assert torch.equal(part[2], budget_E)
        record("split", rate, part, ms)
        for iters in range(1, args.lloyd + 1):
            part, ms = timed(lambda: cluster_to_budget(x_RH, expert_R, budget_E,
                                                       lloyd_iters=iters, **opts), args.repeats)
            record(f"split+lloyd{iters}", rate, part, ms)
        within = [b for b in range(1, MAX_BITS + 1)
                  if bool((per_bits[b - 1][2] <= budget_E).all())]
        init_bits = max(within) if within else 0
        if init_bits:
            def init_split():
                init_R = simhash_ids(x_RH, expert_R, proj_HB, init_bits, args.experts)[0]
                return cluster_to_budget(x_RH, expert_R, budget_E, init_cluster_of_row_R=init_R,
                                         **opts)
            part, ms = timed(init_split, args.repeats)
            assert torch.equal(part[2], budget_E)
            record("simhash-init+split", rate, part, ms, {"bits": init_bits})
    return results, {"hidden": hidden, "tokens": tokens, "rows": rows, "ffn_ms": ffn[0],
                     "ffn_cpu_ms": ffn[1],
                     "rows_per_expert": rows_E.tolist()}


def main(argv=None):
    """Parse the arguments, run every hidden size, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--tokens", type=int, default=4096,
                        help="tokens (capped by the text's length)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--lloyd", type=int, default=2, help="rows with 1..N Lloyd passes")
    parser.add_argument("--sketch", type=int, default=128,
                        help="sketch_dim of cluster_to_budget (0: search in H dims)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "out",
                                                      "clustering_quality.json"))
    args = parser.parse_args(argv)
    args.sketch = args.sketch or None
    torch.set_num_threads(args.threads)
    text, source = load_text()
    results, setups = [], []
    for hidden in args.hidden:
        res, setup = run_hidden(hidden, args, text)
        results += res
        setups.append(setup)
        print(f"H={hidden}: {setup['tokens']} tokens, {setup['rows']} rows, "
              f"FFN fwd+bwd {setup['ffn_ms']:.1f} ms ({setup['ffn_cpu_ms']:.1f} ms CPU)",
              flush=True)
    header = (f"{'H':>5} {'method':<19} {'target':>6} {'rate':>6} {'mean_cos':>8} "
              f"{'1-cos':>7} {'rel_res':>7} {'ms':>8} {'vs_ffn':>7} {'vs_ffn_cpu':>10}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['hidden']:>5} {r['method']:<19} {r['target_rate']:>6.2f} {r['rate']:>6.3f} "
              f"{r['mean_cos']:>8.4f} {r['one_minus_cos']:>7.4f} {r['rel_residual']:>7.4f} "
              f"{r['ms']:>8.1f} {r['vs_ffn']:>7.3f} {r['vs_ffn_cpu']:>10.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"source": os.path.relpath(source, REPO), "threads": args.threads,
                   "sketch_dim": args.sketch,
                   "experts": args.experts, "topk": args.topk, "repeats": args.repeats,
                   "setups": setups, "results": results}, f, indent=1)
    print(f"wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
