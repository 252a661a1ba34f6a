"""The ingress deployment: an OpenAI-compatible FastAPI app (docs/design.md §6) in front of the
engine.

It checks the Host and the body's type against browsers' tricks (`guard.py`), authenticates,
bounds and validates the body, resolves `model` (base model or a registered adapter) and the
decoding (CoLD with the adapter's registry defaults unless the body says otherwise), then
streams from an engine replica chosen by Serve's model multiplexing. Names and listings come
from the registry's in-memory snapshot (no database read per request); registry writes run in
threads, so a slow disk or database never stalls the streams on this replica's loop, and a
registry that cannot be reached is a 503 with Retry-After.

Bodies are read by hand, so that the size limit holds before any parsing and every error keeps
its OpenAI shape; the request models are declared in the OpenAPI document (`/openapi.json`,
`/docs`) all the same, so clients and fuzzers see the real bodies.

No `from __future__ import annotations` here: Serve pickles the ingress class by value, and
FastAPI must see `Request` annotations as objects, not as names to look up in module globals
(for the same reason every helper is defined above the class).
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cold_ray.adapters.peft import AdapterError
from cold_ray.adapters.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    RegistryError,
)
from cold_ray.adapters.registry.base import RegistryUnavailable
from cold_ray.decoding import (
    ColdOnBaseModel,
    ColdParams,
    GenerationRequest,
    SamplingParams,
    request_cold,
)
from cold_ray.engine.request import RequestOutput
from cold_ray.serve import guard
from cold_ray.serve.app_args import AppArgs
from cold_ray.serve.auth import Tokens, exposure_problem, is_loopback, serve_http_host
from cold_ray.serve.errors import (
    APIError,
    EngineReplicaFailed,
    classify,
    error_body,
    from_exception,
    from_validation_error,
    retry_after,
)
from cold_ray.serve.metrics import IngressMetrics
from cold_ray.serve.responses import Call, sse_stream
from cold_ray.serve.schemas import (
    AdapterCreate,
    ChatCompletionRequest,
    ColdKnobs,
    CompletionRequest,
    openapi_document,
)

log = logging.getLogger(__name__)
# /docs and /openapi.json need no token: they describe the API's shape, which is public.
app = FastAPI(
    title="cold-ray",
    summary="OpenAI-compatible LLM serving with Contrastive LoRA Decoding (CoLD)",
    docs_url="/docs",
    redoc_url=None,
)
REQUEST_BODIES = {
    ("post", "/v1/completions"): CompletionRequest,
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/adapters"): AdapterCreate,
}
app.openapi = lambda: openapi_document(app, REQUEST_BODIES)
app.add_middleware(guard.BrowserGuard)  # Host allow-list and CORS, as the ingress configures


@app.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return e.response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    message = {404: f"no route {request.url.path}", 405: "method not allowed"}.get(
        e.status_code, str(e.detail)
    )
    return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse(error_body(422, str(e.errors()[:1]), "invalid_parameter"), 422)


@app.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    if isinstance(e, TaskCancelledError):  # Serve cancelled the call: its client went away
        log.info("%s: the client disconnected", request.url.path)  # (e.g. mid-stream)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body(500, "internal error", "internal_error"), 500)


def _cancel(gen) -> None:
    """Cancel a handle call; never raises (cancel() re-raises e.g. a BackPressureError)."""
    try:
        gen.cancel()
    except Exception:
        pass


def _http_host() -> str | None:
    """Serve's HTTP host as this replica sees it; an unreadable one counts as exposed."""
    try:
        return serve_http_host()
    except Exception as e:
        return f"<unknown: {e}>"


def _unavailable(e: RegistryUnavailable) -> APIError:
    """A registry that cannot be reached: 503 and Retry-After; the detail goes to the log."""
    log.warning("registry unavailable: %s", e)
    return APIError(
        503,
        "the adapter registry cannot be reached; retry later",
        "registry_unavailable",
        headers=retry_after("registry_unavailable"),
    )


