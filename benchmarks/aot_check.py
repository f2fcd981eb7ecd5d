"""Ahead-of-time compile check: every Triton kernel variant the ops can launch, compiled for sm_90 and sm_80
on a machine without a GPU, with its registers, spills and shared memory.

How: a worker process (``TRITON_INTERPRET`` unset) installs a fake Triton driver whose target is
``GPTarget("cuda", arch, 32)`` and calls the ops' public functions (forward and backward) on CPU tensors
with the Triton backend forced on. Everything runs the real path (launchers, autotuners with their prune
functions, Triton's JIT specialisation and compiler, ``ptxas``); only the last step is faked: "loading" a
cubin reads its resources with ``cuobjdump -res-usage``, a "launch" records the variant, and the autotuner's
benchmark launches each config its prune function lets through once. So a config counts as *selectable* for a
case exactly when the op's own config selection would time (or pick) it for that case's key, and kernel
signatures can change without touching this file. Outputs are garbage (nothing runs); only compilation counts.

A variant is *launchable* on an arch when its dynamic shared memory fits the opt-in maximum (232448 bytes on
sm_90, 166912 on sm_80), its threads are at most 1024 and registers x threads at most 65536. It *fails* when
it is not launchable or spills (local memory per thread > 0, what Triton reports as ``n_spills``).

Usage::

    python -m benchmarks.aot_check                  # the CI subset (every config at its worst case), sm_90 + sm_80
    python -m benchmarks.aot_check --full           # every realistic key (slow: ~10x the subset)
    python -m benchmarks.aot_check --ops attention --arch 90 --sass --no-write   # with SASS instruction counts
    python -m benchmarks.aot_check --dump-sass _attn_fwd_kernel --arch 90 --ops attention   # the SASS itself
    python -m benchmarks.aot_check --arch 90 --sass --no-write --jobs 1 \\
        --case '{"op": "attention", "dtype": "float16", "D": 64, "Tq": 1024, "Tk": 1024, "dropout": false}' \\
        --case '{"op": "attention", "dtype": "float16", "D": 64, "Tq": 1024, "Tk": 1024, "dropout": true}'
        # one key with and without dropout: a table of every variant with its SASS counts
    python -m benchmarks.aot_check --full --ops attention --where D=8,16,32 --where Tq=1024,128 --no-write \
        --only _attn_fwd_kernel:128x64x8x3 --only dkdv:16x16   # a few variants of the full check, in minutes

Writes ``benchmarks/results/aot_sm<arch>.json`` (unless ``--no-write``; ``--full`` writes ``aot_full_sm<arch>``,
``--suffix _triton3.6`` ``aot_sm<arch>_triton3.6``; the Triton version is in the file as ``triton``),
prints the failures and exits 1 when a selectable variant fails. ``--sass`` adds per-variant SASS instruction
counts: ``sass_instr`` (whole kernel), ``loops`` (instructions in each loop body, found as backward branches) and
``sass_per_elem`` (each loop's thread-instructions per BLOCK_M x BLOCK_N tile element; for attention the first
loop is the unmasked one, the hot loop), which compares dropout with no dropout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Opt-in maximum of dynamic shared memory per block, bytes (CUDA's sharedMemPerBlockOptin).
MAX_SHARED = {90: 232448, 80: 166912}
MAX_REGS_PER_BLOCK = 65536
MAX_THREADS = 1024

# ---------------------------------------------------------------------------------------------------------
# Cases: the keys each op is compiled for
# ---------------------------------------------------------------------------------------------------------

DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (8, 16, 32, 48, 64, 80, 96, 128)  # every padding class and power of two in the kernel's 8..128
GPT2_WIDTHS = (768, 1024, 1280, 1600)  # C of GPT-2 small, medium, large, xl


def attention_cases(full: bool) -> list[dict]:
    """Training (Tq = Tk, forward + backward) at a short and a long sequence, and KV-cache decoding (Tq = 1).

    The CI subset compiles every config once per arch at its worst key: fp16 at Tq = Tk = 1024 (every tile passes
    the prune; bf16 compiles to the same code shape) with D = 128 and dropout (the most registers and shared
    memory); plus fp32 (which always takes the smallest tile; fp32 tiles need the most shared memory) and
    decoding (Tq = 1, only the short row tiles) at D = 128. Some limits of ``_CONFIGS`` depend on D (tiles
    dropped at D = 128 come back at D = 64), so D = 64 with and without dropout too, in bf16: the benchmarks' keys
    (``bench_cases``). Some tiles' maxnreg depends on D too (``attention._PTXAS_CHOOSES_REGISTERS``): the largest
    D that keeps the full register budget, with dropout, is each one's worst key with that cap (fp32 at D = 32
    for dkdv's fp32 tile and D = 32 for the forward's 64 x 64, each that tile only: a case's ``only`` works as
    ``--only``; D = 64 for 128 x 64, above; fp32 at D = 64 and 128 are the dkdv tile's uncapped keys).
    ``full`` covers every head size, dtype and length.

    Each training case runs the backward twice: as by default (the 5-matmul backward, whose dk/dv kernel adds dQ
    atomically) and under ``torch.use_deterministic_algorithms`` (the dq kernel, then dk/dv without the atomics):
    ``deterministic=True``, a copy of each training case but the forward-only ones.
    """
    cases = _attention_cases_once(full)
    return [*cases, *(c | {"deterministic": True} for c in cases if _deterministic_copy(c))]


def _deterministic_copy(case: dict) -> bool:
    """Whether an attention case has a backward that the deterministic copy compiles differently."""
    only = case.get("only")
    return case["op"] == "attention" and case["Tq"] > 1 and (not only or any("dkdv" in o or "dq" in o for o in only))


def _attention_cases_once(full: bool) -> list[dict]:
    if not full:
        return [
            dict(op="attention", dtype="float16", D=128, Tq=1024, Tk=1024, dropout=True),
            dict(op="attention", dtype="bfloat16", D=64, Tq=1024, Tk=1024, dropout=False),
            dict(op="attention", dtype="bfloat16", D=64, Tq=1024, Tk=1024, dropout=True),
            dict(
                op="attention", dtype="bfloat16", D=32, Tq=1024, Tk=1024, dropout=True, only=["_attn_fwd_kernel:64x64"]
            ),
            dict(op="attention", dtype="float32", D=128, Tq=1024, Tk=1024, dropout=True),
            dict(op="attention", dtype="float32", D=64, Tq=1024, Tk=1024, dropout=True),
            dict(op="attention", dtype="float32", D=32, Tq=1024, Tk=1024, dropout=True, only=["dkdv:16x16"]),
            dict(op="attention", dtype="float16", D=128, Tq=1, Tk=1024, dropout=False),
            dict(op="attention_dropout_mask", Tq=256, Tk=256),
        ]
    cases = []
    for d in HEAD_DIMS:
        for dtype in DTYPES:
            for dropout in (False, True):
                for tq, tk in ((1024, 1024), (128, 128), (1, 1024)):
                    if dropout and tq == 1:
                        continue  # decoding runs in eval: no dropout
                    cases.append(dict(op="attention", dtype=dtype, D=d, Tq=tq, Tk=tk, dropout=dropout))
    cases.append(dict(op="attention_dropout_mask", Tq=256, Tk=256))
    return cases


def layer_norm_cases(full: bool) -> list[dict]:
    cases = []
    widths = (*GPT2_WIDTHS, 4096, 8192) if full else (768, 1600, 8192)
    for n in widths:
        for dtype in DTYPES if full else ("float16", "float32"):
            for rows in (8192, 1):  # a training batch of tokens; one decoding token
                for residual in (False, True):
                    if not full and rows == 1 and residual:
                        continue
                    cases.append(dict(op="layer_norm", dtype=dtype, N=n, M=rows, residual=residual, bias=True))
    cases.append(dict(op="layer_norm", dtype="float16", N=768, M=8192, residual=False, bias=False))
    return cases


def bias_gelu_cases(full: bool) -> list[dict]:
    cases = []
    for n in tuple(4 * c for c in GPT2_WIDTHS) if full else (3072,):
        for dtype in DTYPES if full else ("float16", "float32"):
            for rows in (8192, 1):
                cases.append(dict(op="bias_gelu", dtype=dtype, N=n, M=rows, bias=True))
    cases.append(dict(op="bias_gelu", dtype="float16", N=3072, M=8192, bias=False))
    return cases


def cross_entropy_cases(full: bool) -> list[dict]:
    # GPT-2's vocabulary; the row kernel's variant depends on V and the dtype, not on C or the token count.
    return [
        dict(op="linear_cross_entropy", dtype=dtype, V=50257, C=64, M=8, grad=grad)
        for dtype in DTYPES
        for grad in (True, False)
    ]


def bench_cases() -> list[dict]:
    """The keys of the benchmark suite's Triton cases (bf16, benchmarks/test_*.py): the GPU check compiles them
    here in parallel first, so that the benchmarks find them in Triton's cache instead of compiling serially."""
    cases = [dict(op="attention", dtype="bfloat16", D=64, Tq=1024, Tk=1024, dropout=p) for p in (False, True)]
    cases += [c | {"deterministic": True} for c in cases]  # the gptkernels_deterministic provider's backward
    for n in (768, 1024, 1600, 4096):
        for residual in (False, True):
            cases.append(dict(op="layer_norm", dtype="bfloat16", N=n, M=16384, residual=residual, bias=True))
    cases += [dict(op="bias_gelu", dtype="bfloat16", N=n, M=16384, bias=True) for n in (3072, 4096, 6400)]
    cases.append(dict(op="linear_cross_entropy", dtype="bfloat16", V=50257, C=64, M=8, grad=True))
    return cases


