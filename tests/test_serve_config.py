"""Serve configs, argument validation, body parsing and startup registration — no Ray needed."""

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from cold_ray.serve.app_args import AppArgs
from cold_ray.serve.cli import validate_file
from cold_ray.serve.errors import from_validation_error
from cold_ray.serve.schemas import ChatCompletionRequest, CompletionRequest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cold.yaml", "cold-gpu.yaml", "cold-npu.yaml", "kuberay/rayservice.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_deployment_configs_validate(name):
    assert validate_file(str(ROOT / "deployments" / name)) == []


def test_configs_pin_devices():
    def engine(name):
        doc = yaml.safe_load((ROOT / "deployments" / name).read_text())
        app = doc["applications"][0]
        dep = next(d for d in app["deployments"] if d["name"] == "ColdEngine")
        return app["args"], dep

    args, dep = engine("cold.yaml")
    assert args["engine"]["device"] == "cpu" and dep["ray_actor_options"]["num_cpus"] >= 1
    assert dep["max_queued_requests"] > 0 and "autoscaling_config" in dep
    args, dep = engine("cold-gpu.yaml")
    assert args["engine"]["device"] == "cuda" and dep["ray_actor_options"]["num_gpus"] == 1
    args, dep = engine("cold-npu.yaml")
    assert args["engine"]["device"] == "npu" and dep["ray_actor_options"]["resources"] == {"NPU": 1}


def test_invalid_config_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "applications:\n  - name: x\n    import_path: cold_ray.serve:build_app\n"
        "    args: {engine: {device: tpu, max_rows: 1}, colour: red}\n"
    )
    problems = validate_file(str(bad))
    assert len(problems) == 1
    assert "device" in problems[0] and "max_rows" in problems[0] and "colour" in problems[0]


@pytest.mark.parametrize(
    "args,needle",
    [
        ({"max_tokens_limit": 2000, "engine": {"max_model_len": 1024}}, "max_tokens_limit 2000"),
        ({"engine": {"max_rows": 1}}, "max_rows"),
        ({"engine": {"dtype": "int8"}}, "dtype"),
        ({"max_rows": 4}, "max_rows moved under `engine:`"),
        ({"adapters": [{"name": "x"}]}, "source"),
    ],
)
def test_app_args_errors_name_the_field(args, needle):
    with pytest.raises(ValidationError, match=needle):
        AppArgs.model_validate(args)


# (body, status, param) — what the HTTP layer answers before anything reaches an engine
BODIES = [
    (b"{bad", 400, None),
    (b"\xff\xfe\x00", 400, None),
    (b"[1, 2]", 400, None),
    (b"[" * 5000, 400, None),
    (b'{"prompt": "x", "max_tokens": "10"}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 1.5}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 0}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": -3}', 422, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
    (b'{"prompt": "x", "temperature": NaN}', 422, "temperature"),
    (b'{"prompt": "x", "temperature": 1e999}', 422, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 422, "top_p"),
    (b'{"prompt": "x", "cold": {"alpha": 0}}', 422, "cold.alpha"),
    (b'{"prompt": "x", "cold": {"alpha": 1.5}}', 422, "cold.alpha"),
    (b'{"prompt": "x", "cold": {"beta": -1}}', 422, "cold.beta"),
    (b'{"prompt": "x", "cold": {"beta": 1e300}}', 422, "cold.beta"),  # over decoding.MAX_BETA
    (b'{"prompt": "x", "cold": {"alpha": Infinity}}', 422, "cold.alpha"),
    (b'{"prompt": "x", "cold": {"gamma": 1}}', 422, "cold.gamma"),
    (b'{"prompt": "x", "cold": "yes"}', 422, "cold"),
    (b'{"prompt": 5}', 422, "prompt"),
    (b'{"prompt": [1, -2]}', 422, "prompt.1"),
    (b'{"prompt": "x", "stop": [""]}', 422, "stop.0"),
    (b'{"max_tokens": 5}', 422, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BODIES)
def test_bad_bodies_map_to_status(body, status, param):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(body)
    err = from_validation_error(info.value)
    assert (err.status, err.param) == (status, param), err.message
    shaped = err.body()["error"]
    assert set(shaped) == {"message", "type", "code", "param"} and shaped["message"]


def test_bodies_that_parse():
    r = CompletionRequest.model_validate_json(
        b'{"model": "a", "prompt": ["hi"], "cold": {"beta": 0.2}, "user": "u", "extra": 1}'
    )
    assert r.single_prompt() == "hi" and r.cold.beta == 0.2 and r.cold.alpha is None
    assert CompletionRequest.model_validate_json(b'{"prompt": [[1, 2]]}').single_prompt() == [1, 2]
    with pytest.raises(ValueError, match="batched"):
        CompletionRequest.model_validate_json(b'{"prompt": ["a", "b"]}').single_prompt()
    assert CompletionRequest.model_validate_json(b'{"prompt": "x", "n": 2}').unsupported()
    assert CompletionRequest.model_validate_json(b'{"prompt": "x", "cold": false}').cold is False
    chat = ChatCompletionRequest.model_validate_json(
        b'{"messages": [{"role": "developer", "content": [{"type": "text", "text": "be"}]},'
        b' {"role": "user", "content": "hi"}], "max_completion_tokens": 7, "max_tokens": 3}'
    )
    assert chat.limit() == 7
    assert chat.chat() == [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "field,active",
    [
        ("min_tokens", 5),
        ("min_p", 0.05),
        ("repetition_penalty", 1.3),
        ("use_beam_search", True),
        ("include_stop_str_in_output", True),
        ("skip_special_tokens", False),
        ("truncate_prompt_tokens", 8),
        ("allowed_token_ids", [1, 2]),
        ("bad_words", ["x"]),
        ("guided_json", {"type": "object"}),
        ("guided_regex", "a+"),
        ("guided_choice", ["a", "b"]),
        ("guided_grammar", "root ::= x"),
        ("structured_outputs", {"regex": "a"}),
    ],
)
def test_vllm_sampling_extensions_are_refused_unless_they_ask_for_nothing(field, active):
    """A vLLM client's min_tokens or guided_json must not be dropped as an unknown field."""
    from cold_ray.serve.schemas import VLLM_NO_OPS

    for schema, base in (
        (CompletionRequest, {"prompt": "x"}),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}),
    ):
        why = schema.model_validate_json(json.dumps({**base, field: active})).unsupported()
        assert why is not None and why.startswith(f"{field} is not supported"), why
        for idle in VLLM_NO_OPS[field]:  # the values that ask for nothing pass
            idle_body = json.dumps({**base, field: idle})
            assert schema.model_validate_json(idle_body).unsupported() is None
        assert schema.model_validate_json(json.dumps(base)).unsupported() is None


