"""The HTTP API end to end on a local Ray cluster (tiny random model): OpenAI compatibility,
CoLD defaults and reporting, admin API, hostile input, disconnects, backpressure, metrics."""

import json
import os
import shutil
import threading
import time
import urllib.request

import httpx
import pytest

from cold_ray.config import EngineConfig
from cold_ray.engine import ColdParams, EngineCore, SamplingParams
from cold_ray.serve.app_args import AppArgs
from tests.serve_util import CHAT_TEMPLATE, free_port, local_ray, long_tiny_model, wait_for

pytestmark = pytest.mark.serve

API_KEY, ADMIN_KEY = "client-token-3141", "admin-token-2718"
ENV = {"COLD_TEST_API_KEY": API_KEY, "COLD_TEST_ADMIN_KEY": ADMIN_KEY}
CLIENT = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {"Content-Type": "application/json"}
APP_ORIGIN = "https://app.example"  # the /ovl app's one CORS origin
PROMPT = "the quick brown fox"
CTX, LIMIT = 32768, 32700  # a long context: a long request outlives any test step


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llama, tiny_adapters):
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    root = tmp_path_factory.mktemp("serve_api")
    model = long_tiny_model(tiny_llama, root / "tiny-long", max_len=CTX)
    uploads = root / "uploads"
    shutil.copytree(tiny_adapters[2], uploads / "a2")
    (uploads / "pickled").mkdir()
    shutil.copy(tiny_adapters[2] / "adapter_config.json", uploads / "pickled")
    (uploads / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cfg = AppArgs(
        served_model_name="tiny",
        registry=str(root / "reg.sqlite"),
        adapters=[
            {"name": "a0", "source": str(tiny_adapters[0]), "alpha": 0.3, "beta": 1.0},
            {"name": "a1", "source": str(tiny_adapters[1]), "cold_enabled": False},
        ],
        adapter_roots=[str(uploads)],
        max_tokens_limit=LIMIT,
        max_body_bytes=64 * 1024,
        api_key_env="COLD_TEST_API_KEY",
        admin_key_env="COLD_TEST_ADMIN_KEY",
        engine=dict(
            model=str(model),
            max_rows=8,
            max_model_len=CTX,
            max_lora_rank=8,
            max_loras=2,
            chat_template=CHAT_TEMPLATE,
        ),
    )
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # replicas inherit the environment of the cluster's start
    metrics_port = free_port()
    try:
        with local_ray(metrics_port=metrics_port) as url:
            prepare(cfg)
            zero_cpu = {"ray_actor_options": {"num_cpus": 0}}
            serve.run(compose(cfg, zero_cpu), name="api", route_prefix="/")
            tight = {**zero_cpu, "max_ongoing_requests": 1, "max_queued_requests": 1}
            browsers = {"cors_origins": [APP_ORIGIN], "allowed_hosts": ["cold.example"]}
            serve.run(
                compose(cfg.model_copy(update=browsers), tight), name="ovl", route_prefix="/ovl"
            )
            with httpx.Client(base_url=url, timeout=60) as client:
                yield {
                    "url": url,
                    "client": client,
                    "cfg": cfg,
                    "model": model,
                    "adapters": tiny_adapters,
                    "uploads": uploads,
                    "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                }
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def complete(stack, path="/v1/completions", headers=CLIENT, **body):
    body.setdefault("prompt", PROMPT)
    body.setdefault("temperature", 0)
    body.setdefault("max_tokens", 8)
    return stack["client"].post(path, json=body, headers=headers)


def engine_stats(app="api"):
    from ray import serve

    return serve.get_deployment_handle("ColdEngine", app_name=app).stats.remote().result()


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["message"], err
    return err


# ---- decoding: defaults, overrides, reporting ---------------------------------------------


@pytest.mark.parametrize(
    "model,cold,want",
    [
        ("a0", None, ("cold", 0.3, 1.0)),  # CoLD at the adapter's registry defaults
        ("a0", False, ("plain", None, None)),
        ("a0", True, ("cold", 0.3, 1.0)),
        ("a0", {"beta": 0.2}, ("cold", 0.3, 0.2)),  # a knob overrides, the other is default
        ("a1", None, ("plain", None, None)),  # cold_enabled=false in the registry
        ("a1", {"alpha": 0.5}, ("cold", 0.5, 0.5)),
        ("tiny", None, ("plain", None, None)),  # the base model
        (None, None, ("plain", None, None)),
    ],
)
def test_decoding_is_chosen_and_reported(stack, model, cold, want):
    body = {"model": model} if model else {}
    if cold is not None:
        body["cold"] = cold
    r = complete(stack, **body)
    assert r.status_code == 200, r.text
    got = r.json()["cold"]
    assert (got["decoding"], got["alpha"], got["beta"]) == want
    assert r.headers["x-cold-decoding"] == want[0] and r.headers["x-cold-replica"]
    if want[0] == "cold":
        assert float(r.headers["x-cold-alpha"]) == want[1]
        assert float(r.headers["x-cold-beta"]) == want[2]


def test_served_tokens_equal_the_engine_in_process(stack):
    """What the API returns is exactly what the engine decodes for the same request."""
    core = EngineCore(EngineConfig(model=str(stack["model"]), max_rows=4, max_model_len=256))
    core.register_adapter("a0", stack["adapters"][0])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ids = core.tokenizer.encode(PROMPT, add_special_tokens=False)
    for cold, knob in ((ColdParams(0.3, 1.0), None), (None, False)):
        want = core.generate([ids], params, adapter="a0", cold=cold)[0]
        r = complete(
            stack,
            model="a0",
            max_tokens=12,
            ignore_eos=True,
            **({} if knob is None else {"cold": knob}),
        )
        body = r.json()
        assert body["choices"][0]["text"] == want["text"]
        assert body["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": 12,
            "total_tokens": len(ids) + 12,
        }
        assert body["choices"][0]["finish_reason"] == "length"


def sse_events(r) -> list:
    events = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_stream_equals_non_stream(stack):
    body = {
        "model": "a0",
        "prompt": PROMPT,
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    whole = stack["client"].post("/v1/completions", json=body, headers=CLIENT).json()
    with stack["client"].stream(
        "POST", "/v1/completions", json={**body, "stream": True}, headers=CLIENT
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-cold-decoding"] == "cold"
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["cold"] == {"decoding": "cold", "alpha": 0.3, "beta": 1.0}
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_chat_uses_the_template(stack):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    r = stack["client"].post(
        "/v1/chat/completions",
        headers=CLIENT,
        json={
            "model": "a0",
            "messages": msgs,
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    body = r.json()
    assert r.status_code == 200, body
    assert (
        body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    )
    core_prompt = "system: be brief\nuser: the quick brown fox\nassistant:"
    r2 = complete(stack, model="a0", prompt=core_prompt, max_tokens=6, ignore_eos=True)
    assert body["choices"][0]["message"]["content"] == r2.json()["choices"][0]["text"]
    assert body["usage"] == r2.json()["usage"]


def test_openai_client_unchanged(stack):
    import openai

    client = openai.OpenAI(base_url=stack["url"] + "/v1", api_key=API_KEY, max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models][:1] == ["tiny"]
    a0 = next(m for m in models if m.id == "a0")
    assert a0.parent == "tiny" and a0.root == str(stack["adapters"][0].resolve())
    out = client.completions.create(model="a0", prompt=PROMPT, max_tokens=5, temperature=0)
    assert out.usage.completion_tokens >= 1 and out.model_extra["cold"]["decoding"] == "cold"
    plain = client.completions.create(
        model="a0", prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"cold": False}
    )
    assert plain.model_extra["cold"]["decoding"] == "plain"
    chat = client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="a0",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="x", extra_body={"cold": True})
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="a0", prompt="x", extra_body={"cold": {"alpha": 2}})
    bad = openai.OpenAI(base_url=stack["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- admin API ----------------------------------------------------------------------------


def test_admin_registers_serves_and_removes(stack):
    c, source = stack["client"], str(stack["uploads"] / "a2")
    assert_openai_error(c.post("/v1/adapters", json={"name": "a2", "source": source}), 401)
    r = c.post("/v1/adapters", json={"name": "a2", "source": source}, headers=CLIENT)
    assert_openai_error(r, 403)
    r = c.post("/v1/adapters", json={"name": "a2", "source": source, "beta": 0.7}, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["parent"] == "tiny" and r.json()["cold"]["beta"] == 0.7
    assert "a2" in [m["id"] for m in c.get("/v1/models", headers=CLIENT).json()["data"]]
    assert complete(stack, model="a2").json()["cold"]["beta"] == 0.7  # hot: no restart
    dup = c.post("/v1/adapters", json={"name": "a2", "source": source}, headers=ADMIN)
    assert_openai_error(dup, 409)
    assert c.delete("/v1/adapters/a2", headers=CLIENT).status_code == 403
    assert c.delete("/v1/adapters/a2", headers=ADMIN).json()["deleted"] is True
    assert_openai_error(complete(stack, model="a2"), 404)
    assert_openai_error(c.delete("/v1/adapters/a2", headers=ADMIN), 404)


def test_listings_use_the_served_name_and_show_warnings(stack):
    """served_model_name ("tiny") is the base model's id and every adapter's parent; the tiny
    adapters declare the model's folder as their base, a name that differs from "tiny", which
    validation recorded as a warning that every view shows."""
    c = stack["client"]
    data = c.get("/v1/models", headers=CLIENT).json()["data"]
    assert (data[0]["id"], data[0]["parent"]) == ("tiny", None)
    a0 = next(m for m in data if m["id"] == "a0")
    assert a0["parent"] == "tiny" and a0["base_model"].endswith("tiny-llama")
    (warning,) = a0["warnings"]
    assert "tiny-llama" in warning and "'tiny'" in warning
    listed = c.get("/v1/adapters", headers=CLIENT).json()["data"]
    assert next(m for m in listed if m["id"] == "a0")["warnings"] == [warning]
    assert c.get("/v1/adapters/a0", headers=CLIENT).json()["warnings"] == [warning]
    assert complete(stack, model="tiny").json()["model"] == "tiny"


def test_openapi_and_docs_describe_the_api_without_a_token(stack):
    c = stack["client"]
    doc = c.get("/openapi.json")
    assert doc.status_code == 200
    body = doc.json()["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    docs = c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_eval_cli_default_decoding_equals_the_server(stack, tmp_path, capsys):
    """`cold-ray eval` without --alpha/--beta evaluates the decoding the server gives a request
    that omits `cold`: CoLD at the tuned knobs for a0, plain for a1 (cold_enabled=false)."""
    from cold_ray.cli import main

    data = tmp_path / "task.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"{i} + 1 =", "answer": f"#### {i + 1}"}) + "\n"
            for i in range(2)
        )
    )
    seen = set()
    for name in ("a0", "a1"):
        served = complete(stack, model=name).json()["cold"]
        rc = main(
            [
                "eval",
                "--adapter",
                name,
                "--registry",
                stack["cfg"].registry,
                "--model",
                str(stack["model"]),
                "--data",
                str(data),
                "--max-model-len",
                "200",
                "--max-rows",
                "4",
                "--max-tokens",
                "2",
                "--no-base",
                "--json",
                "--no-progress",
            ]
        )
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        evaluated = [(r["alpha"], r["beta"]) for r in out["results"] if r["mode"] == "cold"]
        want = [] if served["decoding"] == "plain" else [(served["alpha"], served["beta"])]
        assert evaluated == want, (name, served, out["results"])
        seen.add(served["decoding"])
    assert seen == {"cold", "plain"}  # both branches of the rule were compared


# ---- hostile input ------------------------------------------------------------------------

BIG = "x " * 20000  # > CTX tokens of the tiny tokenizer, < the 64 KiB body limit
# (name, method, path, headers, body (dict → JSON, bytes → raw), status)
HOSTILE = [
    ("malformed json", "POST", "/v1/completions", CLIENT | JSON, b"{prompt: x}", 400),
    ("truncated json", "POST", "/v1/completions", CLIENT | JSON, b'{"prompt": "x", ', 400),
    ("invalid utf-8", "POST", "/v1/completions", CLIENT | JSON, b'{"prompt": "\xff\xfe"}', 400),
    ("json array", "POST", "/v1/completions", CLIENT | JSON, b"[1, 2]", 400),
    ("empty body", "POST", "/v1/completions", CLIENT | JSON, b"", 400),
    (
        "max_tokens string",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "max_tokens": "9"},
        422,
    ),
    (
        "max_tokens float",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "max_tokens": 2.5},
        422,
    ),
    ("max_tokens zero", "POST", "/v1/completions", CLIENT, {"prompt": "x", "max_tokens": 0}, 422),
    (
        "max_tokens negative",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "max_tokens": -1},
        422,
    ),
    (
        "max_tokens over limit",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "max_tokens": LIMIT + 1},
        422,
    ),
    (
        "max_tokens huge",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "max_tokens": 10**40},
        422,
    ),
    (
        "temperature NaN",
        "POST",
        "/v1/completions",
        CLIENT | JSON,
        b'{"prompt": "x", "temperature": NaN}',
        422,
    ),
    (
        "alpha inf",
        "POST",
        "/v1/completions",
        CLIENT | JSON,
        b'{"model": "a0", "prompt": "x", "cold": {"alpha": Infinity}}',
        422,
    ),
    (
        "alpha zero",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "a0", "prompt": "x", "cold": {"alpha": 0}},
        422,
    ),
    (
        "alpha above one",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "a0", "prompt": "x", "cold": {"alpha": 1.01}},
        422,
    ),
    (
        "beta negative",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "a0", "prompt": "x", "cold": {"beta": -0.1}},
        422,
    ),
    (
        "beta over limit",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "a0", "prompt": "x", "cold": {"beta": 1e6}},
        422,
    ),
    (
        "cold wrong type",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "a0", "prompt": "x", "cold": "yes"},
        422,
    ),
    ("unknown adapter", "POST", "/v1/completions", CLIENT, {"model": "nope", "prompt": "x"}, 404),
    (
        "traversal adapter",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "../../etc/passwd", "prompt": "x"},
        404,
    ),
    (
        "cold on base",
        "POST",
        "/v1/completions",
        CLIENT,
        {"model": "tiny", "prompt": "x", "cold": True},
        400,
    ),
    (
        "cold knobs on base",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "cold": {"beta": 1}},
        400,
    ),
    ("prompt over context", "POST", "/v1/completions", CLIENT, {"prompt": BIG}, 400),
    (
        "prompt+max_tokens over",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x " * 200, "max_tokens": LIMIT},
        400,
    ),
    ("empty prompt", "POST", "/v1/completions", CLIENT, {"prompt": ""}, 400),
    ("whitespace prompt", "POST", "/v1/completions", CLIENT, {"prompt": "  \n\t "}, 400),
    ("token id past vocab", "POST", "/v1/completions", CLIENT, {"prompt": [5, 10**6]}, 400),
    ("batched prompts", "POST", "/v1/completions", CLIENT, {"prompt": ["a", "b"]}, 400),
    (
        "too many stops",
        "POST",
        "/v1/completions",
        CLIENT,
        {"prompt": "x", "stop": [str(i) for i in range(17)]},
        422,
    ),
    ("n=2", "POST", "/v1/completions", CLIENT, {"prompt": "x", "n": 2}, 400),
    ("logprobs over 20", "POST", "/v1/completions", CLIENT, {"prompt": "x", "logprobs": 21}, 422),
    (
        "top_logprobs without logprobs",
        "POST",
        "/v1/chat/completions",
        CLIENT,
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
    ),
    ("oversized body", "POST", "/v1/completions", CLIENT, {"prompt": "y" * 70_000}, 413),
    ("no token", "POST", "/v1/completions", {}, {"prompt": "x"}, 401),
    (
        "wrong token",
        "POST",
        "/v1/completions",
        {"Authorization": "Bearer nope"},
        {"prompt": "x"},
        401,
    ),
    ("not bearer", "GET", "/v1/models", {"Authorization": API_KEY}, None, 401),
    (
        "registry write, client token",
        "POST",
        "/v1/adapters",
        CLIENT,
        {"name": "z", "source": "/tmp"},
        403,
    ),
    ("registry write, no token", "DELETE", "/v1/adapters/a0", {}, None, 401),
    ("chat without messages", "POST", "/v1/chat/completions", CLIENT, {"messages": []}, 422),
    (
        "chat bad role",
        "POST",
        "/v1/chat/completions",
        CLIENT,
        {"messages": [{"role": "root", "content": "x"}]},
        422,
    ),
    (
        "chat with tools",
        "POST",
        "/v1/chat/completions",
        CLIENT,
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
    ),
    ("unknown route", "GET", "/v1/nothing", CLIENT, None, 404),
    ("wrong method", "GET", "/v1/completions", CLIENT, None, 405),
    (
        "adapter name traversal",
        "POST",
        "/v1/adapters",
        ADMIN,
        {"name": "../x", "source": "/tmp"},
        400,
    ),
    (
        "adapter outside roots",
        "POST",
        "/v1/adapters",
        ADMIN,
        {"name": "etc", "source": "/etc"},
        400,
    ),
    (
        "adapter extra field",
        "POST",
        "/v1/adapters",
        ADMIN,
        {"name": "q", "source": "/tmp", "x": 1},
        422,
    ),
    # what a web page can make a browser send without a CORS preflight, or after DNS rebinding
    ("no content type", "POST", "/v1/completions", CLIENT, b'{"prompt": "x"}', 415),
    (
        "text/plain body",
        "POST",
        "/v1/completions",
        CLIENT | {"Content-Type": "text/plain"},
        b'{"prompt": "x"}',
        415,
    ),
    (
        "form body",
        "POST",
        "/v1/chat/completions",
        CLIENT | {"Content-Type": "application/x-www-form-urlencoded"},
        b"messages=x",
        415,
    ),
    (
        "registry write, text/plain",
        "POST",
        "/v1/adapters",
        ADMIN | {"Content-Type": "text/plain;charset=UTF-8"},
        b'{"name": "z", "source": "/tmp"}',
        415,
    ),
    ("rebound host", "GET", "/v1/models", CLIENT | {"Host": "attacker.example"}, None, 421),
    (
        "rebound host, write",
        "POST",
        "/v1/adapters",
        ADMIN | {"Host": "attacker.example:8000"},
        {"name": "z", "source": "/tmp"},
        421,
    ),
    (
        "loopback lookalike host",
        "POST",
        "/v1/completions",
        CLIENT | {"Host": "127.0.0.1.attacker.example"},
        {"prompt": "x"},
        421,
    ),
]


