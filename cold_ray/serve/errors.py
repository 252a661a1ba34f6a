"""OpenAI-shaped errors: `{"error": {"message", "type", "code", "param"}}` with the right status.

Status policy (docs/design.md §6), the one table the HTTP layer and its tests follow:

| status | type                    | when                                                          |
|--------|-------------------------|---------------------------------------------------------------|
| 400    | invalid_request_error   | malformed JSON/UTF-8, a request this model cannot serve (CoLD |
|        |                         | on the base model, prompt over the context, unsupported knob) |
| 401    | authentication_error    | bearer token missing or not a known token                     |
| 403    | permission_error        | a valid client token on an admin endpoint                     |
| 404    | not_found_error         | unknown model/adapter or route                                |
| 409    | invalid_request_error   | registering an adapter name that already exists               |
| 413    | invalid_request_error   | request body over `max_body_bytes`                            |
| 415    | invalid_request_error   | a body whose Content-Type is not application/json             |
| 421    | invalid_request_error   | a Host header outside `allowed_hosts` (DNS rebinding)         |
| 422    | invalid_request_error   | a parameter of the wrong type or out of range, an adapter     |
|        |                         | that cannot be served (the message says which file and why)   |
| 500    | server_error            | a bug or an adapter that fails to load (message says which)   |
| 503    | overloaded_error        | queue full (backpressure) or a request that waited too long   |
|        |                         | in the engine's queue (queue_timeout); server_error when an   |
|        |                         | engine replica failed, none is available or the adapter       |
|        |                         | registry cannot be reached (engine_failed, unavailable,       |
|        |                         | registry_unavailable). Every 503 before a response has begun  |
|        |                         | carries Retry-After: retry                                    |
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "overloaded_error",
}


# 503s that are not backpressure: a replica died or none is up, the registry cannot be
# reached (retryable, not overload)
_SERVER_FAULTS = ("engine_failed", "unavailable", "registry_unavailable")
RETRY_AFTER_S = {"registry_unavailable": 5}  # seconds a 503 asks a client to wait; else 1


def retry_after(code: str | None) -> dict[str, str]:
    """The Retry-After header of a 503 with error `code`."""
    return {"retry-after": str(RETRY_AFTER_S.get(code, 1))}


class APIError(Exception):
    """An error the API reports to the client as-is (message included)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class EngineReplicaFailed(RuntimeError):
    """The engine replica serving a stream died mid-stream (retry: another one serves)."""


def classify(e: Exception) -> tuple[int, str]:
    """(HTTP status, error code) of an exception that ended a request, wherever it was raised
    (the ingress, an engine replica, the engine's step)."""
    from cold_ray.adapters.peft import AdapterError
    from cold_ray.adapters.registry.base import RegistryUnavailable
    from cold_ray.decoding import ColdOnBaseModel
    from cold_ray.engine.request import (
        ContextLengthError,
        EngineError,
        RequestTimeout,
        UnknownAdapterError,
    )

    if isinstance(e, UnknownAdapterError | KeyError):
        return 404, "model_not_found"
    if isinstance(e, ContextLengthError):
        return 400, "context_length_exceeded"
    if isinstance(e, ColdOnBaseModel):
        return 400, "cold_on_base_model"
    if isinstance(e, RequestTimeout):  # the engine was busy, not the request wrong: retry
        return 503, "queue_timeout"
    if isinstance(e, RegistryUnavailable):  # a catalog read on a miss: retry
        return 503, "registry_unavailable"
    if isinstance(e, EngineReplicaFailed):
        return 503, "engine_failed"
    if isinstance(e, AdapterError):  # a registered adapter that no longer loads (server side)
        return 500, "adapter_load_failed"
    if isinstance(e, EngineError):
        return 400, "invalid_request"
    if isinstance(e, ValueError):
        return 422, "invalid_parameter"
    return 500, "internal_error"


# Server-side errors whose message the client reads (None: the exception's own); any other
# 5xx says "internal error" and leaves the detail to the replica's log.
_TOLD = {
    "adapter_load_failed": None,
    "queue_timeout": None,
    "registry_unavailable": "the adapter registry cannot be reached; retry",
    "engine_failed": None,
}


def from_exception(e: Exception, param: str | None = None) -> APIError:
    """An exception that ended a request, as the APIError the client gets (a 503 asks it to
    retry)."""
    status, code = classify(e)
    message = str(e) if status < 500 else _TOLD.get(code, "internal error") or str(e)
    headers = retry_after(code) if status == 503 else None
    return APIError(status, message, code, param, headers)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None):
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if code in _SERVER_FAULTS:
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def from_validation_error(e) -> APIError:
    """A pydantic ValidationError as one 400 (unparsable body) or 422 (bad parameter)."""
    errors = e.errors(include_url=False, include_context=False)
    if not errors:
        return APIError(422, str(e), "invalid_parameter")
    top = errors[0]
    if top["type"] in ("json_invalid", "json_type") and not top["loc"]:
        return APIError(400, f"request body is not valid JSON: {top['msg']}", "invalid_json")
    if top["type"] in ("model_type", "model_attributes_type", "dict_type") and not top["loc"]:
        return APIError(400, "request body must be a JSON object", "invalid_json")
    # A union field reports one error per member; the deepest is the informative one.
    field = top["loc"][0] if top["loc"] else None
    same = [x for x in errors if x["loc"][:1] == (field,)] if field is not None else [top]
    first = max(same, key=lambda x: len(x["loc"]))
    loc = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p))
    others = len({x["loc"][:1] for x in errors}) - 1
    more = f" (and {others} more)" if others > 0 else ""
    return APIError(422, f"{loc or 'body'}: {first['msg']}{more}", "invalid_parameter", loc or None)


def _is_union_tag(part) -> bool:
    """Pydantic puts union member names (e.g. 'str', 'list[int]') into `loc`; hide them."""
    return isinstance(part, str) and (
        part in ("str", "int", "bool", "float", "ColdKnobs", "function-after[...]")
        or part.startswith(("list[", "function-", "constrained-"))
    )