TOOLS = [{"type": "function", "function": {"name": "f"}}]


@pytest.mark.parametrize(
    "extra,refused",
    [
        ({"tools": TOOLS}, "tools"),
        ({"tools": TOOLS, "tool_choice": "auto"}, "tools"),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format 'json_object'"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "json_schema"),
        ({"tools": TOOLS, "tool_choice": "none"}, None),
        ({"tools": [], "tool_choice": "auto", "response_format": {"type": "text"}}, None),
    ],
)
def test_chat_refuses_tools_and_structured_output_rather_than_ignoring_them(extra, refused):
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    why = ChatCompletionRequest.model_validate_json(json.dumps(body)).unsupported()
    assert (why is None) if refused is None else (refused in why), why


def test_startup_adapters_register_once_and_follow_weight_changes(
    tmp_path, tiny_llama, tiny_adapters
):
    import shutil

    from cold_ray.adapters.registry import Registry
    from cold_ray.model.loader import read_model_args
    from cold_ray.serve.app import register_startup_adapters

    src = tmp_path / "demo"
    shutil.copytree(tiny_adapters[0], src)
    cfg = AppArgs(
        registry=str(tmp_path / "reg.sqlite"),
        adapters=[
            {"name": "demo", "source": str(src)},
            {"name": "gone", "source": str(tmp_path / "missing"), "required": False},
        ],
        engine=dict(model=str(tiny_llama), max_lora_rank=8),
    )
    args = read_model_args(tiny_llama)
    register_startup_adapters(cfg, args)
    reg = Registry(cfg.registry_path())
    first = reg.get("demo")
    assert "gone" not in reg
    reg.set_tuned("demo", 0.2, 0.9)  # e.g. `cold-ray eval tune`
    register_startup_adapters(cfg, args)  # unchanged: kept as is, tuning included
    assert reg.get("demo").created_at == first.created_at and reg.get("demo").alpha == 0.2
    shutil.copy(tiny_adapters[1] / "adapter_model.safetensors", src / "adapter_model.safetensors")
    register_startup_adapters(cfg, args)  # retrained: re-registered, tuning kept
    again = reg.get("demo")
    assert again.sha256 != first.sha256 and (again.alpha, again.beta) == (0.2, 0.9)
    cfg.adapters[1].required = True
    with pytest.raises(RuntimeError, match="startup adapter 'gone'"):
        register_startup_adapters(cfg, args)