@serve.deployment(
    name="ColdIngress",
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0},
)
@serve.ingress(app)
class ColdIngress:
    def __init__(self, engine: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        self.engine = engine
        self.tokens = Tokens(self.args.api_key_env, self.args.admin_key_env)
        host = _http_host()
        problem = exposure_problem(host, self.tokens, self.args)
        if problem is not None:
            raise RuntimeError(f"cold-ray cannot start: {problem}")
        guard.configure(guard.BrowserPolicy.from_args(self.args))
        if host is not None and not is_loopback(host) and self.args.allowed_hosts is None:
            log.warning(
                "listening on %r, but only loopback Host names are served: list the names "
                "clients use in allowed_hosts",
                host,
            )
        self.base_id = self.args.base_id
        self.registry = self.args.open_registry(allowed_roots=self.args.roots())
        self.registry.snapshot()  # loaded here, so request-path lookups never wait on a disk
        self.metrics = IngressMetrics()
        self.created = int(time.time())
        self._model_args = None
        log.info("ingress up: base %s, %r", self.base_id, self.tokens)

    # ---- plumbing -------------------------------------------------------------------------

    def _auth(self, request: Request, admin: bool = False) -> None:
        self.tokens.check(request.headers.get("authorization", ""), admin)

    async def _body(self, request: Request, schema: type[BaseModel]):
        problem = guard.json_body_problem(request.headers.get("content-type"))
        if problem is not None:
            raise APIError(415, problem, "unsupported_media_type")
        limit = self.args.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise APIError(
                413, f"request body is over the limit of {limit} bytes", "body_too_large"
            )
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise APIError(
                    413, f"request body is over the limit of {limit} bytes", "body_too_large"
                )
        try:
            return schema.model_validate_json(bytes(buf))
        except ValidationError as e:
            raise from_validation_error(e) from None

    def _resolve(self, model: str | None) -> AdapterRecord | None:
        """None for the base model, else the adapter's registry record (404 if unknown)."""
        if model is None or model == self.base_id:
            return None
        try:
            return self._record(model)
        except RegistryUnavailable as e:
            raise _unavailable(e) from None
        except (AdapterNotFound, RegistryError):
            raise APIError(
                404,
                f"model {model!r} does not exist (see GET /v1/models)",
                "model_not_found",
                "model",
            ) from None

    def _record(self, name: str) -> AdapterRecord:
        """From the registry's in-memory snapshot, never a database read: a flood of unknown
        names costs the catalog nothing. The snapshot is kept current by the registry's change
        feed, so an adapter added through another process is found within the feed's bound
        (one round trip after commit on PostgreSQL, `poll_s` = 0.25 s on SQLite; see the
        backends); while the feed is down, a name the snapshot lacks is RegistryUnavailable."""
        return self.registry.lookup(name)

    def _accept(self, body, record: AdapterRecord | None, chat: bool) -> GenerationRequest:
        """The request the engine will run, built once from the body: the API's own limits
        are checked here; the engine checks what only the model knows (context, vocabulary),
        and the request its own consistency (CoLD needs an adapter)."""
        why = body.unsupported()
        if why is not None:
            raise APIError(400, why, "unsupported_parameter")
        max_tokens = body.limit() if chat else body.max_tokens
        if max_tokens is not None and max_tokens > self.args.tokens_limit:
            raise APIError(
                422,
                f"max_tokens {max_tokens} is over the limit of {self.args.tokens_limit}",
                "invalid_parameter",
                "max_tokens",
            )
        stops = body.stops()
        if len(stops) > self.args.max_stop:
            raise APIError(
                422,
                f"{len(stops)} stop strings given; at most {self.args.max_stop} allowed",
                "invalid_parameter",
                "stop",
            )
        knob = (body.cold.alpha, body.cold.beta) if isinstance(body.cold, ColdKnobs) else body.cold
        try:
            cold = request_cold(record, knob, self.args.cold_by_default)
            if cold is not None and cold.beta > self.args.max_beta:
                raise APIError(
                    422,
                    f"cold.beta {cold.beta} is over the limit of {self.args.max_beta}",
                    "invalid_parameter",
                    "cold.beta",
                )
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=max(body.top_k, 0),
                seed=body.seed,
                stop=stops,
                stop_token_ids=tuple(body.stop_token_ids or ()),
                ignore_eos=body.ignore_eos,
                logprobs=body.logprob_count(),
                prompt_logprobs=body.prompt_logprob_count(),
            )
            return GenerationRequest(
                prompt=None if chat else body.single_prompt(),
                messages=body.chat() if chat else None,
                params=params,
                adapter=record.name if record is not None else None,
                cold=cold,
                echo=not chat and body.echo,
                cache_salt=body.cache_salt,
            )
        except ColdOnBaseModel as e:
            raise APIError(400, str(e), "cold_on_base_model", "cold") from None
        except ValueError as e:  # a value out of range for the engine (the message names it)
            param = "prompt" if "prompt" in str(e) else None
            code = "invalid_prompt" if param else "invalid_parameter"
            raise APIError(400 if param else 422, str(e), code, param) from None

    async def _start(self, request: GenerationRequest, model: str, started: float):
        """Send the request to an engine replica; wait for its first output or its error."""
        handle = self.engine.options(stream=True, multiplexed_model_id=request.adapter or "")
        gen = handle.generate.remote(request)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the stream without output") from None
        except BackPressureError as e:
            _cancel(gen)
            raise APIError(
                503,
                f"server overloaded, retry later ({e.message})",
                "overloaded",
                headers={"retry-after": "1"},
            ) from None
        except (DeploymentUnavailableError, RayServeException) as e:
            _cancel(gen)
            raise APIError(503, f"no engine replica available: {e}", "unavailable") from None
        except RayError as e:  # the replica died or failed before its first output
            _cancel(gen)
            log.warning("engine call failed: %s", e)
            raise APIError(503, "the engine replica failed; retry", "engine_failed") from None
        except asyncio.CancelledError:
            _cancel(gen)
            raise
        if first.error is not None:
            _cancel(gen)
            param = "model" if classify(first.error)[1] == "model_not_found" else None
            raise from_exception(first.error, param)
        decoding = "cold" if request.cold else "plain"
        self.metrics.ttft.observe(time.perf_counter() - started, tags={"decoding": decoding})
        self.metrics.decoded.inc(tags={"decoding": decoding, "model": model})
        return gen, first

    async def _outputs(self, call: Call) -> AsyncIterator[RequestOutput]:
        """The engine's outputs from the first on; always cancels the engine side at the end
        (a client that went away frees its rows at once)."""
        tags = {"decoding": "cold" if call.request.cold else "plain"}
        last = time.perf_counter()
        try:
            yield call.first
            async for out in call.gen:
                now = time.perf_counter()
                self.metrics.itl.observe(now - last, tags=tags)
                last = now
                yield out
        except (RayError, RayServeException) as e:  # e.g. the replica died mid-stream
            log.warning("engine stream failed: %s", e)
            failed = RequestOutput(call.request.request_id, "", [], finished=True)
            failed.error = EngineReplicaFailed("the engine replica failed mid-stream; retry")
            yield failed
        finally:
            _cancel(call.gen)

    # ---- generation -----------------------------------------------------------------------

    async def _generate(self, request: Request, chat: bool):
        started = time.perf_counter()
        self._auth(request)
        body = await self._body(request, ChatCompletionRequest if chat else CompletionRequest)
        record = self._resolve(body.model)
        accepted = self._accept(body, record, chat)
        model = body.model or self.base_id
        gen, first = await self._start(accepted, model, started)
        prompt = accepted.prompt if isinstance(accepted.prompt, str) else None
        call = Call(accepted, gen, first, model, chat, prompt)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                sse_stream(call, self._outputs(call), usage),
                media_type="text/event-stream",
                headers=call.headers(self.args.debug_headers),
            )
        outputs = []
        async for out in self._outputs(call):
            if out.error is not None:
                raise from_exception(out.error)
            outputs.append(out)
        return JSONResponse(call.body(outputs), headers=call.headers(self.args.debug_headers))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, chat=True)

    # ---- models, adapters, health ---------------------------------------------------------

    def _adapter_view(self, r: AdapterRecord) -> dict:
        cold = r.cold or ColdParams()
        return {
            "id": r.name,
            "object": "model",
            "created": int(r.created_at),
            "owned_by": "cold-ray",
            "root": r.source,
            "parent": self.base_id,
            "rank": r.rank,
            "target_modules": list(r.target_modules),
            "sha256": r.sha256,
            "base_model": r.base_model,  # as the adapter declares it
            "warnings": list(r.warnings),  # from validation, e.g. another declared base model
            "cold": {"enabled": r.cold_enabled, "alpha": cold.alpha, "beta": cold.beta},
        }

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        base = {
            "id": self.base_id,
            "object": "model",
            "created": self.created,
            "owned_by": "cold-ray",
            "root": self.args.engine.model or self.base_id,
            "parent": None,
            "max_model_len": self.args.engine.max_model_len,
        }
        records = self.registry.listed()  # the snapshot: up during a registry outage too
        return {"object": "list", "data": [base] + [self._adapter_view(r) for r in records]}

    @app.get("/v1/adapters")
    async def list_adapters(self, request: Request):
        self._auth(request)
        records = self.registry.listed()
        return {"object": "list", "data": [self._adapter_view(r) for r in records]}

    @app.get("/v1/adapters/{name}")
    async def get_adapter(self, name: str, request: Request):
        self._auth(request)
        try:
            return self._adapter_view(self._record(name))
        except RegistryUnavailable as e:
            raise _unavailable(e) from None
        except (AdapterNotFound, RegistryError):
            raise APIError(404, f"adapter {name!r} does not exist", "adapter_not_found") from None

    def _admin(self, request: Request) -> None:
        self._auth(request, admin=True)
        if not self.args.admin_api:
            raise APIError(403, "the admin API is disabled (admin_api: false)", "admin_disabled")

    @app.post("/v1/adapters")
    async def add_adapter(self, request: Request):
        self._admin(request)
        body = await self._body(request, AdapterCreate)
        if body.beta is not None and body.beta > self.args.max_beta:
            raise APIError(
                422,
                f"beta {body.beta} is over the limit of {self.args.max_beta}",
                "invalid_parameter",
                "beta",
            )
        if body.name == self.base_id:
            raise APIError(
                409,
                f"{body.name!r} is the base model's id; choose another name",
                "adapter_exists",
                "name",
            )
        try:
            record = await asyncio.to_thread(self._register, body)
        except RegistryUnavailable as e:
            raise _unavailable(e) from None
        except AdapterExists:  # checked before the adapter is read, and again as it is listed
            raise APIError(
                409,
                f"adapter {body.name!r} already exists; DELETE it first or set replace: true",
                "adapter_exists",
                "name",
            ) from None
        except AdapterError as e:  # includes SourceError (policy): the message says which
            raise APIError(
                422 if type(e) is AdapterError else 400, str(e), "invalid_adapter", "source"
            ) from None
        except RegistryError as e:
            raise APIError(400, str(e), "invalid_adapter") from None
        return JSONResponse(self._adapter_view(record), status_code=201)

    def _register(self, body: AdapterCreate) -> AdapterRecord:
        if self._model_args is None:
            self._model_args = self.args.model_args()
        return self.registry.add(
            body.name,
            body.source,
            args=self._model_args,
            max_rank=self.args.engine.max_lora_rank,
            max_bytes=self.args.engine.max_adapter_bytes,
            alpha=body.alpha,
            beta=body.beta,
            cold_enabled=body.cold_enabled,
            replace=body.replace,
        )

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(self, name: str, request: Request):
        self._admin(request)
        try:
            await asyncio.to_thread(self.registry.remove, name)
        except RegistryUnavailable as e:
            raise _unavailable(e) from None
        except (AdapterNotFound, RegistryError):
            raise APIError(404, f"adapter {name!r} does not exist", "adapter_not_found") from None
        return {"id": name, "object": "adapter", "deleted": True}

    @app.get("/health")
    async def health(self):
        return Response(status_code=200)
