"""OpenAI-shaped response bodies and SSE chunks, built from the engine's `RequestOutput`s.

Log-probabilities follow OpenAI's shapes — completions: `tokens`, `token_logprobs`,
`top_logprobs` (the chosen token and the N likeliest, as vLLM does), `text_offset`; chat:
`content[{token, logprob, bytes, top_logprobs}]` — and vLLM's `prompt_logprobs`. A CoLD
request's positions add `cold`: the expert's and the amateur's log-probabilities of the token
and of each alternative (cold_ray.engine.logprobs says which distribution each is).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from cold_ray.decoding import GenerationRequest
from cold_ray.engine.logprobs import TokenLogprobs
from cold_ray.engine.request import RequestOutput
from cold_ray.serve.errors import from_exception


class Call:
    """One generation in flight: the engine's stream plus what the response needs to say."""

    def __init__(
        self,
        request: GenerationRequest,
        gen,
        first: RequestOutput,
        model: str,
        chat: bool,
        prompt: str | None,
    ):
        self.request, self.gen, self.first, self.model, self.chat = request, gen, first, model, chat
        self.prompt = prompt  # the completion's prompt as sent (echo)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}"
        self.created = int(time.time())
        self.text_offset = 0  # completions: characters of text before the next token

    def cold(self) -> dict:
        c = self.request.cold
        return {"decoding": "cold" if c else "plain", "alpha": c and c.alpha, "beta": c and c.beta}

    def usage(self, completion_tokens: int) -> dict:
        prompt = self.first.prompt_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }

    def headers(self, debug: bool) -> dict[str, str]:
        c = self.request.cold
        h = {"x-cold-decoding": "cold" if c else "plain"}  # (Serve's proxy owns x-request-id)
        if c is not None:
            h["x-cold-alpha"], h["x-cold-beta"] = repr(c.alpha), repr(c.beta)
        if debug and self.first.served_by:
            h["x-cold-replica"] = self.first.served_by
        return h

    # ---- pieces of a choice ---------------------------------------------------------------

    def text_of(self, out: RequestOutput) -> str:
        """An output's text; the first output of an echoing completion starts with the prompt."""
        if out is self.first and self.request.echo and not self.chat:
            return (self.prompt if self.prompt is not None else out.prompt_text or "") + out.text
        return out.text

    def logprobs_of(self, out: RequestOutput) -> dict | None:
        """The choice's `logprobs` for one output's tokens (None when not asked)."""
        if self.request.params.logprobs is None:
            return None
        positions = list(out.logprobs or [])
        if out is self.first and self.request.echo and not self.chat:
            positions = list(out.prompt_logprobs or []) + positions
        names = out.token_text or {}
        if self.chat:
            return {"content": [_chat_position(p, names) for p in positions]}
        body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        cold = []
        for p in positions:
            text = names.get(p.token, "")
            body["tokens"].append(text)
            body["token_logprobs"].append(p.logprob)
            body["top_logprobs"].append(None if p.logprob is None else _top(p, names))
            body["text_offset"].append(self.text_offset)
            self.text_offset += len(text)
            cold.append(_cold(p, names))
        if self.request.cold is not None:
            body["cold"] = cold
        return body

    def prompt_logprobs_of(self, out: RequestOutput) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token, None (the first) or
        {token id: {logprob, rank, decoded_token}} for the token and the top alternatives."""
        if self.request.params.prompt_logprobs is None or out.prompt_logprobs is None:
            return None
        names = out.token_text or {}
        found = []
        for p in out.prompt_logprobs:
            if p.logprob is None:
                found.append(None)
                continue
            entry = {str(p.token): {"logprob": p.logprob, "decoded_token": names.get(p.token)}}
            for rank, (i, v) in enumerate(p.top, start=1):
                entry.setdefault(str(i), {"logprob": v, "decoded_token": names.get(i)})
                entry[str(i)]["rank"] = rank
            entry[str(p.token)]["rank"] = p.rank
            found.append(entry)
        return found

    # ---- whole bodies ---------------------------------------------------------------------

    def body(self, outputs: list[RequestOutput]) -> dict:
        """The non-streaming response from every output of the request."""
        text = "".join(self.text_of(o) for o in outputs)
        last = outputs[-1]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = self._joined_logprobs(outputs)
        choice["finish_reason"] = last.finish_reason
        prompt_logprobs = self.prompt_logprobs_of(self.first)
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(last.completion_tokens),
            "cold": self.cold(),
        }

    def _joined_logprobs(self, outputs: list[RequestOutput]) -> dict | None:
        parts = [self.logprobs_of(o) for o in outputs]
        if parts[0] is None:
            return None
        joined: dict = {key: [] for key in parts[0]}
        for part in parts:
            for key, values in part.items():
                joined[key] += values
        return joined

    def chunk(self, out: RequestOutput, first: bool) -> dict:
        """One SSE chunk for one output (the first carries `cold` and the role)."""
        text = self.text_of(out)
        if self.chat:
            delta = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice["logprobs"] = self.logprobs_of(out)
        choice["finish_reason"] = out.finish_reason
        if first and (prompt_logprobs := self.prompt_logprobs_of(out)) is not None:
            choice["prompt_logprobs"] = prompt_logprobs
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if first:
            chunk["cold"] = self.cold()
        return chunk


def _top(p: TokenLogprobs, names: dict[int, str]) -> dict[str, float]:
    """Completions' top_logprobs: the chosen token and the N likeliest, by their text."""
    top = {names.get(p.token, ""): p.logprob}
    for i, v in p.top:
        top.setdefault(names.get(i, ""), v)
    return top


def _cold(p: TokenLogprobs, names: dict[int, str]) -> dict | None:
    if p.expert is None:
        return None
    return {
        "expert": p.expert[0],
        "amateur": p.amateur[0],
        "top": [
            {"token": names.get(i, ""), "expert": e, "amateur": a}
            for (i, _), e, a in zip(p.top, p.expert[1:], p.amateur[1:])
        ],
    }


def _chat_position(p: TokenLogprobs, names: dict[int, str]) -> dict:
    text = names.get(p.token, "")
    entry = {
        "token": text,
        "logprob": p.logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": names.get(i, ""), "logprob": v, "bytes": list(names.get(i, "").encode())}
            for i, v in p.top
        ],
    }
    if p.expert is not None:
        entry["cold"] = _cold(p, names)
    return entry


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def sse_stream(call: Call, outputs: AsyncIterator[RequestOutput], include_usage: bool):
    """SSE lines for `outputs`: one chunk per output (the first carries `cold`), an error
    event if the engine failed mid-stream, the usage chunk if asked, then `[DONE]`."""
    completion_tokens, first = 0, True
    async for out in outputs:
        if out.error is not None:
            yield sse(from_exception(out.error).body())
            break
        completion_tokens = out.completion_tokens or completion_tokens
        if not (first or out.text or out.finish_reason or out.logprobs):
            continue  # the detokenizer is holding back an incomplete character
        yield sse(call.chunk(out, first))
        first = False
    if include_usage:
        usage = {
            "id": call.id,
            "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": call.created,
            "model": call.model,
            "choices": [],
            "usage": call.usage(completion_tokens),
        }
        yield sse(usage)
    yield sse("[DONE]")
