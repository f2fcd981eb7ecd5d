"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn). It only translates and streams.

Endpoints: ``POST /v1/completions`` (streaming with Server-Sent Events), ``GET /v1/models``, ``GET /health``;
``POST /v1/chat/completions`` answers 400: these models have no chat format. Bad requests get HTTP 400 with
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

Fields of ``/v1/completions`` beyond OpenAI's, as vLLM names them: ``top_k``, ``min_p``, ``repetition_penalty``
(CTRL / Hugging Face, over prompt and output) and ``ignore_eos``. ``presence_penalty`` and ``frequency_penalty``
follow OpenAI (subtracted from the logits of tokens already generated). ``logprobs`` are the model's
log-probabilities (log-softmax of the raw logits, before penalties, temperature and filters). With ``seed``,
choice ``i`` of ``n`` uses seed ``seed + i``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine, EngineError
from .engine import Engine, Output, SamplingParams


def _error(status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None):
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _ApiError(Exception):
    """An error answered in OpenAI's format (400 unless ``status`` says otherwise)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: OpenAI's fields, plus vLLM's top_k, min_p, repetition_penalty and
    ignore_eos. Unknown fields and values of the wrong type are rejected (400), never coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    user: str | None = None
    ignore_eos: bool = False


def create_app(engine: AsyncEngine, model_name: str = "gptkernels", api_key: str | None = None, max_n: int = 16) -> Any:
    """The FastAPI application serving ``engine`` (already started) under the name ``model_name``."""
    eng: Engine = engine.engine
    tokenizer = eng.tokenizer
    app = FastAPI(title="gptkernels", version="0.1.0")
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        where = ".".join(loc)
        if param == "prompt":
            msg = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        elif err.get("type") == "extra_forbidden":
            msg = f"unknown field {where!r}"
        elif err.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        else:
            msg = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
        return _error(400, msg, param)

    @app.exception_handler(_ApiError)
    async def _bad(request: Request, exc: _ApiError):
        return _error(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):  # unknown paths, wrong methods
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def _auth(request: Request) -> None:
        # A dependency, not an HTTP middleware: BaseHTTPMiddleware wraps receive() and hides client disconnects.
        if api_key is not None and not secrets.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {api_key}".encode()
        ):
            raise _ApiError(
                "invalid or missing API key (Authorization: Bearer ...)", status=401, code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth)])

    @app.get("/health")
    async def health():
        # Read from another thread without a lock: numbers for a person or a probe, not for decisions.
        counts = dict(running=eng.num_running, waiting=len(eng.waiting), finished=eng.num_finished)
        return {"status": "ok", **counts, "aborted": eng.num_aborted}

    @v1.get("/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "gptkernels"}
        return {"object": "list", "data": [{**card, "max_model_len": eng.max_len}]}

    @v1.post("/chat/completions")
    async def chat(request: Request):
        raise _ApiError(
            f"model {model_name!r} has no chat format (it is a plain language model); use /v1/completions",
            code="chat_not_supported",
        )

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != model_name:
            raise _ApiError(
                f"the model {body.model!r} does not exist; this server has {model_name!r}",
                "model",
                404,
                "model_not_found",
            )
        prompts = _prompts(body, eng, max_n)
        jobs = []
        for p in prompts:
            for j in range(body.n):
                params = _sampling_params(body, j)
                try:
                    eng.check_request(p, params)
                except ValueError as e:
                    raise _ApiError(str(e), _param_of(str(e))) from None
                jobs.append((p, params))
        rid = f"cmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        echo = [tokenizer.decode(p) if body.echo else "" for p in prompts for _ in range(body.n)]
        prompt_usage = sum(len(p) for p in prompts)  # each prompt once, however many choices (as OpenAI counts)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                _stream(engine, jobs, rid, now, model_name, tokenizer, echo, prompt_usage, usage),
                media_type="text/event-stream",
            )
        return JSONResponse(await _complete(engine, jobs, rid, now, model_name, tokenizer, echo, prompt_usage, request))

    app.include_router(v1)
    app.state.engine = engine
    return app


def _param_of(message: str) -> str | None:
    for name in (
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "seed",
        "logprobs",
        "stop",
    ):
        if message.startswith(name) or f" {name}=" in message:
            return name
    return "prompt" if "prompt" in message else None


def _prompts(body, eng: Engine, max_n: int) -> list[list[int]]:
    if not 1 <= body.n <= max_n:
        raise _ApiError(f"n must be in [1, {max_n}], got {body.n}", "n")
    if body.best_of is not None and body.best_of != body.n:
        raise _ApiError("best_of is not supported (leave it out or make it equal to n)", "best_of")
    if body.suffix is not None:
        raise _ApiError("suffix (insertion) is not supported by this model", "suffix")
    if body.echo and body.logprobs is not None:
        raise _ApiError("echo with logprobs needs prompt logprobs, which this server does not compute", "echo")
    p = body.prompt
    raw = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not raw:
        raise _ApiError("prompt must not be empty", "prompt")
    if len(raw) * body.n > eng.max_batch_size * 4:
        raise _ApiError(f"too many prompts x n ({len(raw) * body.n}); at most {eng.max_batch_size * 4}", "prompt")
    out = []
    for x in raw:
        try:
            ids = eng.encode(x)
        except ValueError as e:
            raise _ApiError(str(e), "prompt") from None
        if not ids:
            raise _ApiError("prompt must not be empty", "prompt")
        out.append(ids)
    return out


def _sampling_params(body, choice: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > 4:
        raise _ApiError(f"at most 4 stop strings, got {len(stop)}", "stop")
    bias = {}
    for k, v in (body.logit_bias or {}).items():
        try:
            bias[int(k)] = v
        except ValueError:
            raise _ApiError(f"logit_bias keys must be token ids, got {k!r}", "logit_bias") from None
    return SamplingParams(
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        temperature=body.temperature,
        top_k=0 if body.top_k == -1 else body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=bias,
        stop=stop,
        seed=None if body.seed is None else body.seed + choice,
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
    )


def _logprobs_json(out: Output, tokenizer, offset: int) -> tuple[dict | None, int]:
    """OpenAI's legacy logprobs object for the new tokens of ``out``, and the text offset after them."""
    if not out.logprobs:
        return None, offset
    tokens, offsets = [], []
    for lp in out.logprobs:
        piece = tokenizer.decode([lp.token_id])
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in out.logprobs],
        "top_logprobs": [{tokenizer.decode([t]): v for t, v in lp.top} for lp in out.logprobs],
        "text_offset": offsets,
    }, offset


