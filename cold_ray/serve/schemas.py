"""HTTP request bodies (OpenAI-compatible, vLLM conventions) and the CoLD knobs.

Bodies are parsed with `model_validate_json` in strict mode: a string where a number belongs,
NaN/inf, or a float `max_tokens` is a 422, never coerced. Unknown fields are ignored (OpenAI
clients send fields such as `user`); known-but-unsupported ones — OpenAI's and vLLM's sampling
extensions — are refused with a 400 by `unsupported()` unless they ask for nothing, rather than
silently ignored.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from cold_ray import decoding

_BODY = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
MAX_SEED = 2**63 - 1
StopString = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class ColdKnobs(BaseModel):
    """`"cold": {"alpha": .., "beta": ..}`; a missing knob takes the adapter's default."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    alpha: float | None = Field(
        None, gt=0, le=1, description="Plausibility: keep tokens with p >= alpha * max p."
    )
    beta: float | None = Field(
        None,
        ge=0,
        le=decoding.MAX_BETA,
        description="Contrast strength: score = (1+beta)*expert - beta*amateur.",
    )


class StreamOptions(BaseModel):
    model_config = _BODY
    include_usage: StrictBool = Field(False, description="Send a final chunk with usage.")


class _Common(BaseModel):
    model_config = _BODY

    model: str | None = Field(
        None, max_length=256, description="An adapter name, or the base model's id (default)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(
        decoding.DEFAULT_TEMPERATURE, ge=0, le=100, description="0 = greedy."
    )
    top_p: float = Field(decoding.DEFAULT_TOP_P, gt=0, le=1)
    top_k: int = Field(decoding.DEFAULT_TOP_K, ge=-1, description="0 or -1 = off.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: StopString | list[StopString] | None = Field(None, description="Stop strings.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=256)
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    cold: ColdKnobs | StrictBool | None = Field(
        None,
        description="CoLD knobs: an object (alpha/beta overrides), true (adapter defaults), "
        "false (plain decoding). Omitted: CoLD at the adapter's defaults unless its registry "
        "entry disables it; always plain on the base model.",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=decoding.MAX_LOGPROBS,
        description="vLLM: log-probabilities of each prompt token, with this many alternatives.",
    )
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="vLLM: requests with different salts share no cached prompt prefix (a "
        "tenant's prompts cannot be probed through another's time to first token).",
    )
    # Known OpenAI fields this server does not implement: accepted only at their no-op values.
    n: int = Field(1, ge=1, le=128)
    best_of: int | None = Field(None, ge=1, le=128)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's sampling extensions this server does not implement, likewise (`VLLM_NO_OPS`).
    min_tokens: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    use_beam_search: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def unsupported(self) -> str | None:
        """Why this request asks for something not implemented (None: nothing)."""
        if self.n != 1:
            return f"n={self.n} is not supported; send n=1 (one choice per request)"
        if self.best_of not in (None, 1):
            return f"best_of={self.best_of} is not supported"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty and frequency_penalty are not supported (use 0)"
        if self.logit_bias:
            return "logit_bias is not supported"
        for name, idle in VLLM_NO_OPS.items():
            if getattr(self, name) not in idle:
                return f"{name} is not supported (send {json.dumps(idle[0])} or leave it out)"
        return None


# Each vLLM extension with the values that ask for nothing.
VLLM_NO_OPS: dict[str, tuple] = {
    "min_tokens": (0,),
    "min_p": (0.0,),
    "repetition_penalty": (1.0,),
    "use_beam_search": (False,),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | TokenIds | list[str] | list[TokenIds] = Field(
        description="Text or token ids; a list of one prompt is accepted (batches are not)."
    )
    suffix: str | None = None
    logprobs: int | None = Field(
        None,
        ge=0,
        le=decoding.MAX_LOGPROBS,
        description="Log-probabilities of each generated token, with this many alternatives.",
    )
    echo: StrictBool = Field(
        False, description="Return the prompt before the completion (with its logprobs)."
    )

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        """An echoed prompt's logprobs come with the completion's (OpenAI's echo)."""
        echoed = self.logprobs if self.echo else None
        counts = [n for n in (self.prompt_logprobs, echoed) if n is not None]
        return max(counts) if counts else None

    def single_prompt(self) -> str | list[int]:
        """The one prompt; raises ValueError for a batch."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(
                    f"batched prompts are not supported ({len(p)} given); send one per request"
                )
            return p[0]
        if isinstance(p, list) and not p:
            raise ValueError("prompt is empty")
        return p

    def unsupported(self) -> str | None:
        return "suffix is not supported" if self.suffix else super().unsupported()


class TextPart(BaseModel):
    model_config = _BODY
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _BODY
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Newer OpenAI name for max_tokens (wins when both are set)."
    )
    logprobs: StrictBool = Field(False, description="Log-probabilities of each token.")
    echo: StrictBool = False  # vLLM's chat echo: accepted only off
    top_logprobs: int | None = Field(
        None, ge=0, le=decoding.MAX_LOGPROBS, description="Alternatives per token (logprobs)."
    )

    # Accepted only at their no-op values: a client that sends tools or asks for JSON output
    # must not get free text back as if it had been honoured.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    response_format: dict | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_logprob_count(self) -> int | None:
        return self.prompt_logprobs

    def unsupported(self) -> str | None:
        if (self.tools or self.functions) and self.tool_choice != "none":
            return "tools (function calling) are not supported; send no tools or tool_choice none"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice is not supported"
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            return f"response_format {kind!r} is not supported (only 'text')"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs needs logprobs: true"
        if self.echo:
            return "echo is not supported on chat completions"
        return super().unsupported()

    def chat(self) -> list[dict]:
        # developer is OpenAI's newer name for system; most chat templates know only system
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class AdapterCreate(BaseModel):
    """POST /v1/adapters."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    name: str = Field(max_length=64, description="Adapter name ([A-Za-z0-9._-]{1,64}).")
    source: str = Field(max_length=4096, description="PEFT folder or fsspec URI (allow-listed).")
    alpha: float | None = Field(None, gt=0, le=1, description="Tuned CoLD alpha.")
    beta: float | None = Field(None, ge=0, le=decoding.MAX_BETA, description="Tuned CoLD beta.")
    cold_enabled: StrictBool = Field(True, description="False: plain unless a request asks.")
    replace: StrictBool = Field(False, description="Replace an existing adapter of this name.")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    code: str | None = Field(None, description="e.g. model_not_found, body_too_large")
    param: str | None = Field(None, description="The body field at fault, if one is.")


class ErrorResponse(BaseModel):
    """Every error the API answers (OpenAI's shape)."""

    error: ErrorDetail


def openapi_document(app, request_bodies: dict[tuple[str, str], type[BaseModel]]) -> dict:
    """The app's OpenAPI document with the request models its routes parse by hand (the body
    is read under a size limit before parsing, so FastAPI cannot see them in the signatures),
    the OpenAI error shape, and bearer auth on the /v1 routes. Built once per process."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})

    def ref(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    error = {
        "description": "OpenAI-shaped error",
        "content": {"application/json": {"schema": ref(ErrorResponse)}},
    }
    for (method, path), model in request_bodies.items():
        doc["paths"][path][method]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(model)}},
        }
    for path, ops in doc["paths"].items():
        if path.startswith("/v1/"):
            for op in ops.values():
                op["security"] = [{"bearer": []}]
                op["responses"].pop("422", None)  # FastAPI's own shape; ours is the error's
                op["responses"].update({"4XX": error, "5XX": error})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    app.openapi_schema = doc
    return doc
