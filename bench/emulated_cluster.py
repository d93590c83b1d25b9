"""The real trainer on an emulated 2-node cluster: iteration time per all-to-all compressor.

What: ``pretrain_gpt_moe.py`` runs on ``--nproc`` gloo ranks spread over ``--nodes`` network
namespaces (``bench/netns.py``) whose NICs are token-bucket limited to ``--bandwidth`` Mbit/s
in each direction; ranks of one node talk over that namespace's ``lo`` (unlimited), ranks of
different nodes over the limited bridge. Each row is one (bandwidth, compressor) run; with
``--repeats`` > 1 the rows run interleaved (A B C A B C ...) and medians pool the repeats.

Why: the paper's claim (LSH-MoE, Fig. 3 and Table 2) is that the expert all-to-all takes
30-70% of a step on inter-node links and that compressing it buys up to ~Amdahl's bound. A
single machine has no slow link; this builds one and measures with the real trainer's stage
timers (``--timing-log-level 1``).

Models: ``--model swin`` runs Swin-MoE on the digits of ``tools/make_image_data.py`` (MoE in
every block, see ``MODELS['swin']``). The default (``MODELS['gpt']``: the ``tiny-gpt-moe``
recipe with explicit shape flags) is chosen so the *structure* of the traffic is the paper's:

* expert parameters dominate: all 4 layers are MoE layers (``--moe-layer-freq 1``), each with
  8 experts of 64 x 512 (ffn 8 x hidden; T5-MoE has 16 x): 2.1 M parameters in experts
  against 0.6 M dense ones, 78% in experts (paper: 77% RoBERTa-MoE, 93% T5-MoE);
* the all-to-all carries most traffic: ``--expert-model-parallel-size = nproc``, so every rank
  holds its own experts (2 of 8: no replica, hence no expert gradient all-reduce), and each
  rank routes 2048 tokens (4 x 512) top-2 through 4 MoE layers per iteration: ~50 MB of
  all-to-all (all ranks, to other ranks; ~17 MB of it from each node to the other) against
  2.4 MB of dense gradients (~4 MB per node with gloo's ring all-reduce);
* dense parameters small: hidden 64, 4 heads; the largest dense tensor is the tied embedding
  of the 8k-token tokenizer of ``examples/quickstart.sh`` (0.5 M), so the all-to-all moves
  ~4x the bytes of the gradient all-reduce between the nodes, as on the paper's models, whose
  GPUs route tens of thousands of tokens per iteration through several MoE layers;
* sequence 512 and the 8k vocabulary give each token attention and output-layer compute that
  does not shrink with compression, as on the paper's models.

CPU compute is ~100x slower than a GPU (here ~1 s per iteration), so the links are ~100x
slower than the paper's 100-200 Gb/s: 1000 / 250 / 50 Mbit/s put the dense all-to-all at
about 35 / 45 / 70% of the step (``DEFAULT_BANDWIDTHS``).

Honest limits: 4 ranks share 2 cores, so even without a limit the all-to-all timer holds ~30%
of the step (waiting for descheduled ranks and for the CPU-side copies of 50 MB through TCP:
see ``--bandwidth 0``); the experts run on LSH centroids, so LSH also saves expert compute,
which can lift its speedup above the communication-only Amdahl bound; and the machine is
shared, so timings are noisy (interleave with ``--repeats``; read medians).

Per row: ms_per_iter (median after ``--warmup``), a2a_share = moe_a2a / ms_per_iter,
allreduce_share = grad_sync / ms_per_iter, bytes_per_iter (all-to-all fwd + bwd, all ranks),
speedup_vs_dense (dense = compressor none, same bandwidth), amdahl_bound =
1 / ((1 - f) + f c) with f the dense a2a share and c = bytes / dense bytes, and achieved =
speedup / bound.

    .venv/bin/python bench/emulated_cluster.py --quick                 # ~3.5 min, as root
    .venv/bin/python bench/emulated_cluster.py --repeats 2 --iters 5   # ~20 min: 1000/250/50
    .venv/bin/python bench/emulated_cluster.py --compressors none lsh 'lsh-m2=--moe-a2a-compression lsh --moe-lsh-rotation-dim 2'
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from netns import EmulatedCluster, NetnsError, check_supported  # noqa: E402
from megatron_lsh.training.logger import read_metrics  # noqa: E402

COMPRESSORS: Dict[str, List[str]] = {
    "none": ["--moe-a2a-compression", "none"],
    "lsh": ["--moe-a2a-compression", "lsh", "--moe-lsh-compensation", "residual"],
    "lsh-nocomp": ["--moe-a2a-compression", "lsh", "--moe-lsh-no-compensation"],
    "lsh-target-0.1": ["--moe-a2a-compression", "lsh", "--moe-lsh-target-rate", "0.1",
                       "--moe-lsh-num-hashes", "0", "--moe-lsh-compensation", "scaled"],
    "cast-bf16": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "bf16"],
    "cast-fp8": ["--moe-a2a-compression", "cast", "--moe-cast-dtype", "fp8"],
}
DENSE = "none"
MODELS: Dict[str, dict] = {
    "gpt": {"script": "pretrain_gpt_moe.py", "flags": [
        "--model-recipe", "tiny-gpt-moe", "--num-layers", "4", "--hidden-size", "64",
        "--ffn-hidden-size", "512", "--num-attention-heads", "4", "--seq-length", "512",
        "--max-position-embeddings", "512", "--num-experts", "{experts}", "--moe-layer-freq", "1",
        "--moe-router-topk", "2", "--micro-batch-size", "4",
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0"]},
    # Swin-MoE on 32 px digits (tools/make_image_data.py), MoE in every block so the expert
    # all-to-all carries the traffic, as on Swin-MoE-L (~70% of its step, the paper says):
    # 4 blocks of 256 / 64 tokens per image, 64 images per rank, 8 experts of 4x width.
    "swin": {"script": "pretrain_swin_moe.py", "flags": [
        "--model-recipe", "tiny-swin-moe", "--patch-dim", "2", "--window-size", "4",
        "--hidden-size", "64", "--swin-num-heads", "2,4", "--num-experts", "{experts}",
        "--moe-layer-freq", "1", "--micro-batch-size", "64", "--crop-min-scale", "0.6",
        "--no-hflip"], "images": True},
}
DEFAULT_BANDWIDTHS = [1000.0, 250.0, 50.0]
QUICK_BANDWIDTH = 100.0


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(f"[emulated_cluster] {msg}", file=sys.stderr, flush=True)


def parse_compressors(specs: List[str]) -> Dict[str, List[str]]:
    """Known names, or ``name=flags...`` for a new flag set; ``none`` is always included."""
    out: Dict[str, List[str]] = {}
    for spec in specs:
        if "=" in spec:
            name, flags = spec.split("=", 1)
            out[name.strip()] = shlex.split(flags)
        elif spec in COMPRESSORS:
            out[spec] = COMPRESSORS[spec]
        else:
            raise SystemExit(f"error: unknown compressor {spec!r}; known: {', '.join(COMPRESSORS)} "
                             f"(or give name='--flag value ...')")
    return {DENSE: COMPRESSORS[DENSE], **out} if DENSE not in out else out


def ensure_data(data: Path, tok: Path, timeout: float = 900) -> None:
    """Prepare corpus, tokenizer and Megatron .bin/.idx as examples/quickstart.sh does, if missing."""
    py, env = sys.executable, dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    tokenizer = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tok / "vocab.json"),
                 "--merge-file", str(tok / "merges.txt")]
    steps = []
    if not (data / "train.jsonl").exists() or not (data / "valid.jsonl").exists():
        steps.append([py, "tools/prepare_corpus.py", "--output-dir", str(data)])
    if not (tok / "vocab.json").exists() or not (tok / "merges.txt").exists():
        steps.append([py, "tools/train_tokenizer.py", "--input", str(data / "train.jsonl"),
                      "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "8000",
                      "--output-dir", str(tok)])
    for split in ("train", "valid"):
        if not (data / f"{split}_text_document.idx").exists():
            steps.append([py, "tools/preprocess_data.py", "--input", str(data / f"{split}.jsonl"),
                          "--output-prefix", str(data / split), *tokenizer, "--append-eod",
                          "--workers", "2"])
    for cmd in steps:
        log("preparing data: " + " ".join(cmd[1:3]))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(cmd[1:2])} failed: {proc.stderr.strip()[-500:]}")


def trainer_argv(args: argparse.Namespace, model: str, flags: List[str], metrics: Path) -> List[str]:
    """The trainer's flags for one run (model shape, data, schedule, compressor, timers)."""
    data, tok = Path(args.data_dir), Path(args.tokenizer_dir)
    shape = [f.format(experts=2 * args.nproc) for f in MODELS[model]["flags"]]
    if MODELS[model].get("images"):
        inputs = ["--data-path", str(args.image_dir)]
    else:
        inputs = ["--train-data-path", str(data / "train_text_document"),
                  "--valid-data-path", str(data / "valid_text_document"),
                  "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tok / "vocab.json"),
                  "--merge-file", str(tok / "merges.txt"),
                  "--data-cache-path", str(Path(args.out) / "index-cache")]
    return [str(Path(args.code_dir) / MODELS[model]["script"]), *shape, *shlex.split(args.model_flags),
            "--expert-model-parallel-size", str(args.nproc), *inputs,
            "--train-iters", str(args.warmup + args.iters), "--lr", "1e-3",
            "--lr-warmup-iters", str(min(2, args.warmup + args.iters - 1)),
            "--eval-interval", "1000000", "--eval-iters", "0", "--log-interval", "1000000",
            "--seed", "1234", "--metrics-jsonl", str(metrics), "--timing-log-level", "1",
            "--distributed-backend", "gloo", *flags]