CASE_SETS = {
    "attention": attention_cases,
    "layer_norm": layer_norm_cases,
    "bias_gelu": bias_gelu_cases,
    "cross_entropy": cross_entropy_cases,
}


# Ops whose kernels are autotuned: every worker runs their cases, each compiling a share of the configs. Only a
# matter of speed: an autotuned op missing here is compiled whole by one worker.
AUTOTUNED_OPS = ("attention",)


def case_key(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


# ---------------------------------------------------------------------------------------------------------
# Worker: the fake driver and the op calls (runs in a subprocess, one arch per process)
# ---------------------------------------------------------------------------------------------------------


def _cuda_tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _res_usage(cubin: bytes, name: str) -> dict:
    """REG, SHARED (static), LOCAL (bytes per thread: spills and stack) of ``name`` in the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    usage, current = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current == name or (current and usage == {}):
            for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line):
                usage[key] = int(value)
    return usage


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _sass(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_cuda_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout


def sass_counts(sass: str) -> dict:
    """Instructions in the kernel (NOPs excluded) and in each loop body (a branch back to an earlier address)."""
    instrs = []
    for m in _SASS_LINE.finditer(sass):
        text = m.group(2).strip()
        if text.startswith("NOP"):
            continue
        instrs.append((int(m.group(1), 16), text))
    loops = []
    for i, (addr, text) in enumerate(instrs):
        b = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if b and int(b.group(1), 16) < addr:
            target = int(b.group(1), 16)
            loops.append(sum(1 for a, _ in instrs[: i + 1] if a >= target))
    return {"sass_instr": len(instrs), "loops": loops}


class _Recorder:
    def __init__(self, sass: bool, dump_sass: str | None):
        self.sass, self.dump_sass = sass, dump_sass
        self.case: str | None = None
        self.variants: dict[str, dict] = {}  # compiled-kernel hash -> its figures
        self.launches: list[tuple[str, str, bool]] = []  # (case key, variant hash, final launch)
        self.benchmarking = False
        self.errors: list[dict] = []


def install_fake_driver(arch: int, rec: _Recorder) -> None:
    """Make Triton compile for ``GPUTarget("cuda", arch, 32)`` and record launches instead of running them."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime import driver

    class Utils:
        def get_device_properties(self, device):
            # Large limits: Triton must not refuse a variant before we have measured it; launchable is ours.
            return {"max_shared_mem": 1 << 30, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

        def load_binary(self, name, cubin, shared, device):
            usage = _res_usage(cubin, name)
            # Triton's n_spills is CUDA's LOCAL_SIZE_BYTES / 4: the stack frame (where ptxas spills) plus local arrays.
            local = usage.get("STACK", 0) + usage.get("LOCAL", 0)
            info = {"n_regs": usage.get("REG", -1), "local_bytes": local, "static_shared": usage.get("SHARED", 0)}
            info["cubin"] = cubin
            return object(), info, info["n_regs"], info["local_bytes"] // 4, MAX_THREADS

        def unload_module(self, module):
            pass

    class Launcher:
        def __init__(self, src, metadata):
            self.src, self.metadata = src, metadata

        def __call__(self, gx, gy, gz, stream, function, *args):
            _record_launch(rec, arch, self.src, self.metadata, function, (gx, gy, gz))

    class FakeDriver(DriverBase):
        def __init__(self):
            self.utils = Utils()
            self.launcher_cls = Launcher

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            def bench(kernel_call, quantiles=None, **kwargs):
                rec.benchmarking = True
                try:
                    kernel_call()
                except Exception as e:
                    # The autotuner would swallow a config that fails to compile (PTXASError, OutOfResources):
                    # a selectable config that cannot compile is a failure to report.
                    rec.errors.append({"case": rec.case, "error": f"autotuned config failed: {type(e).__name__}: {e}"})
                    raise
                finally:
                    rec.benchmarking = False
                return [1.0, 1.0, 1.0] if quantiles else 1.0

            return bench

        def get_empty_cache_for_benchmark(self):
            import torch

            return torch.empty(1)

        def clear_cache(self, cache):
            pass

    driver.set_active(FakeDriver())


def _record_launch(rec: _Recorder, arch: int, src, metadata, function: dict, grid) -> None:
    h = metadata.hash
    if h not in rec.variants:
        fn = src.fn
        constexprs = {fn.arg_names[path[0]]: v for path, v in src.constants.items() if len(path) == 1}
        # Scalars the kernel was specialised on (== 1) are listed by Triton as constexprs too: keep the named ones.
        constexprs = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in constexprs.items()}
        dtypes = sorted({str(t) for t in src.signature.values() if str(t).startswith("*")})
        warps, stages = metadata.num_warps, metadata.num_stages
        threads = warps * 32
        regs = function["n_regs"]
        shared = metadata.shared + function["static_shared"]  # dynamic (Triton's pipeline buffers) + static
        reasons = []
        if shared > MAX_SHARED[arch]:
            reasons.append(f"shared {shared} B > {MAX_SHARED[arch]}")
        if threads > MAX_THREADS:
            reasons.append(f"{threads} threads > {MAX_THREADS}")
        if regs * threads > MAX_REGS_PER_BLOCK:
            reasons.append(f"{regs} regs x {threads} threads > {MAX_REGS_PER_BLOCK}")
        v = {
            "kernel": fn.__name__,
            "config": {k: constexprs[k] for k in constexprs if k.startswith("BLOCK") and k != "BLOCK_D"}
            | {"num_warps": warps, "num_stages": stages},
            "specialization": {k: constexprs[k] for k in constexprs if not k.startswith("BLOCK") or k == "BLOCK_D"},
            "pointers": dtypes,
            "maxnreg": getattr(metadata, "maxnreg", None),  # the register cap the config asked for (None: ptxas')
            "n_regs": regs,
            "n_spills": function["local_bytes"] // 4,
            "spill_bytes": function["local_bytes"],
            "shared": shared,
            "threads": threads,
            "launchable": not reasons,
            "reasons": reasons,
        }
        if rec.sass or rec.dump_sass == fn.__name__:
            sass = _sass(function["cubin"])
            v |= sass_counts(sass)
            if v["loops"]:
                elems = constexprs.get("BLOCK_M", 1) * constexprs.get("BLOCK_N", 1)
                v["sass_per_elem"] = [round(n * threads / elems, 2) for n in v["loops"]]
            if rec.dump_sass == fn.__name__:
                print(f"===== {fn.__name__} {v['config']} {v['specialization']}\n{sass}")
        rec.variants[h] = v
    rec.launches.append((rec.case, h, not rec.benchmarking))


def _run_case(case: dict) -> None:
    from unittest import mock

    import torch

    from benchmarks import harness
    from gptkernels import ops

    op = case["op"]
    dtype = getattr(torch, case.get("dtype", "float32"))
    if op == "attention":
        B, H, D = 1, 2, case["D"]

        def heads(t):  # the model's layout: a (B, T, H, D) view of c_attn's output, transposed
            return torch.randn(B, t, 3, H * D, dtype=dtype)[:, :, 0].view(B, t, H, D).transpose(1, 2)

        q = heads(case["Tq"]).requires_grad_(case["Tq"] > 1)
        k = heads(case["Tk"]).requires_grad_(case["Tq"] > 1)
        v = heads(case["Tk"]).requires_grad_(case["Tq"] > 1)
        o = ops.attention(q, k, v, causal=True, dropout_p=0.1 if case["dropout"] else 0.0, backend="triton")
        if case["Tq"] > 1:
            with harness.deterministic_algorithms(case.get("deterministic", False)):
                o.backward(torch.ones_like(o))
    elif op == "attention_dropout_mask":
        ops.attention_dropout_mask(1234, 1, 2, case["Tq"], case["Tk"], 0.1, "cpu")
    elif op == "layer_norm":
        n, m = case["N"], case["M"]
        x = torch.randn(m, n, dtype=dtype, requires_grad=True)
        w = torch.ones(n, dtype=dtype, requires_grad=True)
        b = torch.zeros(n, dtype=dtype, requires_grad=True) if case["bias"] else None
        if case["residual"]:
            r = torch.randn(m, n, dtype=dtype, requires_grad=True)
            s, y = ops.add_layer_norm(x, r, w, b, backend="triton")
            (s.float().sum() + y.float().sum()).backward()
        else:
            ops.layer_norm(x, w, b, backend="triton").float().sum().backward()
    elif op == "bias_gelu":
        n, m = case["N"], case["M"]
        x = torch.randn(m, n, dtype=dtype, requires_grad=True)
        b = torch.zeros(n, dtype=dtype, requires_grad=True) if case["bias"] else None
        ops.bias_gelu(x, b, backend="triton").float().sum().backward()
    elif op == "linear_cross_entropy":
        h = torch.randn(case["M"], case["C"], dtype=dtype, requires_grad=case["grad"])
        w = torch.randn(case["V"], case["C"], dtype=dtype, requires_grad=case["grad"])
        t = torch.randint(0, case["V"], (case["M"],))
        # The fake driver launches nothing, so the op's targets-ok flag is never written: its check (an
        # _assert_async of that flag, which raises at once on CPU tensors) has nothing to check here.
        with torch.set_grad_enabled(case["grad"]), mock.patch.object(torch, "_assert_async", lambda *a, **k: None):
            loss = ops.linear_cross_entropy(h, w, t, backend="triton")
            if case["grad"]:
                loss.backward()
    else:
        raise ValueError(f"aot_check: unknown op {op!r}")


def _op_modules() -> list:
    import importlib
    import pkgutil

    import gptkernels.ops as pkg

    return [importlib.import_module(f"gptkernels.ops.{info.name}") for info in pkgutil.iter_modules(pkg.__path__)]


def _jit_kernels() -> list[str]:
    """The ops' launchable kernels: ``@triton.jit`` functions named ``*_kernel`` (helpers have other names)."""
    from triton.runtime.jit import JITFunction

    names = {obj.__name__ for m in _op_modules() for obj in vars(m).values() if isinstance(obj, JITFunction)}
    return sorted(n for n in names if n.endswith("_kernel"))


def _autotuners() -> dict[str, list[dict]]:
    """Every autotuned kernel of the ops and its configs (what the prune functions choose from)."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for module in _op_modules():
        for obj in vars(module).values():
            if isinstance(obj, Autotuner):
                fn = obj.fn
                while not hasattr(fn, "arg_names") or hasattr(fn, "configs"):
                    fn = fn.fn
                found[fn.__name__] = [
                    dict(c.kwargs) | {"num_warps": c.num_warps, "num_stages": c.num_stages} for c in obj.configs
                ]
    return found


def parse_only(spec: str) -> tuple[str, tuple[int, ...]]:
    """``KERNEL[:BMxBN[xWARPS[xSTAGES]]]`` -> (kernel name part, tile prefix), e.g. ``fwd:128x64x8``."""
    name, _, tile = spec.partition(":")
    try:
        dims = tuple(int(x) for x in tile.split("x")) if tile else ()
    except ValueError:
        dims = (0,) * 5
    if not name or len(dims) > 4 or (tile and len(dims) < 2):
        raise ValueError(f"--only: expected KERNEL[:BMxBN[xWARPS[xSTAGES]]], e.g. fwd:128x64x8x3; got {spec!r}")
    return name, dims


def _config_matches(kernel: str, config, only: list[tuple[str, tuple[int, ...]]]) -> bool:
    shape = (config.kwargs.get("BLOCK_M"), config.kwargs.get("BLOCK_N"), config.num_warps, config.num_stages)
    return any(name in kernel and shape[: len(dims)] == dims for name, dims in only)


class _NotSelected(Exception):
    """An autotuned launch with nothing to compile here (no config passes the filters, or this worker's share of
    the configs is empty): skipped, since nothing runs anyway."""


# The filters of this worker: --only's ("cli") and the current case's own "only" ("case"); each non-empty list must
# match a kernel (and an autotuned kernel's config) for it to compile.
_FILTERS: dict[str, list[tuple[str, tuple[int, ...]]]] = {"cli": [], "case": []}


def _patch_launches(shard: int, n_shards: int) -> None:
    """Compile only what the filters let through, and of each autotuned launch only this worker's share: every
    ``n_shards``-th config that the autotuner's prune keeps (the workers of one arch split the configs of each
    autotuned case; a worker whose share is empty skips the launch, so a single config is compiled once)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run, tuned_run, prune = JITFunction.run, Autotuner.run, Autotuner.prune_configs

    def run_jit(self, *args, **kwargs):
        if all(any(name in self.__name__ for name, _ in f) for f in _FILTERS.values() if f):
            return jit_run(self, *args, **kwargs)
        return None

    def run_tuned(self, *args, **kwargs):
        try:
            return tuned_run(self, *args, **kwargs)
        except _NotSelected:
            return None

    def prune_share(self, kwargs):
        kernel = self.base_fn.__name__
        kept = [c for c in prune(self, kwargs) if all(_config_matches(kernel, c, f) for f in _FILTERS.values() if f)]
        share = kept[shard::n_shards]
        if not share:
            raise _NotSelected
        return share

    JITFunction.run, Autotuner.run, Autotuner.prune_configs = run_jit, run_tuned, prune_share


