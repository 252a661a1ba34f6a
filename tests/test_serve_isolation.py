"""Hostile sampling values beside bystanders, over HTTP: each hostile request gets a 200 or a
clear 4xx, and every bystander (CoLD and plain, greedy and seeded-sampled, streamed) completes
with all its tokens — exactly the tokens it gets when it runs alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cold_ray.serve.app_args import AppArgs
from tests.serve_util import local_ray

pytestmark = pytest.mark.serve

PROMPT = "the quick brown fox"
N = 24  # tokens each bystander must deliver

BYSTANDERS = [
    {"model": "a0", "cold": {"alpha": 0.1, "beta": 0.5}, "temperature": 0},
    {"model": "a0", "cold": False, "temperature": 0},
    {"model": "tiny", "temperature": 0},
    {"model": "a1", "cold": {"alpha": 0.2, "beta": 1.0}, "temperature": 0.8, "seed": 7},
    {"model": "tiny", "temperature": 1.0, "top_p": 0.9, "seed": 11},
]
HOSTILE = [  # (body, acceptable statuses)
    ({"model": "a0", "temperature": 1e-40}, {200}),
    ({"model": "a0", "temperature": 1e30}, {422}),
    ({"model": "a0", "top_p": 1e-12, "seed": 1}, {200}),
    ({"model": "a0", "top_k": 10**9, "seed": 2}, {200}),
    ({"model": "a0", "cold": {"alpha": 1e-300}}, {200}),
    ({"model": "a0", "cold": {"alpha": 1e-300, "beta": 100}, "temperature": 1e-3}, {200}),
    ({"model": "a0", "cold": {"beta": 1e300}}, {422}),
    ({"model": "a0", "cold": {"alpha": 0}}, {422}),
    ({"model": "a0", "cold": {"alpha": -1e-300}}, {422}),
    ({"model": "tiny", "temperature": 100, "seed": 3}, {200}),
    ({"model": "tiny", "top_k": -5}, {422}),
    ({"model": "tiny", "top_p": 0}, {422}),
    ({"model": "tiny", "seed": 2**64}, {422}),
    ({"model": "tiny", "temperature": -0.0, "max_tokens": 1}, {200}),
    ({"model": "tiny", "max_tokens": 1, "stop": ["e", "t", "a", "o", " "]}, {200}),
    ({"model": "tiny", "cold": True}, {400}),
]


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_llama, tiny_adapters):
    from ray import serve

    from cold_ray.serve.app import compose, prepare

    root = tmp_path_factory.mktemp("serve_isolation")
    cfg = AppArgs(
        served_model_name="tiny",
        registry=str(root / "reg.sqlite"),
        adapters=[
            {"name": "a0", "source": str(tiny_adapters[0])},
            {"name": "a1", "source": str(tiny_adapters[1])},
        ],
        engine=dict(
            model=str(tiny_llama),
            max_rows=16,
            max_model_len=256,
            max_lora_rank=8,
            max_loras=2,
            max_prefill_tokens=16,
        ),
    )
    with local_ray() as base:
        prepare(cfg)
        serve.run(
            compose(cfg, {"ray_actor_options": {"num_cpus": 0}}), name="iso", route_prefix="/"
        )
        yield base


def stream(url: str, body: dict) -> tuple[int, list[str], str | None]:
    """(status, text pieces, finish reason) of a streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": N, "ignore_eos": True, **body, "stream": True}
    pieces, finish = [], None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [r.text], None
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return 200, pieces, finish


def test_hostile_values_beside_bystanders(url):
    alone = [stream(url, b) for b in BYSTANDERS]  # each bystander by itself first
    assert all(status == 200 and finish == "length" for status, _, finish in alone), alone
    with ThreadPoolExecutor(len(BYSTANDERS) + len(HOSTILE)) as pool:
        by = [pool.submit(stream, url, b) for b in BYSTANDERS]
        bad = [
            pool.submit(
                httpx.post,
                f"{url}/v1/completions",
                timeout=120,
                json={"prompt": PROMPT, "max_tokens": 8, **body},
            )
            for body, _ in HOSTILE
        ]
        together = [f.result() for f in by]
        hostile = [f.result() for f in bad]
    for (body, ok), r in zip(HOSTILE, hostile):
        assert r.status_code in ok, (body, r.status_code, r.text)
        if r.status_code != 200:
            err = r.json()["error"]
            assert err["message"] and err["code"], (body, err)
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop"), body
    for spec, (status, pieces, finish), (_, want, _) in zip(BYSTANDERS, together, alone):
        assert status == 200 and finish == "length", spec
        assert "".join(pieces) == "".join(want), spec  # the same tokens as alone