def launch(cluster: EmulatedCluster, argv: List[str], run_dir: Path, *, nproc: int, port: int,
           timeout: float, code_dir: Path) -> List[Path]:
    """Run ``argv`` (a script and its flags) under torchrun on every node of ``cluster``.

    One torchrun per node namespace (``nproc / nodes`` ranks each, rendezvous at node 0),
    gloo pointed at the node's NIC; returns the node logs. Kills every process on timeout or
    when a node fails, and raises one error with the end of node 0's log.
    """
    per_node = nproc // len(cluster.nodes)
    procs, logs, files = [], [], []
    for node in cluster.nodes:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code_dir),
                   GLOO_SOCKET_IFNAME=node.ifname)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(cluster.nodes)),
               "--node-rank", str(node.index), "--nproc-per-node", str(per_node),
               "--master-addr", cluster.nodes[0].address, "--master-port", str(port), *argv]
        logs.append(run_dir / f"node{node.index}.log")
        files.append(open(logs[-1], "w"))
        procs.append(cluster.popen(node.index, cmd, cwd=code_dir, env=env, stdout=files[-1],
                                   stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        cluster.kill_processes(grace_s=3.0)
        for f in files:
            f.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * len(procs):
        tail = logs[0].read_text(errors="replace").strip().splitlines()[-15:]
        what = "timed out" if time.monotonic() > deadline else f"exited {codes}"
        raise RuntimeError(f"the run in {run_dir} {what}; node0 log ends:\n" + "\n".join(tail))
    return logs


def run_one(cluster: EmulatedCluster, args: argparse.Namespace, model: str, name: str,
            flags: List[str], bandwidth: float, rep: int, port: int) -> tuple:
    """One training run on the cluster: its metrics rows after the warm-up, and link counters."""
    run_dir = Path(args.out) / "runs" / f"{model}-{name}-{bandwidth:g}mbit-r{rep}"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    cluster.set_bandwidth(bandwidth or None)
    before = cluster.link_stats()
    launch(cluster, trainer_argv(args, model, flags, metrics), run_dir, nproc=args.nproc,
           port=port, timeout=args.run_timeout, code_dir=Path(args.code_dir))
    after = cluster.link_stats()
    rows = read_metrics(str(metrics))   # iteration records (not validation)
    link = {k: after[k] - before[k] for k in after}
    return [r for r in rows if r["iteration"] > args.warmup], link


def summarize(model: str, name: str, bandwidth: float, rows: List[dict]) -> dict:
    """Medians over the measured iterations of one row (all repeats pooled)."""
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    ms = med([r["ms_per_iter"] for r in rows])
    timer = lambda k: med([r["timers"][k] for r in rows])  # noqa: E731
    bytes_ = med([sum(l["bytes_fwd"] + l["bytes_bwd"] for l in r["moe"]) for r in rows])
    rates = [l["compression_rate"] for r in rows for l in r["moe"]]
    return {"model": model, "compressor": name, "bandwidth_mbit": float(bandwidth),
            "ms_per_iter": ms, "a2a_share": timer("moe_a2a") / ms,
            "allreduce_share": timer("grad_sync") / ms, "bytes_per_iter": int(bytes_),
            "compression_rate": sum(rates) / max(len(rates), 1),
            "moe_a2a_ms": timer("moe_a2a"), "grad_sync_ms": timer("grad_sync"),
            "compression_ms": timer("moe_compression"), "experts_ms": timer("moe_experts"),
            "forward_backward_ms": timer("forward_backward"),
            "iterations": len(rows)}


def add_speedups(table: List[dict]) -> None:
    """speedup_vs_dense, amdahl_bound and bound_achieved against the dense row of each group."""
    dense = {(t["model"], t["bandwidth_mbit"]): t for t in table if t["compressor"] == DENSE}
    for t in table:
        d = dense[(t["model"], t["bandwidth_mbit"])]
        f, c = d["a2a_share"], t["bytes_per_iter"] / max(d["bytes_per_iter"], 1)
        t["speedup_vs_dense"] = d["ms_per_iter"] / t["ms_per_iter"]
        t["byte_ratio"] = c
        t["amdahl_bound"] = 1.0 / ((1.0 - f) + f * c)
        t["bound_achieved"] = t["speedup_vs_dense"] / t["amdahl_bound"]


def print_table(table: List[dict], file=sys.stdout) -> None:
    """The human-readable table."""
    head = (f"{'model':5s} {'compressor':11s} {'Mbit/s':>7s} {'ms/iter':>8s} {'a2a%':>5s} "
            f"{'ar%':>4s} {'exp ms':>6s} {'cmp ms':>6s} {'a2a MB/it':>9s} {'rate':>5s} {'speedup':>7s} "
            f"{'bound':>6s} {'achvd':>6s}")
    print(head, file=file)
    for t in table:
        bw = "inf" if not t["bandwidth_mbit"] else f"{t['bandwidth_mbit']:g}"
        print(f"{t['model']:5s} {t['compressor']:11s} {bw:>7s} {t['ms_per_iter']:8.1f} "
              f"{100 * t['a2a_share']:5.1f} {100 * t['allreduce_share']:4.1f} "
              f"{t['experts_ms']:6.0f} {t['compression_ms']:6.1f} {t['bytes_per_iter'] / 1e6:9.2f} "
              f"{t['compression_rate']:5.3f} {t['speedup_vs_dense']:6.2f}x {t['amdahl_bound']:5.2f}x "
              f"{100 * t['bound_achieved']:5.0f}%", file=file)


def plot(table: List[dict], path: Path) -> Optional[str]:
    """Stacked step time per row and speedup vs Amdahl bound; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [f"{t['compressor']}\n{t['bandwidth_mbit']:g}" if t["bandwidth_mbit"] else
              f"{t['compressor']}\ninf" for t in table]
    x = range(len(table))
    a2a = [t["moe_a2a_ms"] for t in table]
    ar = [t["grad_sync_ms"] for t in table]
    rest = [max(0.0, t["ms_per_iter"] - a - g) for t, a, g in zip(table, a2a, ar)]
    ax1.bar(x, a2a, label="moe all-to-all")
    ax1.bar(x, ar, bottom=a2a, label="grad all-reduce wait")
    ax1.bar(x, rest, bottom=[a + g for a, g in zip(a2a, ar)], label="rest (compute, optimizer)")
    ax1.set_xticks(list(x), labels, fontsize=6, rotation=90)
    ax1.set(ylabel="ms per iteration (median)", title="step time by stage (compressor / Mbit/s)")
    ax1.legend(fontsize=7)
    for name in dict.fromkeys(t["compressor"] for t in table if t["compressor"] != DENSE):
        share = {(d["model"], d["bandwidth_mbit"]): d["a2a_share"] for d in table if d["compressor"] == DENSE}
        rows = sorted((t for t in table if t["compressor"] == name),
                      key=lambda t: share[(t["model"], t["bandwidth_mbit"])])
        f = [share[(t["model"], t["bandwidth_mbit"])] for t in rows]
        line, = ax2.plot(f, [t["speedup_vs_dense"] for t in rows], "o-", label=f"{name} measured")
        ax2.plot(f, [t["amdahl_bound"] for t in rows], "x--", color=line.get_color(), alpha=0.6,
                 label=f"{name} Amdahl bound")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xlabel="dense all-to-all share of the step", ylabel="speedup vs none",
            title="per-iteration speedup")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def main(argv: Optional[List[str]] = None) -> int:
    """Parse flags, build the cluster, run every row interleaved, report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--nproc", type=int, default=4, help="ranks in all (EP = nproc)")
    p.add_argument("--bandwidth", type=float, nargs="+", help="Mbit/s per NIC and direction; 0: unlimited")
    p.add_argument("--iters", type=int, default=10, help="measured iterations per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every row")
    p.add_argument("--model", choices=sorted(MODELS), default="gpt")
    p.add_argument("--model-flags", default="", help="extra trainer flags (override the model's)")
    p.add_argument("--compressors", nargs="+", default=list(COMPRESSORS),
                   help=f"names ({', '.join(COMPRESSORS)}) or name='--flags ...'")
    p.add_argument("--out", default=str(REPO / "bench/out/emulated_cluster"))
    p.add_argument("--data-dir", default=str(REPO / "data/shakespeare"))
    p.add_argument("--tokenizer-dir", default=str(REPO / "data/tokenizer"))
    p.add_argument("--image-dir", default=str(REPO / "data/digits"),
                   help="--model swin: tools/make_image_data.py's output")
    p.add_argument("--code-dir", default=str(REPO),
                   help="checkout whose trainer runs (e.g. a snapshot while the library is being edited)")
    p.add_argument("--queue-ms", type=float, default=200.0,
                   help="tbf latency: the longest a packet may queue at a NIC before it is dropped")
    p.add_argument("--slow-start-after-idle", type=int, choices=[0, 1], default=None,
                   help="set net.ipv4.tcp_slow_start_after_idle in the node namespaces (kernel default 1)")
    p.add_argument("--run-timeout", type=float,
                   help="seconds per training run (default 120 + 30 per iteration)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_BANDWIDTH:g} Mbit/s, few iterations")
    p.add_argument("--json", action="store_true", help="print only the rows as JSON on stdout")
    args = p.parse_args(argv)
    if args.quick:
        args.bandwidth = args.bandwidth or [QUICK_BANDWIDTH]
        args.iters, args.warmup, args.repeats = min(args.iters, 6), min(args.warmup, 2), 1
    args.bandwidth = args.bandwidth or DEFAULT_BANDWIDTHS
    args.run_timeout = args.run_timeout or 120.0 + 30.0 * (args.iters + args.warmup)
    for key in ("out", "data_dir", "tokenizer_dir", "code_dir", "image_dir"):  # runs in code_dir
        setattr(args, key, os.path.abspath(getattr(args, key)))
    if args.nproc % args.nodes:
        raise SystemExit(f"error: --nproc {args.nproc} is not a multiple of --nodes {args.nodes}")
    compressors = parse_compressors(args.compressors)
    try:
        check_supported()
    except NetnsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if MODELS[args.model].get("images"):
        if not (Path(args.image_dir) / "train").is_dir():
            raise SystemExit(f"error: {args.image_dir}/train is missing: run python "
                             f"tools/make_image_data.py --output-dir {args.image_dir}")
    else:
        ensure_data(Path(args.data_dir), Path(args.tokenizer_dir))
    samples: Dict[tuple, List[dict]] = {}
    links: Dict[tuple, List[dict]] = {}
    start, port = time.monotonic(), 29400 + os.getpid() % 1000
    try:
        with EmulatedCluster(args.nodes, latency_ms=args.queue_ms,
                             tcp_slow_start_after_idle=args.slow_start_after_idle) as cluster:
            total = args.repeats * len(args.bandwidth) * len(compressors)
            done = 0
            for rep in range(args.repeats):
                for bw in args.bandwidth:
                    for name, flags in compressors.items():
                        done += 1
                        log(f"[{done}/{total}] {args.model} {name} at "
                            f"{'unlimited' if not bw else f'{bw:g} Mbit/s'} (repeat {rep + 1}) ...")
                        port += 1
                        rows, link = run_one(cluster, args, args.model, name, flags, bw, rep, port)
                        samples.setdefault((bw, name), []).extend(rows)
                        links.setdefault((bw, name), []).append(link)
                        log(f"    median {statistics.median(r['ms_per_iter'] for r in rows):.0f} ms/iter"
                            f" ({time.monotonic() - start:.0f} s so far)")
    except NetnsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the trainers were stopped and the namespaces deleted", file=sys.stderr)
        return 130
    table = [summarize(args.model, name, bw, samples[(bw, name)])
             for bw in args.bandwidth for name in compressors]
    for t in table:
        runs = links[(t["bandwidth_mbit"], t["compressor"])]
        t["link_dropped_per_run"] = statistics.median(r["dropped"] for r in runs)
        t["link_bytes_per_run"] = statistics.median(r["bytes"] for r in runs)
    add_speedups(table)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nodes": args.nodes, "nproc": args.nproc,
            "iters": args.iters, "warmup": args.warmup, "repeats": args.repeats,
            "compressors": compressors, "model_flags": MODELS[args.model]["flags"] + shlex.split(args.model_flags),
            "cpus": os.cpu_count(), "wall_s": time.monotonic() - start}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=1))
    png = plot(table, out / "emulated_cluster.png")
    if args.json:
        keys = ("model", "compressor", "bandwidth_mbit", "ms_per_iter", "a2a_share", "allreduce_share",
                "bytes_per_iter", "speedup_vs_dense", "amdahl_bound")
        print(json.dumps({"rows": [{k: t[k] for k in keys} for t in table]}))
    else:
        print_table(table)
        print(f"\n{args.nproc} ranks on {args.nodes} nodes, medians of {args.iters} iterations x "
              f"{args.repeats} repeat(s) after {args.warmup} warm-up; results: {out / 'results.json'}"
              + (f", plot: {png}" if png else ""))
    log(f"done in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
