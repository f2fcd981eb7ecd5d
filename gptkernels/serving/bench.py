"""``python -m gptkernels.serving.bench``: the engine's generation throughput against one-at-a-time
``model.generate`` and Hugging Face ``generate`` on the same weights, and its latency under load.

For each concurrency ``c`` (default 1, 8, 32), ``c`` requests of ``--prompt-len`` random token ids arrive
together and each generates ``--max-tokens`` tokens greedily (no early stop):

- ``engine``: :class:`Engine` with ``c`` slots, tokens/s over the whole run (prefill included);
- ``generate``: ``model.generate`` one request after another (its rate does not depend on ``c``: measured on
  ``min(c, --sequential-runs)`` requests);
- ``hf``: ``transformers`` ``GPT2LMHeadModel.generate`` on the same weights (``model.save_hf``), one request at
  a time (``hf 1-by-1``) and the ``c`` prompts as one batch (``hf batch``; same length, so no padding).

Time to first token (TTFT) and inter-token latency (ITL) percentiles come from the run at the largest
concurrency: TTFT from the arrival of all requests to each one's first token, ITL between consecutive tokens of
a request; once from the engine's own steps, once through the HTTP server with one streaming ``openai`` client
per request (``--no-http`` skips it). Prints markdown tables; ``--csv`` also writes the rows to a file.

    python -m gptkernels.serving.bench --config tiny
    python -m gptkernels.serving.bench --config gpt2 --max-tokens 32 --concurrency 1 8 32
"""

from __future__ import annotations

import csv
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..cli import OneLineErrorParser, UsageError, cli_main, resolve_device
from ..config import GPTConfig
from ..model import GPT
from .engine import Engine, SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prompts(c: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (c, prompt_len), generator=g).tolist()