def test_tokens(monkeypatch):
    from cold_ray.serve.auth import Tokens
    from cold_ray.serve.errors import APIError

    def status(tokens, header, admin=False):
        try:
            tokens.check(header, admin)
        except APIError as e:
            return e.status
        return 200

    monkeypatch.setenv("T_API", "c-secret")
    monkeypatch.setenv("T_ADMIN", "a-secret")
    both = Tokens("T_API", "T_ADMIN")
    assert "secret" not in repr(both)
    assert status(both, "") == 401 and status(both, "Bearer nope") == 401
    assert status(both, "c-secret") == 401  # not a bearer header
    assert status(both, "Bearer c-secret") == 200 and status(both, "bearer  a-secret") == 200
    assert status(both, "Bearer c-secret", admin=True) == 403
    assert status(both, "Bearer a-secret", admin=True) == 200
    assert status(both, "", admin=True) == 401
    open_ = Tokens("T_UNSET", "T_UNSET2")
    assert status(open_, "") == 200 and status(open_, "", admin=True) == 200
    client_only = Tokens("T_API", "T_UNSET")  # a client token never opens registry writes
    assert status(client_only, "Bearer c-secret", admin=True) == 403
    assert status(client_only, "", admin=True) == 403
    assert status(client_only, "Bearer c-secret") == 200
    admin_only = Tokens("T_UNSET", "T_ADMIN")
    assert status(admin_only, "") == 200 and status(admin_only, "", admin=True) == 401
    assert status(admin_only, "Bearer a-secret", admin=True) == 200


BOTH = {"T_API": "c", "T_ADMIN": "a"}


@pytest.mark.parametrize(
    "host,args,env,missing",
    [
        ("127.0.0.1", {}, {}, []),
        ("localhost", {}, {}, []),
        ("::1", {}, {}, []),
        (None, {}, {}, []),  # no HTTP proxy at all
        ("0.0.0.0", {}, {}, ["T_ADMIN", "T_API"]),
        ("::", {}, {}, ["T_ADMIN", "T_API"]),
        ("10.1.2.3", {}, {}, ["T_ADMIN", "T_API"]),
        ("my-host.example", {}, {}, ["T_ADMIN", "T_API"]),  # a name may be any interface's
        ("0.0.0.0", {}, {"T_API": "c"}, ["T_ADMIN"]),  # a client token does not guard writes
        ("0.0.0.0", {}, {"T_ADMIN": "a"}, ["T_API"]),  # nor an admin token completions
        ("0.0.0.0", {}, BOTH, []),
        ("0.0.0.0", {"allow_unauthenticated_admin": True}, {"T_API": "c"}, []),
        ("0.0.0.0", {"admin_api": False}, {"T_API": "c"}, []),
        ("0.0.0.0", {"allow_unauthenticated_clients": True}, {"T_ADMIN": "a"}, []),
        ("0.0.0.0", {"allow_unauthenticated_admin": True}, {}, ["T_API"]),
        ("0.0.0.0", {"allow_unauthenticated_clients": True}, {}, ["T_ADMIN"]),
        (
            "0.0.0.0",
            {"allow_unauthenticated_admin": True, "allow_unauthenticated_clients": True},
            {},
            [],
        ),
    ],
)
def test_exposure_rule(monkeypatch, host, args, env, missing):
    """Beyond loopback a server starts only with both tokens, or each missing one opted out
    of on purpose; the refusal names what is missing and how to opt out of it."""
    from cold_ray.serve.app import check_exposure

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = AppArgs(api_key_env="T_API", admin_key_env="T_ADMIN", **args)
    if not missing:
        check_exposure(cfg, host)
        return
    with pytest.raises(RuntimeError) as err:
        check_exposure(cfg, host)
    message = str(err.value)
    assert repr(host) in message and f"Set {' and '.join(missing)} " in message
    assert ("allow_unauthenticated_admin: true" in message) == ("T_ADMIN" in missing)
    assert ("allow_unauthenticated_clients: true" in message) == ("T_API" in missing)


def test_validate_notes_exposed_configs(tmp_path):
    notes: list[str] = []
    assert validate_file(str(ROOT / "deployments" / "cold-gpu.yaml"), notes) == []
    assert len(notes) == 1 and "'0.0.0.0'" in notes[0] and "COLD_RAY_ADMIN_KEY" in notes[0]
    notes.clear()
    assert validate_file(str(ROOT / "deployments" / "cold.yaml"), notes) == [] and notes == []