def worker(
    arch: int,
    cases: list[dict],
    sass: bool,
    dump_sass: str | None,
    shard: tuple[int, int],
    only: list[str] | None = None,
) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["GPTKERNELS_BACKEND"] = "triton"
    rec = _Recorder(sass, dump_sass)
    install_fake_driver(arch, rec)
    _FILTERS["cli"] = [parse_only(x) for x in only or ()]
    _patch_launches(*shard)
    from gptkernels.ops import _backend

    _backend.why_not_triton = lambda device: None  # the CPU tensors stand for CUDA ones
    for case in cases:
        rec.case = case_key(case)
        _FILTERS["case"] = [parse_only(x) for x in case.get("only", ())]
        t0 = time.monotonic()
        try:
            _run_case(case)
        except Exception as e:  # noqa: BLE001 - a compile error is a result to report, not a crash
            rec.errors.append({"case": rec.case, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
        print(f"aot sm_{arch}: {rec.case} ({time.monotonic() - t0:.1f}s)", file=sys.stderr, flush=True)
    return {
        "variants": rec.variants,
        "launches": rec.launches,
        "errors": rec.errors,
        "autotuners": _autotuners(),
        "kernels": _jit_kernels(),
    }


# ---------------------------------------------------------------------------------------------------------
# Driver: split the cases over worker processes, merge, judge, write
# ---------------------------------------------------------------------------------------------------------


def _spawn(arch: int, cases: list[dict], args, tmp: Path, i: int, n: int) -> dict:
    cases_file, result_file = tmp / f"cases_{arch}_{i}.json", tmp / f"result_{arch}_{i}.json"
    cases_file.write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    if args.cache_dir:
        env["TRITON_CACHE_DIR"] = str(args.cache_dir)
    cmd = [sys.executable, "-m", "benchmarks.aot_check", "--worker", str(arch), str(cases_file), str(result_file)]
    cmd += ["--shard", f"{i}/{n}"]
    cmd += ["--sass"] if args.sass else []
    cmd += ["--dump-sass", args.dump_sass] if args.dump_sass else []
    for spec in args.only or ():
        cmd += ["--only", spec]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stderr=None if args.verbose else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"aot_check worker sm_{arch} failed (exit {proc.returncode}):\n{(proc.stderr or '')[-3000:]}"
        )
    return json.loads(result_file.read_text())


def _merge(arch: int, parts: list[dict], cases: list[dict]) -> dict:
    variants: dict[str, dict] = {}
    for part in parts:
        for h, v in part["variants"].items():
            variants.setdefault(h, v | {"keys": [], "chosen_for": []})
    keys = [case_key(c) for c in cases]
    index = {k: i for i, k in enumerate(keys)}
    for part in parts:
        for key, h, final in part["launches"]:
            v = variants[h]
            if index[key] not in v["keys"]:
                v["keys"].append(index[key])
            if final and index[key] not in v["chosen_for"]:
                v["chosen_for"].append(index[key])
    autotuners = parts[0]["autotuners"] if parts else {}
    tuned = {}
    for kernel, configs in autotuners.items():
        seen = [v["config"] for v in variants.values() if v["kernel"] == kernel]
        tuned[kernel] = [c | {"selectable": c in seen} for c in configs]
    records = sorted(
        variants.values(), key=lambda v: (v["kernel"], json.dumps(v["config"]), json.dumps(v["specialization"]))
    )
    for v in records:
        v["fails"] = bool(v["n_spills"] or not v["launchable"])
    launched = {v["kernel"] for v in records}
    return {
        "arch": f"sm_{arch}",
        "triton": _triton_version(),
        "limits": {"max_shared": MAX_SHARED[arch], "max_regs_per_block": MAX_REGS_PER_BLOCK},
        "cases": keys,
        "errors": [e for part in parts for e in part["errors"]],
        # Kernels no case launched (with --ops, those of the other ops): add a case for a new kernel.
        "not_launched": sorted({k for part in parts for k in part["kernels"]} - launched),
        "autotune": tuned,
        "variants": records,
    }


def _triton_version() -> str:
    import triton

    return triton.__version__


def failures(result: dict, check_coverage: bool = True) -> list[str]:
    """One line per selectable variant that spills or cannot launch, and per case that failed to compile."""
    lines = []
    for v in result["variants"]:
        if v["fails"]:
            why = list(v["reasons"]) + ([f"spills {v['spill_bytes']} B/thread"] if v["n_spills"] else [])
            lines.append(
                f"{result['arch']} {v['kernel']} {_fmt(v['config'])} [{_fmt(v['specialization'])}; "
                f"{','.join(v['pointers'])}] maxnreg {v.get('maxnreg')} regs {v['n_regs']} shared {v['shared']}: "
                f"{'; '.join(why)}"
            )
    lines += [f"{result['arch']} ERROR {e['case']}: {e['error'].splitlines()[0]}" for e in result["errors"]]
    if check_coverage:
        lines += [
            f"{result['arch']} {k}: launched by no case (add one to benchmarks/aot_check.py)"
            for k in result["not_launched"]
        ]
    return lines


def dump_json(result: dict) -> str:
    """The result as JSON with one line per case, error and variant (small diffs, readable with grep)."""
    lines = ["{"]
    items = list(result.items())
    for i, (k, v) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if isinstance(v, list) and v:
            inner = ",\n".join("  " + json.dumps(x) for x in v)
            lines.append(f"{json.dumps(k)}: [\n{inner}\n]{end}")
        elif isinstance(v, dict) and v and all(isinstance(x, list) for x in v.values()):
            inner = ",\n".join(
                f"  {json.dumps(n)}: [" + ", ".join(json.dumps(c) for c in x) + "]" for n, x in v.items()
            )
            lines.append(f"{json.dumps(k)}: {{\n{inner}\n}}{end}")
        else:
            lines.append(f"{json.dumps(k)}: {json.dumps(v)}{end}")
    return "\n".join(lines) + "\n}\n"


def _parse_where(text: str) -> tuple[str, list]:
    field, sep, values = text.partition("=")
    if not sep or not field or not values:
        raise ValueError(f"--where: expected FIELD=V1,V2, e.g. D=8,16; got {text!r}")

    def value(v: str):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v

    return field, [value(v) for v in values.split(",")]


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def run(
    archs=(90, 80),
    ops=None,
    full=False,
    jobs=2,
    sass=False,
    dump_sass=None,
    cache_dir=None,
    verbose=False,
    bench=False,
    only: list[dict] | None = None,
    kernels: list[str] | None = None,
    where: dict | None = None,
) -> dict[int, dict]:
    """Compile every case's kernels for each arch; return {arch: result} (see the module docstring).

    ``only``: these cases instead; ``where``: only the cases with these values (e.g. ``{"D": [8, 16]}``);
    ``kernels``: ``--only`` specs, the kernels (and tiles) to compile.
    """
    cases = [c for name, make in CASE_SETS.items() if not ops or name in ops for c in make(full)]
    if bench:
        cases = bench_cases()
    if only:
        cases = only
    if where:
        cases = [c for c in cases if all(k in c and c[k] in vs for k, vs in where.items())]
    args = argparse.Namespace(sass=sass, dump_sass=dump_sass, cache_dir=cache_dir, verbose=verbose, only=kernels)
    # Per arch, `jobs` workers: each runs every autotuned case (attention) compiling its share of the configs
    # (see _patch_launches) and a round-robin share of the other cases.
    n = max(1, jobs)
    tuned = [c for c in cases if c["op"] in AUTOTUNED_OPS]
    other = [c for c in cases if c["op"] not in AUTOTUNED_OPS]
    tasks = [(arch, i, tuned + other[i::n]) for arch in archs for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {(a, i): pool.submit(_spawn, a, cs, args, Path(tmp), i, n) for a, i, cs in tasks if cs}
        parts = {k: f.result() for k, f in futures.items()}
    return {arch: _merge(arch, [p for (a, _), p in parts.items() if a == arch], cases) for arch in archs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        arch, cases_file, result_file = int(argv[1]), argv[2], argv[3]
        sass = "--sass" in argv
        dump = argv[argv.index("--dump-sass") + 1] if "--dump-sass" in argv else None
        shard = argv[argv.index("--shard") + 1] if "--shard" in argv else "0/1"
        i, n = (int(x) for x in shard.split("/"))
        only = [argv[j + 1] for j, x in enumerate(argv) if x == "--only"]
        result = worker(arch, json.loads(Path(cases_file).read_text()), sass, dump, (i, n), only)
        Path(result_file).write_text(json.dumps(result))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.aot_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="90,80", help="comma-separated compute capabilities (default 90,80)")
    p.add_argument("--ops", default="", help=f"comma-separated subset of {','.join(CASE_SETS)}")
    p.add_argument("--full", action="store_true", help="every realistic key, not the CI subset")
    p.add_argument("--bench", action="store_true", help="the benchmark suite's keys instead (warms Triton's cache)")
    p.add_argument(
        "--case",
        action="append",
        type=json.loads,
        metavar="JSON",
        help="compile only this case, e.g. "
        '\'{"op": "attention", "dtype": "float16", "D": 64, "Tq": 1024, "Tk": 1024, "dropout": true}\' '
        "(repeatable)",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="KERNEL[:BMxBN[xW[xS]]]",
        help="compile only kernels whose name contains KERNEL, and of autotuned ones only that tile, e.g. "
        "fwd:128x64x8x3 (repeatable; reproduces a few variants in seconds)",
    )
    p.add_argument(
        "--where",
        action="append",
        metavar="FIELD=V1,V2",
        help="keep only the cases whose FIELD is one of the values, e.g. D=8,16 or dropout=true or dtype=float32 "
        "(repeatable; values parsed as JSON, else strings)",
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--sass", action="store_true", help="add SASS instruction counts to each variant")
    p.add_argument("--dump-sass", metavar="KERNEL", help="print the SASS of every variant of KERNEL")
    p.add_argument("--cache-dir", type=Path, help="TRITON_CACHE_DIR for the workers (default: Triton's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for aot_sm<arch>.json")
    p.add_argument("--suffix", default="", help="added to the JSON names, e.g. _triton3.6 for aot_sm90_triton3.6.json")
    p.add_argument("--no-write", action="store_true", help="print only; write no JSON")
    p.add_argument("--verbose", action="store_true", help="show each case as it compiles")
    a = p.parse_args(argv)
    archs = tuple(int(x) for x in a.arch.split(",") if x)
    unknown = [x for x in archs if x not in MAX_SHARED]
    if unknown:
        p.error(f"--arch: unsupported {unknown}; supported: {sorted(MAX_SHARED)}")
    ops = [x for x in a.ops.split(",") if x]
    if any(x not in CASE_SETS for x in ops):
        p.error(f"--ops: choose from {','.join(CASE_SETS)}")
    try:
        for spec in a.only or ():
            parse_only(spec)
        where = dict(_parse_where(x) for x in a.where or ())
    except ValueError as e:
        p.error(str(e))
    t0 = time.monotonic()
    results = run(
        archs, ops, a.full, a.jobs, a.sass, a.dump_sass, a.cache_dir, a.verbose, a.bench, a.case, a.only, where
    )
    bad = []
    for arch, result in results.items():
        n = len(result["variants"])
        lines = failures(result, check_coverage=not (ops or a.case or a.bench or a.only or where))
        print(f"sm_{arch}: {n} variants over {len(result['cases'])} cases, {len(lines)} failing")
        if a.sass or a.case or a.only:
            for v in result["variants"]:
                sass = f" sass {v['sass_instr']} loops {v['loops']} per-elem {v.get('sass_per_elem')}" if a.sass else ""
                print(
                    f"  {v['kernel']} {_fmt(v['config'])} [{_fmt(v['specialization'])}; {','.join(v['pointers'])}] "
                    f"maxnreg {v['maxnreg']} regs {v['n_regs']} spill {v['spill_bytes']} B shared {v['shared']}{sass}"
                )
        if not a.bench:  # warming a cache: the benchmarks report what they find
            bad += lines
        if not a.no_write:
            a.out.mkdir(parents=True, exist_ok=True)
            prefix = "bench_" if a.bench else "full_" if a.full else ""
            path = a.out / f"aot_{prefix}sm{arch}{a.suffix}.json"
            path.write_text(dump_json(result))
            print(f"  wrote {path}")
    for line in bad:
        print("FAIL", line)
    print(f"aot_check: {len(bad)} failing variants or cases in {time.monotonic() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