def send(client, method, path, headers, body):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    return client.request(method, path, headers=headers, **(kwargs if body is not None else {}))


@pytest.mark.parametrize(
    "name,method,path,headers,body,status", HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_input_gets_openai_error(stack, name, method, path, headers, body, status):
    assert_openai_error(send(stack["client"], method, path, headers, body), status)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LocalHost."])
def test_loopback_host_names_are_served(stack, host):
    """The default Host allow-list: loopback names, with or without the port."""
    port = stack["url"].rsplit(":", 1)[1]
    for name in (host, f"{host}:{port}"):
        r = stack["client"].get("/v1/models", headers=CLIENT | {"Host": name})
        assert r.status_code == 200, (name, r.text)


@pytest.mark.parametrize(
    "ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_json_bodies_are_served(stack, ctype):
    r = stack["client"].post(
        "/v1/completions",
        content=b'{"prompt": "x", "max_tokens": 2}',
        headers=CLIENT | {"Content-Type": ctype},
    )
    assert r.status_code == 200, r.text


def test_cors_and_host_names_as_the_args_say(stack):
    """The /ovl app lists `cors_origins: [https://app.example]` and `allowed_hosts:
    [cold.example]`: that origin's page gets its preflight granted, no other does, and the
    listed name is served beside the loopback ones."""
    c = stack["client"]
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    granted = c.options("/ovl/v1/completions", headers=ask | {"Origin": APP_ORIGIN})
    assert granted.status_code == 200, granted.text
    assert granted.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "authorization" in granted.headers["access-control-allow-headers"].lower()
    refused = c.options("/ovl/v1/completions", headers=ask | {"Origin": "https://attacker.example"})
    assert "access-control-allow-origin" not in refused.headers
    r = c.get("/ovl/v1/models", headers=CLIENT | {"Origin": APP_ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    for host, status in (
        ("cold.example", 200),
        ("cold.example:443", 200),
        ("localhost", 200),
        ("other.example", 421),
    ):
        r = c.get("/ovl/v1/models", headers=CLIENT | {"Host": host})
        assert r.status_code == status, (host, r.text)


def test_no_cors_headers_unless_configured(stack):
    """No `cors_origins` in the args: a preflight from a web page gets no CORS grant, so the
    browser sends nothing that needs one (a JSON body, an Authorization header)."""
    page = {"Origin": "https://attacker.example"}
    pre = stack["client"].options(
        "/v1/completions",
        headers=page
        | {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert "access-control-allow-origin" not in pre.headers
    r = complete(stack, headers=CLIENT | page)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_pickled_adapter_is_refused(stack):
    body = {"name": "pickled", "source": str(stack["uploads"] / "pickled")}
    err = assert_openai_error(stack["client"].post("/v1/adapters", json=body, headers=ADMIN), 422)
    assert "pickle" in err["message"]


def test_oversized_chunked_body_is_413(stack):
    def chunks():
        for _ in range(40):
            yield b"x" * 4096

    r = stack["client"].post("/v1/completions", content=chunks(), headers=CLIENT | JSON)
    assert_openai_error(r, 413)


def test_replica_still_serves_after_hostile_input(stack):
    before = complete(stack, model="a0").headers["x-cold-replica"]
    for _name, method, path, headers, body, _status in HOSTILE:
        send(stack["client"], method, path, headers, body)
    r = complete(stack, model="a0")
    assert r.status_code == 200 and r.headers["x-cold-replica"] == before
    assert engine_stats()["running_rows"] == 0


# ---- disconnects and backpressure ---------------------------------------------------------


def test_client_disconnect_frees_rows(stack):
    tokens0 = engine_stats()["generated_tokens"]
    body = {
        "model": "a0",
        "prompt": PROMPT,
        "max_tokens": LIMIT,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=stack["url"], timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body, headers=CLIENT) as r:
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(json.loads(line[len("data: ") :]))
                if len(chunks) >= 5:
                    break
            assert chunks[-1]["choices"][0]["finish_reason"] is None  # still decoding
    # the client is gone: its rows are freed long before LIMIT tokens are generated (the
    # finished request would have added LIMIT)
    wait_for(lambda: engine_stats()["running_rows"] == 0, timeout=15, what="rows freed")
    assert engine_stats()["generated_tokens"] - tokens0 < LIMIT // 2
    assert complete(stack, model="a0").status_code == 200


def test_full_queue_answers_503_quickly(stack):
    """Engine: max_ongoing_requests=1, max_queued_requests=1 (the /ovl app)."""
    long_body = {
        "model": "a0",
        "prompt": PROMPT,
        "max_tokens": LIMIT,
        "ignore_eos": True,
        "stream": True,
    }
    results = []

    def short():
        t0 = time.monotonic()
        with httpx.Client(base_url=stack["url"], timeout=120) as c:
            r = complete(stack | {"client": c}, path="/ovl/v1/completions", max_tokens=4)
        results.append((r, time.monotonic() - t0))

    with httpx.Client(base_url=stack["url"], timeout=60) as c:
        with c.stream("POST", "/ovl/v1/completions", json=long_body, headers=CLIENT) as busy:
            assert busy.status_code == 200
            # Keep the iterator: a discarded one is closed at once, and closing it closes the
            # connection — the proxy would cancel the long request.
            lines = busy.iter_lines()
            assert next(lines).startswith("data: ")  # the long request runs in the only slot
            threads = [threading.Thread(target=short) for _ in range(3)]
            for t in threads:
                t.start()
            try:
                rejected = wait_for(
                    lambda: [x for x in results if x[0].status_code == 503],
                    timeout=60,
                    what="a 503",
                )
            except AssertionError as e:
                seen = [(x[0].status_code, round(x[1], 1)) for x in results]
                raise AssertionError(f"{e}; finished: {seen}") from None
            assert next(x for x in lines if x).startswith("data: ")  # and it still runs
    for t in threads:
        t.join(timeout=60)
    r, seconds = rejected[0]
    err = assert_openai_error(r, 503)
    assert err["type"] == "overloaded_error" and r.headers.get("retry-after")
    assert seconds < 10, f"503 took {seconds:.1f}s"
    assert {x[0].status_code for x in results} <= {200, 503}
    assert any(x[0].status_code == 200 for x in results)  # the queued one ran after the long one
    wait_for(lambda: engine_stats("ovl")["running_rows"] == 0, timeout=15, what="ovl rows freed")


# ---- metrics ------------------------------------------------------------------------------


def test_prometheus_metrics_are_exported(stack):
    want = [
        "cold_generated_tokens",
        'decoding="cold"',
        "cold_engine_requests",
        "cold_running_rows",
        "cold_waiting_requests",
        "cold_kv_cache_usage",
        "cold_adapter_loads",
        "cold_adapter_load_seconds",
        "cold_time_to_first_token_seconds",
        "cold_inter_token_latency_seconds",
    ]

    def scrape():
        try:
            text = urllib.request.urlopen(stack["metrics"], timeout=5).read().decode()
        except OSError:
            return None
        return text if all(w in text for w in want) else None

    text = wait_for(scrape, timeout=60, interval=1, what="metrics")
    assert 'adapter="a0"' in text


def test_logs_never_contain_tokens(stack):
    """After every request above (tokens right, wrong and missing), no Ray log has a token."""
    import ray

    logs = ray._private.worker._global_node.get_session_dir_path()
    leaks = []
    for root, _dirs, files in os.walk(logs):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if API_KEY.encode() in data or ADMIN_KEY.encode() in data:
                leaks.append(path)
    assert not leaks, leaks


def test_engine_replica_killed_mid_stream(stack):
    """Last (it replaces the replica): the client gets an SSE error event and [DONE] at once,
    not a hang; Serve starts a new replica and requests succeed again."""
    import signal

    from ray import serve

    info = serve.get_deployment_handle("ColdEngine", app_name="api").info.remote().result()
    body = {
        "model": "a0",
        "prompt": PROMPT,
        "max_tokens": LIMIT,
        "ignore_eos": True,
        "stream": True,
    }
    events = []
    with stack["client"].stream("POST", "/v1/completions", json=body, headers=CLIENT) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: ") :])
            if len(events) == 3:
                os.kill(info["pid"], signal.SIGKILL)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "engine_failed" and len(events) < LIMIT // 2
    r = wait_for(
        lambda: (x := complete(stack, model="a0")).status_code == 200 and x,
        timeout=120,
        interval=1,
        what="a replacement replica",
    )
    assert r.headers["x-cold-replica"] != info["replica"]
