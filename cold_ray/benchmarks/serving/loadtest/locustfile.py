"""Locust users for cold-ray's OpenAI-compatible API.

Each simulated user sends one request after another (closed loop; `--think-time` or
`--rps-per-user` open it up): completions or chat completions, streamed or not, CoLD or plain,
on an adapter drawn from the shared workload generator
(`cold_ray.benchmarks.workloads.adapter_mix`), with prompt and output lengths drawn from
`--prompt-tokens` / `--max-tokens` distributions (`fixed:N`, `uniform:LO:HI`,
`normal:MEAN:STD`, `lognormal:MEDIAN:SIGMA`, `choice:A,B`).
`--prompt-mode fewshot` sends prompts that share one few-shot prefix (`--shots` worked
examples, then a different question each), `--prompt-mode system` chat requests that share one
long system prompt: the mixes a prefix cache is for (`bench serving --scenario prefix`
measures the same prompts in-process).

Besides Locust's request time it reports two custom metrics through request events:
`TTFT` (time to the first streamed token) and `ITL` (each gap between streamed chunks). With
`--records PATH` every finished request is also appended to PATH as one JSON line (see
`cold_ray.benchmarks.serving.loadtest.stats`), from which `cold-ray loadtest` computes exact
percentiles and tokens/s.

Run it through `cold-ray loadtest` (which starts the service and writes the report), or by
hand — in a process of its own: gevent must patch the standard library before torch, ray or
transformers are imported (otherwise a RecursionError in ssl):

    locust -f cold_ray/benchmarks/serving/loadtest/locustfile.py --headless -u 8 -r 8 -t 30s \
        --host http://127.0.0.1:8000 --mix zipf --cold-fraction 0.5 --stream-fraction 1 --max-tokens fixed:64
"""

from __future__ import annotations

import itertools
import json
import random
import time

import requests
from locust import User, constant_throughput, events, task

from cold_ray.benchmarks.serving.loadtest.options import add_workload_args
from cold_ray.benchmarks.serving.loadtest.stats import LengthDist, request_prompt
from cold_ray.benchmarks.workloads import adapter_mix


@events.init_command_line_parser.add_listener
def _options(parser):
    add_workload_args(parser, locust=True)


_user_ids = itertools.count()  # seeds each user's draws: a rerun sends the same requests


class _Shared:
    """Per-process state: the adapter list, the shared adapter sequence, the records file."""

    base: str | None = None
    adapters: list[str] = []
    sequence = None  # itertools.cycle of adapter slots (-1 = base model)
    records = None  # open file or None

    @classmethod
    def setup(cls, host: str, opts) -> None:
        if cls.sequence is not None:
            return
        models = requests.get(f"{host}/v1/models", timeout=30).json()["data"]
        cls.base = models[0]["id"]
        if opts.adapters:
            cls.adapters = [a for a in opts.adapters.split(",") if a]
        else:
            cls.adapters = [m["id"] for m in models[1:] if m.get("parent")]
        kind = opts.mix if cls.adapters else "all_base"
        # One sequence for the whole process, so the aggregate mix is the generator's exactly
        # (and `identical` means one hot adapter for every user, not one per user).
        mix = adapter_mix(kind, 4096, len(cls.adapters), seed=opts.workload_seed)
        cls.sequence = itertools.cycle(mix)


@events.test_start.add_listener
def _open_records(environment, **_):
    path = environment.parsed_options.records
    if path and _Shared.records is None:
        _Shared.records = open(path, "a", buffering=1)  # noqa: SIM115 - closed at test_stop


@events.quitting.add_listener
def _close_records(environment, **_):
    if _Shared.records is not None:
        _Shared.records.close()
        _Shared.records = None


