"""Real Megatron-core all-to-all MoE layer vs our MoE layer (compression ``none``), on CPU.

The "peer" configuration of ``bench/moe_layer.py --peer``: hidden 256, ffn 1024, 8 experts,
top-2, gelu, no biases, fp32, expert-parallel size 2 on 2 gloo processes, 2048 tokens per rank
(Shakespeare text states, as there). Both layers live in the same processes and run
interleaved (A B A B ...) after a warm-up; each repetition is timed as forward + backward
(``(y * w).sum().backward()``), the slowest rank of each repetition counts, and the table gives
the median and the 10th-90th percentiles over repetitions.

Megatron-core is NOT a dependency of this project. Set up a separate virtual environment
(never install it into the project's ``.venv``; keep the CPU torch wheel installed first so
that pip never pulls a CUDA torch)::

    python3 -m venv /tmp/mcore-venv
    /tmp/mcore-venv/bin/pip install torch==2.13.0            # the local CPU wheel
    /tmp/mcore-venv/bin/pip install --no-deps --ignore-requires-python megatron-core==0.19.2
    /tmp/mcore-venv/bin/pip install numpy packaging regex    # what the import actually needs

(megatron-core 0.17+ declares Requires-Python >= 3.12 but PyPI also ships a cp311 wheel;
``--ignore-requires-python`` installs it on Python 3.11, and it imports and runs there. On
Python 3.11 without the flag pip picks 0.16.1, which this script also runs, with patch 5.)

Then, from the repository root (our package comes from PYTHONPATH; its C++ extension is not
needed)::

    PYTHONPATH=. /tmp/mcore-venv/bin/python bench/megatron_peer.py --repeats 30
    PYTHONPATH=. /tmp/mcore-venv/bin/python bench/megatron_peer.py --repeats 30 --reimpl

If ``megatron.core`` cannot be imported, the script prints why and exits 0 (skipped).

Megatron-core assumes CUDA in a few places on this path; these are patched inside this
script's processes only (the installed files are not modified), see ``patch_for_cpu``:

1. ``megatron.core.transformer.moe.ops.paged_stash`` (0.18+) imports ``triton`` at module
   level for its CUDA paged-stash kernels (off by default); a stand-in module is put in
   ``sys.modules`` so that ``import megatron.core`` does not need triton.
2. ``torch.cuda.Stream``, ``torch.cuda.current_stream`` and ``torch.cuda.stream``: the
   all-to-all dispatcher creates a device-to-host copy stream and records an event on it, even
   when every tensor is already on the CPU; they become a no-op stream / event / context.
3. ``torch.cuda.current_device()`` returns ``"cpu"``: ``Router.gating`` moves a CPU router
   weight "to the GPU" with ``.to(device=torch.cuda.current_device())`` on every forward; on
   the CPU that becomes a no-op ``.to("cpu")``.
4. ``token_dispatcher.maybe_move_tensor_to_cpu``: the dispatcher turns the all-to-all split
   sizes into numpy arrays only when they are CUDA tensors; CPU split tensors stayed torch
   tensors, which ``ProcessGroup.all_to_all_single`` (torch 2.13) rejects. The wrapper also
   returns ``.numpy()`` for a CPU tensor when ``as_numpy=True`` -- what the GPU path gets.
5. 0.16.x only: ``moe_utils.router_gating_linear`` reads a module global ``te_general_gemm``
   that is never defined when Transformer Engine is not installed (NameError); it is set to
   ``None`` (what 0.17+ does), which selects the plain torch matmul.

Everything else is Megatron-core's own code: ``parallel_state.initialize_model_parallel``
(expert_model_parallel_size=2) on the gloo default group, ``MoELayer`` built from
``get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)`` (TopKRouter,
``MoEAlltoAllTokenDispatcher``, ``SequentialMLP`` of ``ColumnParallelLinear`` /
``RowParallelLinear``), ``use_cpu_initialization=True``, ``moe_permute_fusion=False``.
Megatron-core's expert weights are copied from ours, so the two layers compute the same
function; the script reports the max abs difference of their outputs and input gradients.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from megatron_lsh.config import MoEConfig  # noqa: E402
from megatron_lsh.moe import MoELayer  # noqa: E402
from megatron_lsh.moe.text_states import text_states  # noqa: E402
from megatron_lsh.parallel.dims import ParallelDims, ProcessGroups  # noqa: E402
from megatron_lsh.parallel.spawn import run_distributed  # noqa: E402


# -- CPU patches for Megatron-core ----------------------------------------------------------

class _NoStream:
    """Stands in for torch.cuda.Stream / Event on a CPU-only torch."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return self

    def synchronize(self):
        pass

    def query(self):
        return True


_CURRENT = _NoStream()


