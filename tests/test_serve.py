"""``detox serve`` end to end: the real server (uvicorn, in a subprocess, on a free 127.0.0.1 port) with the packaged
SmolLM2 on llama.cpp (and on transformers), driven by the official ``openai`` client.

Greedy outputs are compared with llama-cpp-python's own ``create_completion`` / ``create_chat_completion`` on the
wrapped model in this process, so the server's decoding loop, chat template and fusion are checked against the
library, not against themselves.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("sse_starlette")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

from serve_helpers import Server  # noqa: E402

from detox.targets import TargetNotFoundError, packaged_smollm2_gguf  # noqa: E402

PROMPT = "The city council met on Tuesday to discuss"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy decoding keeps counting: a request that runs to max_tokens
CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]
KEY = "test-key"
# One llama.cpp thread: on 2 busy cores a second thread waits at every barrier (see tests/test_llamacpp.py).
LLAMA = ["--backend", "llamacpp", "--target", "smollm2", "--threads", "1"]


@pytest.fixture(scope="module")
def gguf():
    try:
        return packaged_smollm2_gguf()
    except TargetNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A directory registry holding the shipped calibrator, signed with a fresh key (and a second, untrusted key)."""
    import shutil

    from detox.artifacts.registry import open_registry
    from detox.artifacts.shipped import default_calibrator_path
    from detox.artifacts.signing import generate_keypair, sign_artifact

    d = tmp_path_factory.mktemp("registry")
    priv, pub = generate_keypair(d / "team.key")
    _, other_pub = generate_keypair(d / "other.key")
    art = d / "art"
    shutil.copytree(default_calibrator_path(), art)
    sign_artifact(art, priv)
    entry, _ = open_registry(d / "reg").push(art, require_signature=[str(pub)])
    return {"url": str(d / "reg"), "ref": f"{entry.name}@^{entry.version}", "label": entry.ref, "pub": pub,
            "other_pub": other_pub, "cache": d / "cache"}