class LLMUser(User):
    """One client of the OpenAI-compatible API (completions + chat, stream and not)."""

    def wait_time(self):
        opts = self.environment.parsed_options
        if opts.rps_per_user > 0:
            return constant_throughput(opts.rps_per_user)(self)
        return opts.think_time

    def on_start(self):
        opts = self.environment.parsed_options
        _Shared.setup(self.host.rstrip("/"), opts)
        self.opts = opts
        self.rng = random.Random(opts.workload_seed * 100_003 + next(_user_ids))
        self.prompt_len = LengthDist(opts.prompt_tokens)
        self.max_tokens = LengthDist(opts.max_tokens)
        self.session = requests.Session()

    def on_stop(self):
        self.session.close()

    @task
    def generate(self):
        opts, rng = self.opts, self.rng
        slot = next(_Shared.sequence)
        model = _Shared.base if slot < 0 else _Shared.adapters[slot]
        if slot < 0:
            decoding = "base"
        else:
            decoding = "cold" if rng.random() < opts.cold_fraction else "plain"
        chat = rng.random() < opts.chat_fraction or opts.prompt_mode == "system"
        stream = rng.random() < opts.stream_fraction
        length = self.prompt_len.sample(rng) if opts.prompt_mode == "random" else 0
        prompt = request_prompt(opts.prompt_mode, rng, length, chat, opts.shots)
        body: dict = {
            "model": model,
            "max_tokens": self.max_tokens.sample(rng),
            "temperature": 0.0,
            "stream": stream,
            **prompt,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if decoding == "cold":
            body["cold"] = {"alpha": opts.alpha, "beta": opts.beta}
        elif decoding == "plain":
            body["cold"] = False
        if opts.ignore_eos:
            body["ignore_eos"] = True
        endpoint = "chat" if chat else "completions"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        name = f"{endpoint} {decoding}{' stream' if stream else ''}"
        record = {
            "endpoint": endpoint,
            "stream": stream,
            "decoding": decoding,
            "model": model,
            "status": 0,
            "ok": False,
            "error": None,
            "ttft_ms": None,
            "itl_ms": [],
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        start_perf, record["t_start"] = time.perf_counter(), time.time()
        try:
            self._send(path, body, chat, stream, record, start_perf)
        except Exception as e:  # noqa: BLE001 - every client-side failure is a failed request
            record["error"] = record["error"] or f"{type(e).__name__}: {e}"
        record["latency_ms"] = (time.perf_counter() - start_perf) * 1000
        record["t_end"] = time.time()
        record["ok"] = record["error"] is None
        fire = self.environment.events.request.fire
        failure = None if record["ok"] else RuntimeError(f"{record['status']}: {record['error']}")
        fire(
            request_type="POST",
            name=name,
            response_time=record["latency_ms"],
            response_length=record["completion_tokens"],
            exception=failure,
            context={},
        )
        if record["ok"] and record["ttft_ms"] is not None:
            fire(
                request_type="TTFT",
                name=name,
                response_time=record["ttft_ms"],
                response_length=0,
                exception=None,
                context={},
            )
            for gap in record["itl_ms"]:
                fire(
                    request_type="ITL",
                    name=name,
                    response_time=gap,
                    response_length=0,
                    exception=None,
                    context={},
                )
        if _Shared.records is not None:
            _Shared.records.write(json.dumps(record) + "\n")

    def _send(self, path: str, body: dict, chat: bool, stream: bool, record: dict, t0: float):
        url = self.host.rstrip("/") + path
        with self.session.post(
            url, json=body, stream=stream, timeout=self.opts.request_timeout
        ) as resp:
            record["status"] = resp.status_code
            if resp.status_code != 200:
                record["error"] = _error_message(resp)
                return
            if not stream:
                data = resp.json()
                usage = data.get("usage") or {}
                record["prompt_tokens"] = usage.get("prompt_tokens", 0)
                record["completion_tokens"] = usage.get("completion_tokens", 0)
                return
            chunks, last = 0, None
            for line in resp.iter_lines(chunk_size=None):  # as they arrive
                if not line or not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    record["error"] = f"in-stream error: {event['error']}"
                    return
                if event.get("usage"):
                    record["prompt_tokens"] = event["usage"].get("prompt_tokens", 0)
                    record["completion_tokens"] = event["usage"].get("completion_tokens", 0)
                choices = event.get("choices") or []
                text = ""
                if choices:
                    text = (
                        (choices[0].get("delta") or {}).get("content") or ""
                        if chat
                        else (choices[0].get("text") or "")
                    )
                if not text:
                    continue
                now = time.perf_counter()
                if last is None:
                    record["ttft_ms"] = (now - t0) * 1000
                else:
                    record["itl_ms"].append((now - last) * 1000)
                last = now
                chunks += 1
            if not record["completion_tokens"]:
                record["completion_tokens"] = chunks  # no usage chunk: one token per chunk


def _error_message(resp) -> str:
    try:
        return str(resp.json()["error"]["message"])[:200]
    except Exception:  # noqa: BLE001 - not OpenAI-shaped: keep the raw start
        return resp.text[:200]