def patch_for_cpu() -> list:
    """Apply the CPU patches listed in the module docstring; returns their descriptions."""
    applied = []
    name = "megatron.core.transformer.moe.ops.paged_stash"
    try:
        import triton  # noqa: F401
    except ImportError:
        spec = importlib.util.find_spec("megatron")
        exists = spec is not None and any(
            os.path.exists(os.path.join(d, "core", "transformer", "moe", "ops", "paged_stash.py"))
            for d in (spec.submodule_search_locations or ()))
        if exists and name not in sys.modules:
            stub = types.ModuleType(name)
            stub.GLOBAL_BLOCK_SIZE = 1024

            def _cuda_only(*args, **kwargs):
                raise RuntimeError("paged-stash triton kernels are CUDA-only")

            stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = _cuda_only
            stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel",
                            "paged_stash_pop_kernel"]
            sys.modules[name] = stub
            applied.append(f"sys.modules[{name!r}] = stand-in (no triton)")
    if not torch.cuda.is_available():
        torch.cuda.Stream = _NoStream
        torch.cuda.current_stream = lambda *a, **k: _CURRENT
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
        applied.append("torch.cuda.Stream / current_stream / stream -> no-op stream, event, "
                       "context")
        torch.cuda.current_device = lambda: "cpu"
        applied.append("torch.cuda.current_device() -> 'cpu'")
        try:
            from megatron.core.transformer.moe import token_dispatcher
        except Exception:  # noqa: BLE001 - megatron_version() reports import failures
            return applied
        original = token_dispatcher.maybe_move_tensor_to_cpu
        if not getattr(original, "_cpu_patched", False):
            def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
                if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                    return tensor.numpy()
                return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

            maybe_move_tensor_to_cpu._cpu_patched = True
            token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
        applied.append("token_dispatcher.maybe_move_tensor_to_cpu(t, as_numpy=True) returns "
                       "t.numpy() for a CPU tensor too")
        from megatron.core.transformer.moe import moe_utils
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
            applied.append("moe_utils.te_general_gemm = None (0.16.x without Transformer Engine)")
    return applied


def megatron_version() -> str | None:
    """megatron-core's version, or None (with the reason printed) when it cannot be imported."""
    patch_for_cpu()
    try:
        import megatron.core as mcore
        from megatron.core.transformer.moe.moe_layer import MoELayer as _  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip
        print(f"SKIPPED: megatron-core is not importable here ({type(exc).__name__}: {exc}).\n"
              f"Set up the separate venv described at the top of {__file__}.")
        return None
    return getattr(mcore, "__version__", "unknown")


# -- worker ---------------------------------------------------------------------------------