@pytest.fixture(scope="module")
def launched(gguf, registry):
    """Every server of this file, launched together: on 2 cores their start-up (GGUF parsing, mostly one thread)
    overlaps. ``guarded`` has an API key and small limits (a queue of 1, a context of 128 tokens), and pulls its
    calibrator from a registry at start, signed by a key it requires."""
    servers = {
        "llama": Server(*LLAMA, "--ctx", "512", "--max-queue", "32", "--max-n", "4"),
        "guarded": Server(*LLAMA, "--api-key", KEY, "--ctx", "128", "--max-queue", "1", "--max-tokens", "64",
                          "--max-n", "2", "--max-body-bytes", "4096", "--calibrator", registry["ref"],
                          "--registry", registry["url"], "--require-signature", str(registry["pub"]),
                          env={"DETOX_CACHE": str(registry["cache"])}),
        "hf": Server("--backend", "hf", "--target", "smollm2", "--threads", "1", "--max-batch", "8", "--batch-wait-ms", "300"),
    }
    try:
        yield {name: srv.launch() for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()


@pytest.fixture(scope="module")
def server(launched, reference):
    return launched["llama"].start()


@pytest.fixture(scope="module")
def guarded(launched):
    return launched["guarded"].start()


@pytest.fixture(scope="module")
def hf_server(launched):
    return launched["hf"].start()


@pytest.fixture(scope="module")
def reference(gguf, launched):
    """The same model and shipped calibrator, wrapped in this process (llama.cpp's own chat template handler);
    built while the servers start."""
    from detox.adapters.llamacpp import load_llama, wrap_llama

    llm = load_llama(gguf, n_ctx=512, n_threads=1, n_threads_batch=1, seed=0, chat_format="chat_template.default")
    return wrap_llama(llm)


def client(srv: Server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def idle(srv: Server, headers: dict[str, str] | None = None) -> None:
    """Wait until the worker has finished every job (its metrics are recorded before it reports idle)."""
    for _ in range(600):
        if srv.metric("detox_serve_running_requests", headers) == 0 and srv.metric("detox_serve_queue_depth", headers) == 0:
            return
        time.sleep(0.05)
    raise AssertionError("the server never became idle")


def completion(srv: Server, prompt: str = PROMPT, **kw):
    return client(srv).completions.create(model="smollm2", prompt=prompt, temperature=0, **kw)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp


def test_models_health_ready_metrics(server, reference):
    m = reference.calibrator.manifest
    models = client(server).models.list().data
    assert [x.id for x in models] == ["smollm2"]
    assert models[0].model_extra["detox"]["calibrator"] == f"{m.name}@{m.version}"
    assert server.get("/health")[0] == 200
    status, body = server.get("/ready")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, hdrs, _ = server.request("GET", "/metrics")
    assert status == 200 and hdrs["content-type"].startswith("text/plain")
    assert server.metric("detox_serve_info", calibrator=f"{m.name}@{m.version}", backend="llamacpp") == 1


def test_completion_is_the_wrapped_models_and_names_its_calibrator(server, reference):
    raw = client(server).completions.with_raw_response.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0)
    resp = raw.parse()
    expected = reference.create_completion(PROMPT, max_tokens=12, temperature=0.0)
    m = reference.calibrator.manifest
    assert resp.choices[0].text == expected["choices"][0]["text"]
    assert resp.choices[0].finish_reason == expected["choices"][0]["finish_reason"]
    assert resp.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert resp.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert raw.headers["x-detox-calibrator"] == f"{m.name}@{m.version}"
    assert float(raw.headers["x-detox-strength"]) == reference.strength
    assert resp.model_extra["detox"] == {"enabled": True, "calibrator": f"{m.name}@{m.version}",
                                         "strength": reference.strength}


def test_chat_uses_the_ggufs_template(server, reference):
    resp = client(server).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0)
    expected = reference.create_chat_completion(messages=CHAT, max_tokens=16, temperature=0.0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert resp.usage.prompt_tokens == expected["usage"]["prompt_tokens"]


def test_strength_zero_is_exactly_the_unfused_model(server, reference):
    c = client(server)
    zero = c.completions.with_raw_response.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0,
                                                   extra_body={"detox": {"strength": 0}})
    off = c.completions.with_raw_response.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0,
                                                  extra_body={"detox": {"enabled": False}})
    assert zero.parse().choices[0].text == off.parse().choices[0].text
    with reference.disable_fusion():
        assert off.parse().choices[0].text == reference.create_completion(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    assert zero.headers["x-detox-strength"] == "0"
    assert off.headers["x-detox-calibrator"] == "none" and off.headers["x-detox-strength"] == "off"
    assert off.parse().model_extra["detox"]["enabled"] is False
    # a strength the request names is the one used: the library at that strength gives the same text
    four = completion(server, max_tokens=16, extra_body={"detox": {"strength": 4}})
    reference.strength, default = 4.0, reference.strength
    try:
        assert four.choices[0].text == reference.create_completion(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    finally:
        reference.strength = default


def test_streaming_gives_the_same_text_in_chunks_and_ends_with_done(server):
    whole = completion(server, max_tokens=12).choices[0].text
    chunks = list(client(server).completions.create(model="smollm2", prompt=PROMPT, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 3
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert text_chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # the wire format itself: OpenAI chunks as server-sent events, closed by data: [DONE]
    status, _, body = server.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "smollm2", "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}).encode(),
        {"Content-Type": "application/json"})
    events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    assert parsed[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_chat_streaming(server):
    whole = client(server).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=10, temperature=0)
    stream = client(server).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content


def test_n_choices_seed_and_stop(server):
    c = client(server)
    kw = dict(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.95, n=3, seed=7)
    first, again = c.completions.create(**kw), c.completions.create(**kw)
    assert sorted(ch.index for ch in first.choices) == [0, 1, 2]
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]  # seeded: reproducible
    assert len({ch.text for ch in first.choices}) > 1  # and the choices are different samples
    assert 3 <= first.usage.completion_tokens <= 24 and first.usage.prompt_tokens < 20  # the prompt counts once
    whole = completion(server, max_tokens=16).choices[0].text
    stop = whole.strip().split()[2]
    cut = completion(server, max_tokens=16, stop=[stop, "never-there"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == whole[: whole.index(stop)]


def test_logprobs_are_the_fused_distributions(server):
    resp = completion(server, max_tokens=6, logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text
    for chosen, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and value <= 0
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the most likely one
    chat = client(server).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4, temperature=0,
                                                  logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    idle(server)
    before = server.metric("detox_serve_completion_tokens_total", fusion="fused")
    cancelled = server.metric("detox_serve_requests_total", status="cancelled")
    stream = client(server).completions.create(model="smollm2", prompt=COUNTING, max_tokens=400, temperature=0,
                                               stream=True)
    it = iter(stream)
    for _ in range(3):
        next(it)
    stream.close()
    assert completion(server, max_tokens=4).choices[0].finish_reason in ("length", "stop")  # the next one is served
    idle(server)
    assert server.metric("detox_serve_requests_total", status="cancelled") == cancelled + 1
    assert server.metric("detox_serve_completion_tokens_total", fusion="fused") - before < 400


def test_sixteen_concurrent_streams_all_complete(server):
    prompts = [PROMPT, COUNTING]
    expected = {p: completion(server, prompt=p, max_tokens=6).choices[0].text for p in prompts}

    def one(i: int) -> tuple[str, str, str | None]:
        prompt = prompts[i % 2]
        stream = client(server).completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0, stream=True)
        chunks = [c for c in stream if c.choices]
        return prompt, "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    for prompt, text, finish in results:
        assert finish in ("length", "stop")
        assert text == expected[prompt]  # one generation at a time: no request sees another's state


def test_calibrator_pulled_from_a_registry_with_a_required_signature(guarded, registry, reference, monkeypatch):
    raw = client(guarded, KEY).completions.with_raw_response.create(model="smollm2", prompt=PROMPT, max_tokens=2)
    assert raw.headers["x-detox-calibrator"] == registry["label"]
    # a key that did not sign it: refused before serving, in one line (the GGUF's fingerprint is cached in this
    # process by the reference fixture, so this fails fast)
    from click.testing import CliRunner

    from detox.cli.main import main

    monkeypatch.setenv("DETOX_CACHE", str(registry["cache"]))
    monkeypatch.setenv("DETOX_REGISTRY", registry["url"])  # restored afterwards (serve sets it from --registry)
    result = CliRunner().invoke(main, ["serve", "--threads", "1", "--calibrator", registry["ref"], "--registry",
                                       registry["url"], "--require-signature", str(registry["other_pub"])])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Error:" in result.output and "sign" in result.output.lower()


def test_api_key(guarded):
    with pytest.raises(openai.AuthenticationError):
        client(guarded).models.list()
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").completions.create(model="smollm2", prompt=PROMPT, max_tokens=2)
    assert client(guarded, KEY).completions.create(model="smollm2", prompt=PROMPT, max_tokens=2).choices
    assert guarded.get("/health")[0] == 200 and guarded.get("/ready")[0] == 200  # probes stay open
    assert guarded.get("/metrics")[0] == 401
    assert guarded.get("/metrics", {"Authorization": f"Bearer {KEY}"})[0] == 200


def _error(excinfo) -> dict:
    return excinfo.value.body if isinstance(excinfo.value.body, dict) and "message" in excinfo.value.body \
        else excinfo.value.body["error"]


@pytest.mark.parametrize("kwargs, status, code", [
    (dict(model="gpt-4"), 404, "model_not_found"),
    (dict(max_tokens=65), 400, "invalid_value"),  # over --max-tokens
    (dict(n=3), 400, "invalid_value"),  # over --max-n
    (dict(prompt=" ".join(str(i) for i in range(100))), 400, "context_length_exceeded"),  # the prompt alone > 128
    (dict(prompt=PROMPT * 9, max_tokens=64), 400, "context_length_exceeded"),  # prompt + max_tokens
    (dict(extra_body={"detox": {"strength": 99}}), 400, "invalid_value"),
    (dict(extra_body={"detox": {"enabled": False, "strength": 2}}), 400, "invalid_value"),
    (dict(extra_body={"detox": {"strenght": 2}}), 400, "invalid_value"),
    (dict(frequency_penalty=0.5), 400, "invalid_value"),
    (dict(temperature=3), 400, "invalid_value"),
])
def test_limits_answer_openai_errors(guarded, kwargs, status, code):
    args = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as excinfo:
        client(guarded, KEY).completions.create(**args)
    assert excinfo.value.status_code == status
    err = _error(excinfo)
    assert err["code"] == code and err["message"]


def test_malformed_bodies_answer_openai_errors(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (b'{"model": "smollm2", "prompt": ', 400, "invalid_json"),
        (b'[1, 2]', 400, "invalid_request"),
        (json.dumps({"model": "smollm2", "prompt": PROMPT, "max_tokens": "4"}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "smollm2", "prompt": 5}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "invalid_value"),
        (json.dumps({"model": "smollm2", "prompt": "x" * 5000}).encode(), 413, "request_too_large"),
    ]
    for i, (body, status, code) in enumerate(cases):
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        got, _, answer = guarded.post_json(path, body, auth)
        assert (got, answer["error"]["code"]) == (status, code), (i, answer)
        assert answer["error"]["type"] and answer["error"]["message"]
    assert guarded.get("/v1/nothing", auth)[0] == 404


def test_a_full_queue_answers_429(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    c = client(guarded, KEY)
    running = c.completions.create(model="smollm2", prompt=COUNTING, max_tokens=64, temperature=0, stream=True)
    it = iter(running)
    next(it)  # the first request is being decoded
    waiting = threading.Thread(target=lambda: c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4))
    waiting.start()
    for _ in range(400):
        if guarded.metric("detox_serve_queue_depth", auth) == 1:
            break
        time.sleep(0.01)
    assert guarded.metric("detox_serve_queue_depth", auth) == 1, "the second request never queued"
    with pytest.raises(openai.RateLimitError) as excinfo:
        c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4)
    assert _error(excinfo)["code"] == "queue_full"
    assert guarded.get("/ready")[0] == 503  # a load balancer sends new traffic elsewhere meanwhile
    rest = [ch for ch in it if ch.choices]
    assert rest[-1].choices[0].finish_reason == "length"
    waiting.join(timeout=120)
    idle(guarded, auth)
    assert guarded.get("/ready")[0] == 200


def test_bad_target_is_one_clear_line():
    from click.testing import CliRunner

    from detox.cli.main import main

    result = CliRunner().invoke(main, ["serve", "--target", "/nonexistent/model.gguf"])
    assert result.exit_code == 1
    assert "GGUF file not found: /nonexistent/model.gguf" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# transformers: requests that arrive together are decoded as one padded batch


def test_transformers_batches_concurrent_requests(hf_server):
    prompts = ["The weather today is", PROMPT, "Once upon a time, in a small village by the sea, there lived"]
    srv = hf_server
    if True:
        c = client(srv)
        off = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0,
                                   extra_body={"detox": {"enabled": False}})
        zero = c.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"detox": {"strength": 0}})
        assert zero.choices[0].text == off.choices[0].text

        def one(i: int):
            p = prompts[i % len(prompts)]
            if i % 2:
                stream = c.completions.create(model="smollm2", prompt=p, max_tokens=6 + i, temperature=0, stream=True)
                chunks = [ch for ch in stream if ch.choices]
                return "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason
            r = c.completions.create(model="smollm2", prompt=p, max_tokens=6 + i, temperature=0)
            return r.choices[0].text, r.choices[0].finish_reason

        batches_before = srv.metric("detox_serve_batch_rows_count")
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(6)))
        assert all(finish in ("length", "stop") and text for text, finish in results)
        # six requests (with different max_tokens and prompt lengths) went through fewer than six batches
        assert srv.metric("detox_serve_batch_rows_count") - batches_before < 6
        assert srv.metric("detox_serve_batch_rows_sum") - srv.metric("detox_serve_batch_rows_count") >= 1
        chat = c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content
        # SmolLM2 writes each of these characters as two or three byte tokens: every streamed piece holds whole
        # characters (the incremental detokenizer holds back a character's first bytes), as the one-call text does
        split = "我爱你。我爱你。我爱你。"
        pieces = [ch.choices[0].text for ch in c.completions.create(model="smollm2", prompt=split, max_tokens=10,
                                                                    temperature=0, stream=True) if ch.choices]
        whole = c.completions.create(model="smollm2", prompt=split, max_tokens=10, temperature=0).choices[0].text
        assert "".join(pieces) == whole and whole.startswith("我爱你") and "\ufffd" not in whole, pieces
        assert len(pieces) < 10  # fewer chunks than tokens: the unfinished characters' tokens sent no text