def _merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def _engine_error(e: BaseException) -> _ApiError:
    status = 400 if isinstance(e, ValueError) else 500
    return _ApiError(str(e), status=status)


async def _complete(engine, jobs, rid, now, model_name, tokenizer, echo, prompt_usage, request) -> dict:
    """Run to the end; abort if the client goes away meanwhile."""
    n = len(jobs)
    texts, reasons, lps = list(echo), [None] * n, [None] * n
    offsets = [len(t) for t in texts]
    usage = [0, 0]

    async def consume():
        async for i, out in engine.generate(jobs):
            lp, offsets[i] = _logprobs_json(out, tokenizer, offsets[i])
            lps[i] = _merge_logprobs(lps[i], lp)
            texts[i] += out.text
            if out.finished:
                reasons[i] = out.finish_reason
                usage[1] += out.completion_tokens

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        exc = task.exception() if not task.cancelled() else None
    finally:
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise _ApiError("the client disconnected", status=499)
    if "error" in reasons:
        raise _ApiError("generation failed: the model produced NaN or infinite logits", status=500)
    if exc is not None:
        if isinstance(exc, ValueError | EngineError):
            raise _engine_error(exc)
        raise exc
    usage[0] = prompt_usage
    choices = [{"index": i, "text": texts[i], "logprobs": lps[i], "finish_reason": reasons[i]} for i in range(n)]
    return {
        "id": rid,
        "object": "text_completion",
        "created": now,
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": usage[0] + usage[1]},
    }


async def _stream(engine, jobs, rid, now, model_name, tokenizer, echo, prompt_usage, include_usage):
    """Server-Sent Events in OpenAI's format: ``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``."""

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": "text_completion", "created": now, "model": model_name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    offsets = [len(t) for t in echo]
    completion = 0
    for i, t in enumerate(echo):
        if t:
            yield chunk([{"index": i, "text": t, "logprobs": None, "finish_reason": None}])
    try:
        async for i, out in engine.generate(jobs):
            if not (out.text or out.finished or out.logprobs):
                continue
            lp, offsets[i] = _logprobs_json(out, tokenizer, offsets[i])
            if out.finished:
                completion += out.completion_tokens
            if out.finish_reason == "error":
                message = f"choice {i}: generation failed: the model produced NaN or infinite logits"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                continue
            yield chunk([{"index": i, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}])
    except (ValueError, EngineError) as e:
        err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
        yield f"data: {json.dumps(err)}\n\n"
    if include_usage:
        p = prompt_usage
        usage = {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}
        yield chunk([], usage)
    yield "data: [DONE]\n\n"


# -------------------------------------------------------------------------------------------------------------
# Running it
# -------------------------------------------------------------------------------------------------------------
def build_app(
    model: Any, tokenizer: Any, *, model_name: str = "gptkernels", api_key: str | None = None, **engine_kwargs: Any
) -> Any:
    """Engine + background thread + FastAPI app for ``model``; ``app.state.engine.stop()`` ends the thread."""
    engine = AsyncEngine(Engine(model, tokenizer, **engine_kwargs)).start()
    return create_app(engine, model_name=model_name, api_key=api_key)


def serve(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (what ``python -m gptkernels.serve`` calls)."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        app.state.engine.stop()


@contextlib.contextmanager
def run_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on a background thread (port 0: a free port); yields the base URL, e.g.
    ``http://127.0.0.1:54321/v1``, and stops the server and the engine on exit (tests, notebooks)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
        app.state.engine.stop()
