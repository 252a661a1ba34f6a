"""OpenAI-shaped response bodies and SSE chunks, built from the engine deployment's items
(`{"text", "tokens", "finish_reason", "completion_tokens"}`, the first with `"meta"`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from cold_ray.serve.errors import error_body


class Call:
    """One generation in flight: the engine stream plus what the response needs to say."""

    def __init__(self, gen, first: dict, model: str, kind: str):
        self.gen, self.first, self.model, self.kind = gen, first, model, kind
        self.meta = first["meta"]  # replica, decoding, alpha, beta, prompt_tokens
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    def cold(self) -> dict:
        m = self.meta
        return {"decoding": m["decoding"], "alpha": m["alpha"], "beta": m["beta"]}

    def usage(self, completion_tokens: int) -> dict:
        prompt = self.meta["prompt_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}  # fmt: skip

    def headers(self, debug: bool) -> dict[str, str]:
        m = self.meta
        h = {"x-cold-decoding": m["decoding"]}  # (Serve's proxy owns x-request-id)
        if m["decoding"] == "cold":
            h["x-cold-alpha"], h["x-cold-beta"] = repr(m["alpha"]), repr(m["beta"])
        if debug:
            h["x-cold-replica"] = m["replica"]
        return h

    def body(self, text: str, finish: str | None, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(completion_tokens),
            "cold": self.cold(),
        }


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def sse_stream(call: Call, items: AsyncIterator[dict], include_usage: bool):
    """SSE lines for `items`: one chunk per output (the first carries `cold`), an error event
    if the engine failed mid-stream, the usage chunk if asked, then `[DONE]`."""
    head = {
        "id": call.id,
        "object": "chat.completion.chunk" if call.chat else "text_completion",
        "created": call.created,
        "model": call.model,
    }
    completion_tokens = 0
    first = True
    async for item in items:
        if "error" in item:
            err = item["error"]
            yield sse(error_body(item["status"], err["message"], err["code"]))
            break
        completion_tokens = item["completion_tokens"]
        if not (first or item["text"] or item["finish_reason"]):
            continue  # the detokenizer is holding back an incomplete character
        if call.chat:
            delta = {"content": item["text"]}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": item["finish_reason"]}  # fmt: skip
        else:
            choice = {"index": 0, "text": item["text"], "logprobs": None,
                      "finish_reason": item["finish_reason"]}  # fmt: skip
        chunk = {**head, "choices": [choice]}
        if first:
            chunk["cold"] = call.cold()
            first = False
        yield sse(chunk)
    if include_usage:
        yield sse({**head, "choices": [], "usage": call.usage(completion_tokens)})
    yield sse("[DONE]")