# ---------------------------------------------------------------------------------------------------------------
# stop strings (backend-independent): text that may start a stop string is held back, never sent


@pytest.mark.parametrize("pieces, stop, max_tokens, text, reason", [
    (["Hello E", "N", "D more"], ("END",), 10, "Hello ", "stop"),  # split over three tokens
    (["a", "E", "x", "END"], ("END",), 10, "aEx", "stop"),  # a held "E" that did not become END is sent
    (["ab", "c"], ("xyz", "bc"), 10, "a", "stop"),  # the earliest of several stop strings
    (["one ", "tw"], ("two",), 2, "one tw", "length"),  # max_tokens ends it; the held "tw" is real text
])
def test_stop_strings(pieces, stop, max_tokens, text, reason):
    import asyncio

    from detox.serve.engine import Delta, Finish, GenRequest, Job

    loop = asyncio.new_event_loop()
    try:
        job = Job(GenRequest(prompt_ids=[1], max_tokens=max_tokens, stop=stop), loop=loop)
        for piece in pieces:
            if job.choices[0].push(piece):
                break
        job.close()
        loop.run_until_complete(asyncio.sleep(0))
        events = []
        while not job.events.empty():
            events.append(job.events.get_nowait())
    finally:
        loop.close()
    assert "".join(e.text for e in events if isinstance(e, Delta)) == text
    assert [e.reason for e in events if isinstance(e, Finish)] == [reason]


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime: the tiny llama target of conftest exported with `detox export-onnx`'s code, and its aligned calibrator


