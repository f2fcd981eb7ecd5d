"""The OpenAI-compatible server, driven by the official ``openai`` client against a real server on 127.0.0.1:
completions, streaming, seeds, stop strings, errors, auth, client disconnects and a 32-client load test."""

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from gptkernels import GPT, GPTConfig
from gptkernels.serving.server import build_app, run_in_thread
from gptkernels.tokenizer import get_tokenizer

from .cli_helpers import cli_env

CTX = 64
KEY = "test-key"
NAME = "tiny-test"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50257, context_length=CTX, emb_dim=32, n_heads=4, n_layers=2, kernels="torch")
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def server(model, tok):
    app = build_app(model, tok, model_name=NAME, api_key=KEY, max_batch_size=16, max_prefill_tokens=32)
    with run_in_thread(app) as url:
        yield url, app.state.engine.engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def greedy_text(model, tok, prompt, n):
    ids = tok.encode(prompt)
    return tok.decode(model.generate(torch.tensor([ids]), n, temperature=0)[0, len(ids) :].tolist())


def test_completion_greedy_equals_generate(client, model, tok):
    r = client.completions.create(
        model=NAME, prompt="Hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].text == greedy_text(model, tok, "Hello world", 12)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (2, 12, 14)


def test_token_id_prompts_and_several_prompts(client, model, tok):
    ids = tok.encode("The list")
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy_text(model, tok, "The list", 5)
    r = client.completions.create(model=NAME, prompt=[ids, tok.encode("Hello world")], max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [greedy_text(model, tok, p, 5) for p in ("The list", "Hello world")]
    r = client.completions.create(model=NAME, prompt=["The list", "Hello world"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [
        greedy_text(model, tok, p, 5) for p in ("The list",) * 2 + ("Hello world",) * 2
    ]
    assert r.usage.prompt_tokens == 4
    with pytest.raises(openai.BadRequestError, match="prompt must be a string, a list of strings"):
        client.completions.create(model=NAME, prompt=[ids, "Hello world"], max_tokens=5)


def test_streaming_matches_the_whole_completion(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=15, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].choices == []


def test_raw_sse_format(server):
    url, _ = server
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ") and json.loads(e[6:])["object"] == "text_completion"


def test_seeds_are_reproducible(client):
    kw = dict(model=NAME, prompt="The meaning of life is", max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    c = client.completions.create(**kw, seed=99).choices[0].text
    assert a == b and a != c
    two = client.completions.create(**kw, seed=1234, n=2)
    assert two.choices[0].text == a and two.choices[1].text != a  # choice i uses seed + i


def test_stop_strings(client, model, tok):
    full = greedy_text(model, tok, "Hello world", 20)
    stop = full[8:11]
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = client.completions.create(
        model=NAME, prompt="Hello world", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]


def test_echo(client, model, tok):
    r = client.completions.create(model=NAME, prompt="Hello world", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "Hello world" + greedy_text(model, tok, "Hello world", 5)


def test_logprobs(client):
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    assert all(max(top.values()) == pytest.approx(v) for top, v in zip(lp.top_logprobs, lp.token_logprobs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=CTX), "exceeds the context"),
        (dict(temperature=-1.0), "temperature"),
        (dict(prompt="word " * CTX), "prompt has"),
        (dict(max_tokens="ten"), "max_tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=[50257]), "outside the vocabulary"),
        (dict(n=0), "n must be"),
        (dict(extra_body={"nonsense": 1}), "unknown field 'nonsense'"),
        (dict(extra_body={"top_k": "many"}), "top_k"),
    ],
)
def test_bad_requests_are_400(client, server, kwargs, message):
    args = {"model": NAME, "prompt": "Hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError, match=message) as e:
        client.completions.create(**args)
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert server[1].num_running == 0
    assert client.completions.create(model=NAME, prompt="Hello", max_tokens=2).choices[0].text  # still serving


def test_error_body_and_other_endpoints(server, client):
    url, _ = server
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/completions", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="no chat format"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert [m.id for m in client.models.list()] == [NAME]
    r = httpx.get(f"{url}/nowhere", headers=h)
    assert r.status_code == 404 and "/v1/nowhere" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/completions", headers=h).status_code == 405
    assert httpx.get(url.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server[0], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="Hi", max_tokens=2)
    assert httpx.get(f"{server[0]}/models").status_code == 401
    assert httpx.get(f"{server[0]}/models", headers={"Authorization": "Bearer é".encode("latin-1")}).status_code == 401


def wait_idle(engine, timeout=20.0):
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine.has_unfinished()


@pytest.fixture
def slow_engine(server, monkeypatch):
    """The server's engine with 20 ms per step, so that a 62-token request outlives the client's patience."""
    engine = server[1]
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    return engine


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_slot(server, slow_engine, stream):
    url, engine = server[0], slow_engine
    body = {"model": NAME, "prompt": "Hi", "max_tokens": CTX - 2, "stream": stream, "ignore_eos": True}
    aborted, finished = engine.num_aborted, engine.num_finished
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream("POST", f"{url}/completions", json=body, headers=headers) as r:
            next(r.iter_lines())
            assert engine.num_running == 1
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json=body, headers=headers, timeout=0.3)
    # The client left after a few of 62 tokens (about 1.3 s of work): the request is aborted, its slot freed.
    assert wait_idle(engine) and engine.num_free_slots == engine.max_batch_size
    assert (engine.num_aborted, engine.num_finished) == (aborted + 1, finished)


def test_32_concurrent_streaming_clients(server, model, tok):
    url, engine = server
    prompts = ["Hello world", "The list", "Once upon a time there", "A", "In 1999 the", "def f(x):", "Dear Sir"]

    def settings(i):
        prompt, n = prompts[i % len(prompts)], 4 + (i * 5) % 17
        if i % 2 == 0:
            return dict(prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True)
        return dict(prompt=prompt, max_tokens=n, temperature=0.9, top_k=(i % 4) * 20, top_p=0.9, seed=i, n=1 + i % 3)

    async def one(ac, i):
        kw = settings(i)
        extra = {k: kw.pop(k) for k in ("top_k", "ignore_eos") if k in kw}
        texts, finished = {}, {}
        stream = await ac.completions.create(model=NAME, stream=True, extra_body=extra, **kw)
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
                if c.finish_reason is not None:
                    finished[c.index] = c.finish_reason
        return texts, finished

    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac, i) for i in range(32))), timeout=180)

    results = asyncio.run(main())
    for i, (texts, finished) in enumerate(results):
        kw = settings(i)
        assert len(finished) == kw.get("n", 1), f"client {i} did not finish every choice"
        if kw["temperature"] == 0:
            assert texts[0] == greedy_text(model, tok, kw["prompt"], kw["max_tokens"]), f"client {i}"
    assert wait_idle(engine) and engine.num_free_slots == engine.max_batch_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_starts_answers_and_stops(tmp_path, model, tok):
    from gptkernels.checkpoint import save_checkpoint
    from gptkernels.tokenizer import tokenizer_to_spec

    spec = tokenizer_to_spec(tok)
    state = {"step": 1, "model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": spec}
    save_checkpoint(tmp_path / "out", state)
    port = free_port()
    args = ["--checkpoint", str(tmp_path / "out"), "--port", str(port), "--api-key", KEY, "--log-level", "warning"]
    proc = subprocess.Popen([sys.executable, "-m", "gptkernels.serve", *args], env=cli_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        r = c.completions.create(model=str(tmp_path / "out"), prompt="Hello world", max_tokens=6, temperature=0)
        assert r.choices[0].text == greedy_text(model, tok, "Hello world", 6)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_cli_bad_arguments(tmp_path, capsys):
    from gptkernels.cli import UsageError
    from gptkernels.serve import main

    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "one of the arguments --checkpoint --hf is required" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        main(["--checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(UsageError, match="--max-batch-size must be >= 1"):
        main(["--checkpoint", str(tmp_path / "nowhere"), "--max-batch-size", "0"])


def test_engine_failure_ends_the_requests_in_flight_and_serving_goes_on(server, client, monkeypatch):
    engine = server[1]
    step = engine.step
    calls = []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return step()

    monkeypatch.setattr(engine, "step", failing_once)
    with pytest.raises(openai.InternalServerError, match="simulated out of memory"):
        client.completions.create(model=NAME, prompt="Hello", max_tokens=4)
    assert wait_idle(engine) and engine.num_free_slots == engine.max_batch_size
    assert len(client.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0).choices) == 1


def test_stopping_the_engine_ends_the_requests_in_flight(model, tok):
    from gptkernels.serving.async_engine import AsyncEngine, EngineError
    from gptkernels.serving.engine import Engine, SamplingParams

    core = Engine(model, tok, max_batch_size=2)
    step = core.step
    core.step = lambda: time.sleep(0.02) or step()  # 62 tokens take over a second: stop() comes first
    engine = AsyncEngine(core).start()

    async def main():
        got = []
        with pytest.raises(EngineError, match="shutting down"):
            async for _, out in engine.generate([([1, 2], SamplingParams(max_tokens=CTX - 2, ignore_eos=True))]):
                got.append(out)
                if len(got) == 2:
                    await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        return got

    assert len(asyncio.run(asyncio.wait_for(main(), timeout=60))) >= 2