def engine_run(model: GPT, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """All ``prompts`` at once through a fresh engine; tokens/s and per-request token times."""
    device = model.transformer.wte.weight.device
    engine = Engine(
        model, tokenizer, max_batch_size=len(prompts), max_len=len(prompts[0]) + max_tokens, eos_token_id=None
    )
    engine.generate([prompts[0][:4]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    times: dict[str, list[float]] = {engine.add_request(p, params): [] for p in prompts}
    _sync(device)
    t0 = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        _sync(device)
        now = time.perf_counter() - t0
        for o in outs:
            times[o.request_id] += [now] * len(o.token_ids)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(t) for t in times.values())
    return {"tokens_per_s": tokens / elapsed, "elapsed": elapsed, "times": list(times.values())}


def http_run(model: GPT, tokenizer: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """The same load through the HTTP server: one streaming ``openai`` client per prompt, all at once."""
    import asyncio

    import openai

    from .server import build_app, run_in_thread

    app = build_app(model, tokenizer, max_batch_size=len(prompts), max_len=len(prompts[0]) + max_tokens)

    async def one(client, prompt, t0):
        times = []
        kw = dict(model="gptkernels", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
        async for chunk in await client.completions.create(**kw, extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter() - t0)
        return times

    async def main(url):
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600) as client:
            await one(client, prompts[0][:4], time.perf_counter())  # warm-up
            t0 = time.perf_counter()
            times = await asyncio.gather(*(one(client, p, t0) for p in prompts))
            return times, time.perf_counter() - t0

    with run_in_thread(app) as url:
        times, elapsed = asyncio.run(main(url))
    return {"tokens_per_s": len(prompts) * max_tokens / elapsed, "elapsed": elapsed, "times": times}


def generate_rate(model: GPT, prompts: list[list[int]], max_tokens: int) -> float:
    """tokens/s of ``model.generate``, one request after another."""
    device = model.transformer.wte.weight.device
    model.generate(torch.tensor([prompts[0][:4]], device=device), 2, temperature=0)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for p in prompts:
        model.generate(torch.tensor([p], device=device), max_tokens, temperature=0)
    _sync(device)
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def hf_rate(hf: Any, prompts: list[list[int]], max_tokens: int, batched: bool) -> float:
    """tokens/s of Hugging Face ``generate`` (greedy, KV cache), one by one or as one batch."""
    device = hf.device
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    groups = [prompts] if batched else [[p] for p in prompts]
    with torch.no_grad():
        hf.generate(torch.tensor([prompts[0][:4]], device=device), **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
        _sync(device)
        t0 = time.perf_counter()
        for g in groups:
            ids = torch.tensor(g, device=device)
            hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        _sync(device)
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def _latency(times: list[list[float]]) -> dict[str, dict[str, float]]:
    """TTFT (each request's first token) and ITL (gaps between its tokens) percentiles."""
    ttft = [t[0] for t in times if t]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    return {"ttft": _percentiles(ttft), "itl": _percentiles(itl)}


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0] if values else float("nan"), "p90": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p90": q[89], "p99": q[98]}


def run_benchmark(
    config: str = "tiny",
    concurrency: Sequence[int] = (1, 8, 32),
    prompt_len: int = 32,
    max_tokens: int = 64,
    device: str | torch.device = "cpu",
    sequential_runs: int = 4,
    hf: bool = True,
    http: bool = True,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows ``{config, concurrency, engine, generate, hf_single, hf_batch, speedup}`` (tokens/s) and the latency
    percentiles (seconds) at the largest concurrency: ``ttft``/``itl`` of the engine, and with ``http`` the same
    through the server (``http_ttft``, ``http_itl``, ``http_tokens_per_s``)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = GPTConfig.preset(config, kernels="torch" if device.type == "cpu" else "auto")
    if prompt_len + max_tokens > cfg.context_length:
        raise UsageError(f"--prompt-len + --max-tokens must fit the {config} context of {cfg.context_length}")
    model = GPT(cfg).to(device).eval()
    from ..tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    hf_model = None
    if hf:
        from transformers import GPT2LMHeadModel

        with tempfile.TemporaryDirectory() as tmp:
            model.save_hf(tmp)
            hf_model = GPT2LMHeadModel.from_pretrained(tmp).to(device).eval()
    rows, latency = [], {}
    seq_rate = generate_rate(model, _prompts(sequential_runs, prompt_len, cfg.vocab_size, seed), max_tokens)
    hf_single = None
    if hf_model is not None:
        hf_single = hf_rate(hf_model, _prompts(sequential_runs, prompt_len, cfg.vocab_size, seed), max_tokens, False)
    for c in concurrency:
        prompts = _prompts(c, prompt_len, cfg.vocab_size, seed)
        run = engine_run(model, tokenizer, prompts, max_tokens)
        row = {"config": config, "device": device.type, "concurrency": c, "engine": run["tokens_per_s"]}
        row["generate"] = seq_rate
        row["hf_single"] = hf_single
        row["hf_batch"] = hf_rate(hf_model, prompts, max_tokens, True) if hf_model is not None else None
        row["speedup"] = run["tokens_per_s"] / seq_rate
        rows.append(row)
        if c == max(concurrency):
            latency = _latency(run["times"])
            if http:
                over_http = http_run(model, tokenizer, prompts, max_tokens)
                latency.update({f"http_{k}": v for k, v in _latency(over_http["times"]).items()})
                latency["http_tokens_per_s"] = over_http["tokens_per_s"]
    return rows, latency


def format_table(rows: list[dict[str, Any]], latency: dict[str, dict[str, float]]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f}"

    lines = [
        "| config | clients | engine tok/s | generate 1-by-1 tok/s | engine / generate | HF 1-by-1 tok/s | "
        "HF batch tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} ({r['device']}) | {r['concurrency']} | {f(r['engine'])} | {f(r['generate'])} | "
            f"{r['speedup']:.1f}x | {f(r['hf_single'])} | {f(r['hf_batch'])} |"
        )
    c = max(r["concurrency"] for r in rows)
    lines.append(f"\nlatency at {c} clients (p50 / p90 / p99 ms):\n")
    lines += ["| path | time to first token | inter-token latency |", "|---|---|---|"]
    for path, prefix in (("engine", ""), ("HTTP streaming (openai client)", "http_")):
        if f"{prefix}ttft" in latency:
            t, i = latency[f"{prefix}ttft"], latency[f"{prefix}itl"]
            lines.append(f"| {path} | {_ms(t)} | {_ms(i)} |")
    if "http_tokens_per_s" in latency:
        lines.append(f"\nthroughput over HTTP at {c} clients: {latency['http_tokens_per_s']:,.0f} tok/s")
    return "\n".join(lines)


def _ms(p: dict[str, float]) -> str:
    return " / ".join(f"{p[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))


def build_parser() -> OneLineErrorParser:
    p = OneLineErrorParser(prog="python -m gptkernels.serving.bench", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", help="a GPTConfig preset, random weights (default: tiny)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="(default: 1 8 32)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--sequential-runs", type=int, default=4, help="requests timed one by one (default: 4)")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--no-http", action="store_true", help="skip the latency run through the HTTP server")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.concurrency) < 1 or args.prompt_len < 1 or args.max_tokens < 1 or args.sequential_runs < 1:
        raise UsageError("--concurrency, --prompt-len, --max-tokens and --sequential-runs must be >= 1")
    rows, latency = run_benchmark(
        args.config,
        args.concurrency,
        args.prompt_len,
        args.max_tokens,
        resolve_device(args.device),
        args.sequential_runs,
        hf=not args.no_hf,
        http=not args.no_http,
    )
    print(format_table(rows, latency))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    cli_main(main)