def test_onnx_backend_serves_the_wrapped_export(llama_target_dir, aligned_llama, tmp_path):
    import torch

    import detox
    from detox.adapters.onnxruntime import load_ort_target
    from detox.onnx_export import export_target

    pytest.importorskip("optimum.onnxruntime")
    export = tmp_path / "llama-onnx"
    export_target(str(llama_target_dir), export)
    prompts = ["The weather today is", "We walked along the river and"]
    with Server("--backend", "onnx", "--target", str(export), "--calibrator", str(aligned_llama), "--threads", "1",
                "--batch-wait-ms", "300") as srv:
        c = client(srv)
        with ThreadPoolExecutor(2) as pool:  # arrive together: one padded batch
            served = list(pool.map(lambda p: c.completions.create(model="llama-onnx", prompt=p, max_tokens=6,
                                                                  temperature=0).choices[0].text, prompts))
        assert srv.metric("detox_serve_batch_rows_sum") == 2 and srv.metric("detox_serve_batch_rows_count") == 1
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="llama-onnx", messages=CHAT, max_tokens=4)
    model, tok = load_ort_target(export, "cpu")
    fused = detox.wrap(model, calibrator=str(aligned_llama), tokenizer=tok)
    for prompt, text in zip(prompts, served):
        inputs = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = fused.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
