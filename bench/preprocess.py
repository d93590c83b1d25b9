#!/usr/bin/env python
"""Benchmark the data pipeline: preprocessing throughput and memory, and GPT index build time.

1. ``tools/preprocess_data.py`` (GPT-2 BPE, --append-eod) with 1 and 2 workers on the default
   corpus (the Shakespeare train split) and on synthetic JSONL 10x and 100x larger (documents
   of 2-40 KB cut from the corpus lines, shuffled with a seed). For each run: documents/s, MB/s
   and the peak RSS of the main process and of all its processes together (sampled every
   50 ms with psutil). Peak RSS should stay flat as the corpus grows 100x. Settings alternate
   (1, 2, 1, 2 workers...) and medians are reported: the machine may be shared.
2. The time to build the GPT sample index (doc_idx, sample_idx, shuffle_idx) for a synthetic
   corpus of 1 billion tokens (document lengths only; no tokens exist), with the C++ helper
   and with the numpy reference.

    python bench/preprocess.py                       # all of it (the 100x runs take minutes)
    python bench/preprocess.py --scales 1 10 --json bench/out/preprocess.json

Prints a table; writes bench/out/preprocess.png when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, REPO)


def ensure_corpus(path: str) -> str:
    """The default corpus train split, prepared with tools/prepare_corpus.py when missing."""
    if not os.path.isfile(path):
        out_dir = os.path.dirname(path)
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "prepare_corpus.py"),
                        "--output-dir", out_dir, "--cache-dir", os.path.join(REPO, "cache")], check=True)
    return path


def ensure_tokenizer(corpus: str, out_dir: str, vocab_size: int):
    """vocab.json / merges.txt trained on the corpus (reused when present)."""
    vocab, merges = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                        "--vocab-size", str(vocab_size), "--output-dir", out_dir], check=True)
    return vocab, merges


def make_synthetic(corpus: str, scale: int, path: str, seed: int = 0) -> str:
    """JSONL ``scale`` times the corpus size: documents of 2-40 KB of consecutive corpus lines."""
    target = scale * os.path.getsize(corpus)
    if os.path.isfile(path) and abs(os.path.getsize(path) - target) < 0.02 * target:
        return path
    docs = [json.loads(line)["text"].split("\n") for line in open(corpus, encoding="utf-8")]
    rng = np.random.default_rng(seed)
    written = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            lines = docs[int(rng.integers(len(docs)))]
            want = int(rng.integers(2_000, 40_000))
            start = int(rng.integers(len(lines)))
            chunk, size, i = [], 0, start
            while size < want:
                chunk.append(lines[i % len(lines)])
                size += len(chunk[-1]) + 1
                i += 1
            line = json.dumps({"text": "\n".join(chunk)}) + "\n"
            f.write(line)
            written += len(line)
    os.replace(tmp, path)
    return path


def run_preprocess(jsonl: str, prefix: str, vocab: str, merges: str, workers: int) -> dict:
    """Run the tool once; wall time and peak RSS (main process, and all processes summed)."""
    import psutil

    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", jsonl,
           "--output-prefix", prefix, "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
           "--merge-file", merges, "--append-eod", "--workers", str(workers), "--log-interval", "100000000"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_total = 0
    while proc.poll() is None:
        try:
            main_rss = ps.memory_info().rss
            total = main_rss
            for child in ps.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    pass
            peak_main, peak_total = max(peak_main, main_rss), max(peak_total, total)
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"preprocess_data.py failed:\n{output}")
    documents = sum(1 for _ in open(jsonl, "rb"))
    size = os.path.getsize(jsonl)
    tokens = os.path.getsize(prefix + "_text_document.bin") // 2
    for suffix in (".bin", ".idx"):
        os.remove(prefix + "_text_document" + suffix)
    return {"documents": documents, "mb": size / 1e6, "tokens": tokens, "seconds": seconds,
            "docs_per_s": documents / seconds, "mb_per_s": size / 1e6 / seconds,
            "peak_rss_main_mb": peak_main / 2 ** 20, "peak_rss_total_mb": peak_total / 2 ** 20}


def summarize(runs) -> dict:
    """Median time and rates over repeated runs, the largest peak RSS, and the rate range."""
    out = dict(runs[0])
    out["seconds"] = float(np.median([r["seconds"] for r in runs]))
    out["docs_per_s"] = out["documents"] / out["seconds"]
    out["mb_per_s"] = out["mb"] / out["seconds"]
    out["mb_per_s_min"] = min(r["mb_per_s"] for r in runs)
    out["mb_per_s_max"] = max(r["mb_per_s"] for r in runs)
    out["peak_rss_main_mb"] = max(r["peak_rss_main_mb"] for r in runs)
    out["peak_rss_total_mb"] = max(r["peak_rss_total_mb"] for r in runs)
    out["repeats"] = len(runs)
    return out


def bench_index(total_tokens: int, seq_length: int, seed: int = 0) -> dict:
    """Seconds to build doc_idx, sample_idx (C++ and numpy) and shuffle_idx for one epoch."""
    from megatron_lsh.data import helpers, helpers_ref

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 2048, size=int(total_tokens / 1024 * 1.05), dtype=np.int32)
    cut = int(np.searchsorted(np.cumsum(sizes, dtype=np.int64), total_tokens)) + 1
    sizes = np.ascontiguousarray(sizes[:cut])
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // seq_length
    out = {"tokens": tokens, "documents": len(sizes), "seq_length": seq_length, "samples": num_samples}
    t = time.perf_counter()
    doc_idx = np.random.RandomState(seed).permutation(len(sizes)).astype(np.int64)
    out["doc_idx_s"] = time.perf_counter() - t
    t = time.perf_counter()
    sample_idx = helpers.build_sample_idx(sizes, doc_idx, seq_length, num_samples, use_compiled=True)
    out["sample_idx_cpp_s"] = time.perf_counter() - t
    t = time.perf_counter()
    reference = helpers_ref.build_sample_idx(sizes, doc_idx, seq_length, num_samples)
    out["sample_idx_numpy_s"] = time.perf_counter() - t
    assert np.array_equal(sample_idx, reference)
    t = time.perf_counter()
    np.random.RandomState(seed + 1).permutation(num_samples)
    out["shuffle_idx_s"] = time.perf_counter() - t
    out["total_s"] = out["doc_idx_s"] + out["sample_idx_cpp_s"] + out["shuffle_idx_s"]
    return out


def plot(rows, path: str) -> bool:
    """Throughput and peak RSS against corpus size; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for workers in sorted({r["workers"] for r in rows}):
        mine = [r for r in rows if r["workers"] == workers]
        mb = [r["mb"] for r in mine]
        ax1.plot(mb, [r["mb_per_s"] for r in mine], "o-", label=f"{workers} worker(s)")
        ax2.plot(mb, [r["peak_rss_total_mb"] for r in mine], "o-", label=f"{workers} worker(s), all processes")
        ax2.plot(mb, [r["peak_rss_main_mb"] for r in mine], "x--", label=f"{workers} worker(s), main process")
    for ax, label in ((ax1, "throughput (MB/s)"), (ax2, "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("corpus size (MB)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("preprocess_data.py (GPT-2 BPE, vocab 8k)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(REPO, "data", "shakespeare", "train.jsonl"))
    p.add_argument("--work-dir", default=os.path.join(REPO, "cache", "bench"), help="synthetic corpora and outputs")
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=2, help="runs per setting, interleaved (medians reported)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--index-tokens", type=float, default=1e9)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--plot", default=os.path.join(REPO, "bench", "out", "preprocess.png"))
    args = p.parse_args(argv)

    os.makedirs(args.work_dir, exist_ok=True)
    corpus = ensure_corpus(args.corpus)
    vocab, merges = ensure_tokenizer(corpus, os.path.join(args.work_dir, "tokenizer"), args.vocab_size)
    rows = []
    print(f"{'corpus':>8} {'MB':>8} {'docs':>8} {'workers':>7} {'seconds':>8} {'docs/s':>9} {'MB/s':>7} "
          f"{'MB/s range':>12} {'RSS main':>9} {'RSS all':>8}", flush=True)
    for scale in args.scales:
        jsonl = corpus if scale == 1 else make_synthetic(corpus, scale, os.path.join(args.work_dir, f"synthetic_{scale}x.jsonl"))
        runs = {w: [] for w in args.workers}
        for _ in range(args.repeat):  # A B A B ...: the machine is shared, compare medians
            for workers in args.workers:
                runs[workers].append(run_preprocess(jsonl, os.path.join(args.work_dir, f"out_{scale}x_{workers}w"),
                                                    vocab, merges, workers))
        for workers in args.workers:
            r = summarize(runs[workers])
            r.update(scale=scale, workers=workers)
            rows.append(r)
            spread = f"{r['mb_per_s_min']:.2f}-{r['mb_per_s_max']:.2f}"
            print(f"{str(scale) + 'x':>8} {r['mb']:8.1f} {r['documents']:8d} {workers:7d} {r['seconds']:8.1f} "
                  f"{r['docs_per_s']:9.1f} {r['mb_per_s']:7.2f} {spread:>12} {r['peak_rss_main_mb']:8.0f}M "
                  f"{r['peak_rss_total_mb']:7.0f}M", flush=True)
    index = bench_index(int(args.index_tokens), args.seq_length)
    print(f"\nGPT index for {index['tokens'] / 1e9:.2f}B tokens, {index['documents']} documents, "
          f"seq_length {index['seq_length']} -> {index['samples']} samples:")
    print(f"  doc_idx {index['doc_idx_s']:.3f}s  sample_idx C++ {index['sample_idx_cpp_s']:.3f}s "
          f"(numpy reference {index['sample_idx_numpy_s']:.3f}s)  shuffle_idx {index['shuffle_idx_s']:.3f}s  "
          f"total {index['total_s']:.3f}s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"preprocess": rows, "gpt_index": index}, f, indent=1)
    if rows and plot(rows, args.plot):
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