def build_megatron_layer(args, world):
    """Megatron-core's MoELayer (alltoall dispatcher, SequentialMLP) on EP=world."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    config = TransformerConfig(
        num_layers=1, hidden_size=args["hidden"], num_attention_heads=4,
        ffn_hidden_size=args["ffn"], moe_ffn_hidden_size=args["ffn"],
        num_moe_experts=args["experts"], moe_router_topk=args["topk"],
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_permute_fusion=False, add_bias_linear=False, gated_linear_unit=False,
        activation_func=torch.nn.functional.gelu, bias_activation_fusion=False,
        gradient_accumulation_fusion=False, use_cpu_initialization=True,
        params_dtype=torch.float32, expert_model_parallel_size=world,
        **{k: False for k in ("moe_router_fusion",) if _has_field(k)})
    spec = get_gpt_layer_local_spec(num_experts=args["experts"], moe_grouped_gemm=False)
    mlp = spec.submodules.mlp
    if hasattr(mlp, "module"):                    # a ModuleSpec (megatron-core <= 0.16)
        return build_module(mlp, config=config)
    return mlp(config=config)                     # a builder (functools.partial, 0.17+)


def _has_field(name: str) -> bool:
    from megatron.core.transformer.transformer_config import TransformerConfig
    return name in TransformerConfig.__dataclass_fields__


def copy_weights(ours, theirs) -> None:
    """Make Megatron-core's layer compute our layer's function (router + local experts)."""
    with torch.no_grad():
        theirs.router.weight.copy_(ours.router.weight)
        for i, expert in enumerate(theirs.experts.local_experts):
            expert.linear_fc1.weight.copy_(ours.experts.fc1_weight[i].t())
            expert.linear_fc2.weight.copy_(ours.experts.fc2_weight[i].t())


def worker(rank, world, args, states_path):
    """One rank: both layers interleaved, timed; output / gradient agreement."""
    torch.set_num_threads(1)
    patches = patch_for_cpu()
    torch.manual_seed(0)
    x_TH = torch.load(states_path)[rank * args["tokens"]:(rank + 1) * args["tokens"]].clone()
    groups = ProcessGroups.build(ParallelDims(world, ep=world), rank)
    ours = MoELayer(MoEConfig(num_experts=args["experts"], router_topk=args["topk"],
                              aux_loss_coeff=0.0, a2a_compression="none"),
                    args["hidden"], args["ffn"], groups, add_bias=False, seed=1234)
    theirs = build_megatron_layer(args, world)
    copy_weights(ours, theirs)
    weights = torch.randn(x_TH.shape, generator=torch.Generator().manual_seed(rank))

    def run_ours(x):
        y, _ = ours(x)
        return y

    def run_theirs(x):
        y, _ = theirs(x.unsqueeze(1))             # Megatron-core wants [S, B, H]
        return y.squeeze(1)

    variants = [("ours none", ours, run_ours), ("megatron-core alltoall", theirs, run_theirs)]
    if args["reimpl"]:                              # bench/moe_layer.py's --peer comparison row
        from megatron_lsh.moe.dispatcher import AllToAllDispatcher
        from moe_layer import MegatronStyleDispatcher
        own_dispatcher = ours.dispatcher
        reimpl_dispatcher = MegatronStyleDispatcher(args["experts"], groups.ep)

        def with_dispatcher(dispatcher):
            def run(x):
                ours.dispatcher = dispatcher
                try:
                    return run_ours(x)
                finally:
                    ours.dispatcher = own_dispatcher
            return run

        assert isinstance(own_dispatcher, AllToAllDispatcher)
        variants.append(("re-impl (moe_layer.py)", ours, with_dispatcher(reimpl_dispatcher)))

    def step(module, fn):
        module.zero_grad(set_to_none=True)
        x = x_TH.clone().requires_grad_()
        dist.barrier()
        start = time.perf_counter()
        y = fn(x)
        (y * weights).sum().backward()
        return 1e3 * (time.perf_counter() - start), y.detach(), x.grad

    times = {label: [] for label, _, _ in variants}
    first = {}
    for rep in range(args["repeats"] + 1):          # rep 0 is the warm-up
        for label, module, fn in variants:
            elapsed, y, gx = step(module, fn)
            if rep == 0:
                first[label] = (y, gx)
                continue
            slowest = torch.tensor([elapsed])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[label].append(float(slowest))
    (y0, g0), (y1, g1) = first["ours none"], first["megatron-core alltoall"]
    import megatron.core as mcore
    return dict(times=times, max_abs_dy=float((y0 - y1).abs().max()),
                max_abs_dx=float((g0 - g1).abs().max()), patches=patches,
                versions=dict(torch=torch.__version__,
                              megatron_core=getattr(mcore, "__version__", "?"),
                              python=sys.version.split()[0]),
                modules=dict(dispatcher=type(theirs.token_dispatcher).__name__,
                             experts=type(theirs.experts).__name__,
                             router=type(theirs.router).__name__))


# -- report ---------------------------------------------------------------------------------

def percentile(values, q):
    """Linear-interpolated percentile (q in [0, 100])."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--corpus", help="text file or folder of .txt files")
    parser.add_argument("--reimpl", action="store_true",
                        help="add a third row: bench/moe_layer.py's re-implementation of "
                             "Megatron-core's dispatcher on our router and experts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=1800)
    a = parser.parse_args(argv)
    version = megatron_version()
    if version is None:
        return None
    args = dict(vars(a))
    from moe_layer import find_corpus                 # bench/moe_layer.py
    states = text_states(find_corpus(a.corpus), a.hidden, a.world * a.tokens)
    with tempfile.TemporaryDirectory(prefix="megatron_peer_") as tmp:
        path = os.path.join(tmp, "states.pt")
        torch.save(states, path)
        per_rank = run_distributed(worker, a.world, args, path, timeout=a.timeout)
    times = per_rank[0]["times"]
    rows = [dict(label=label, ms_median=round(statistics.median(v), 1),
                 ms_p10=round(percentile(v, 10), 1), ms_p90=round(percentile(v, 90), 1),
                 n=len(v)) for label, v in times.items()]
    report = dict(config=args, rows=rows, versions=per_rank[0]["versions"],
                  megatron_modules=per_rank[0]["modules"],
                  patches=per_rank[0]["patches"],
                  max_abs_diff_output=max(r["max_abs_dy"] for r in per_rank),
                  max_abs_diff_input_grad=max(r["max_abs_dx"] for r in per_rank))
    if a.json:
        print(json.dumps(report))
        return report
    print(f"versions: {report['versions']}")
    print(f"megatron-core modules: {report['megatron_modules']}")
    print(f"config: {args}")
    print(f"{'layer':<24} {'ms fwd+bwd median':>18} {'p10':>8} {'p90':>8} {'n':>4}")
    for r in rows:
        print(f"{r['label']:<24} {r['ms_median']:>18.1f} {r['ms_p10']:>8.1f} "
              f"{r['ms_p90']:>8.1f} {r['n']:>4}")
    print(f"max |y_ours - y_mcore| = {report['max_abs_diff_output']:.3g}, "
          f"max |dx_ours - dx_mcore| = {report['max_abs_diff_input_grad']:.3g}")
    print("patches: " + "; ".join(report["patches"]))
    return report


if __name__ == "__main__":
    main()