def _resolve(doc: dict, ref: str) -> dict:
    node = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_openapi_describes_the_request_bodies():
    """/openapi.json declares the bodies the routes parse by hand, every reference resolves,
    and the schemas accept what the API accepts and refuse what it refuses with a 422."""
    import json

    import jsonschema

    from cold_ray.serve.ingress import app

    doc = app.openapi()
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(doc))
    assert refs and all(_resolve(doc, r) for r in refs)
    bodies = {}
    for path, model in [
        ("/v1/completions", "CompletionRequest"),
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/adapters", "AdapterCreate"),
    ]:
        op = doc["paths"][path]["post"]
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"} and op["security"]
        assert "ErrorResponse" in json.dumps(op["responses"]["4XX"])
        bodies[path] = {**_resolve(doc, schema["$ref"]), "components": doc["components"]}
    assert "prompt" in bodies["/v1/completions"]["required"]
    assert "cold" in bodies["/v1/completions"]["properties"]
    assert "messages" in bodies["/v1/chat/completions"]["required"]
    assert {"name", "source"} <= set(bodies["/v1/adapters"]["required"])
    ok = [
        ("/v1/completions", {"prompt": "x", "cold": {"alpha": 0.2}, "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/adapters", {"name": "a", "source": "/x", "beta": 0.5}),
    ]
    bad = [
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
        ("/v1/completions", {"prompt": "x", "cold": {"alpha": 2}}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/adapters", {"name": "a"}),
    ]
    for path, body in ok:
        jsonschema.validate(body, bodies[path])
    for path, body in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(body, bodies[path])


def test_sse_stream_shape():
    import asyncio
    import json

    from cold_ray.decoding import ColdParams, GenerationRequest
    from cold_ray.engine.request import RequestOutput
    from cold_ray.serve.errors import EngineReplicaFailed
    from cold_ray.serve.responses import Call, sse_stream

    def outputs():
        first = RequestOutput("r1", "a", [5], prompt_tokens=3, completion_tokens=1)
        first.served_by = "replica-1"
        held = RequestOutput("r1", "", [6], prompt_tokens=3, completion_tokens=2)  # held back
        last = RequestOutput("r1", "bc", [7], True, "length", 3, 3)
        return [first, held, last]

    async def collect(chat, items):
        async def gen():
            for i in items:
                yield i

        request = GenerationRequest("hi", adapter="a0", cold=ColdParams(0.1, 0.5))
        call = Call(request, gen(), items[0], "m", chat, "hi")
        return [line async for line in sse_stream(call, gen(), include_usage=True)]

    for chat in (False, True):
        lines = asyncio.run(collect(chat, outputs()))
        assert lines[-1] == "data: [DONE]\n\n" and all(line.startswith("data: ") for line in lines)
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert len(chunks) == 3  # the held-back output sends nothing
        assert chunks[0]["cold"] == {"decoding": "cold", "alpha": 0.1, "beta": 0.5}
        assert "cold" not in chunks[1]
        text = [
            c["choices"][0]["delta"]["content"] if chat else c["choices"][0]["text"]
            for c in chunks[:2]
        ]
        assert text == ["a", "bc"]
        assert chunks[1]["choices"][0]["finish_reason"] == "length"
        assert chunks[2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    broken = outputs()[:1] + [RequestOutput("r1", "", [], True, "error")]
    broken[1].error = EngineReplicaFailed("gone")
    failed = asyncio.run(collect(False, broken))
    error = json.loads(failed[1][6:])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_failed"


def test_the_engine_section_is_the_engines_config():
    """`engine:` in the app's args is EngineConfig itself (no copy of its fields to drift): its
    defaults, its checks, and the replica's device put in its place; engine settings at the
    top level say where they moved."""
    from cold_ray.config import EngineConfig

    assert AppArgs().engine == EngineConfig()
    args = AppArgs(engine={"max_rows": 8, "graph_capture": False, "device": "cuda"})
    assert args.engine_config("cuda:1") == EngineConfig(
        max_rows=8, graph_capture=False, device="cuda:1"
    )
    with pytest.raises(ValueError, match="max_rows"):
        AppArgs(engine={"max_rows": 1})
    with pytest.raises(ValueError, match="max_rows, model moved under `engine:`"):
        AppArgs.model_validate({"model": "x", "max_rows": 4})
    with pytest.raises(ValueError, match="max_tokens_limit 64 must be below max_model_len 64"):
        AppArgs(engine={"max_model_len": 64}, max_tokens_limit=64)


def test_a_cancelled_call_is_a_client_that_went_away_not_an_error(caplog):
    """Serve cancels the ingress call of a client that disconnects (mid-stream, a streaming
    response's receive() raises TaskCancelledError): one info line, not an error traceback.
    Anything else stays a logged 500."""
    import asyncio
    import logging

    from ray.exceptions import TaskCancelledError
    from starlette.requests import Request

    from cold_ray.serve.ingress import _unexpected

    request = Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/v1/completions",
            "headers": [],
            "query_string": b"",
        }
    )
    with caplog.at_level(logging.INFO, logger="cold_ray.serve.ingress"):
        gone = asyncio.run(_unexpected(request, TaskCancelledError()))
        failed = asyncio.run(_unexpected(request, ValueError("boom")))
    assert gone.status_code == 499 and failed.status_code == 500
    records = [(r.levelno, r.exc_info is not None, r.getMessage()) for r in caplog.records]
    assert records == [
        (logging.INFO, False, "/v1/completions: the client disconnected"),
        (logging.ERROR, True, "unhandled error on /v1/completions"),
    ]
