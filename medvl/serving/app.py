"""The Ray Serve application: an OpenAI-compatible chat endpoint for an exported model.

``build_app(args)`` is a Serve application builder, so the same code runs from
``serve run serve/config.yaml``, ``serve deploy`` and ``medvl serve``. Two deployments:

- ``MedVLChat``, the HTTP front (small CPU replicas, no weights): API keys, body limits,
  validation, image decoding and tokenisation, OpenAI-shaped errors. Bad input never
  reaches the model, and a model replica that dies mid-answer becomes a 503 (an error
  event + ``[DONE]`` in a stream), not the proxy's plain-text 500.
- ``MedVLModel``, the weights (the GPU replicas): requests joined into dynamic batches by
  ``@serve.batch``; one decoding loop streams every request of a batch at once, and a
  request whose caller went away leaves its batch.
"""

import asyncio
import dataclasses
import functools
import json
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import ClientDisconnect

from medvl import config, storage
from medvl.data.images import ImageError
from medvl.serving.api import (
    APIError,
    ChatCompletionRequest,
    PreviewRequest,
    ServeConfig,
    chunk_body,
    completion_body,
    image_bytes,
    parse_request,
    to_engine_request,
)
from medvl.serving.engine import CONCURRENT_BATCHES, Chunk, Engine, Prepared, Preparer
from medvl.serving.errors import (
    REPLICA_LOST,
    error_body,
    image_error,
    install,
    replica_lost,
    server_error,
)
from medvl.serving.guard import (
    KeySlots,
    check_exposure,
    host_name,
    is_loopback,
    key_of,
    load_api_keys,
)
from medvl.serving.lifetime import FRONT_THREADS, Slot, Stream, parsed
from medvl.serving.page import ASSETS, HEADERS, png, render

# No /docs or /redoc pages (they load scripts from a CDN into an operator's browser); the
# spec stays at /openapi.json. No trailing-slash redirects: Starlette builds their Location
# from the Host header, which the client chooses.
api = FastAPI(title="medvl", description="OpenAI-compatible multimodal chat for medical images",
              docs_url=None, redoc_url=None, redirect_slashes=False)


def _openapi() -> dict:
    """The generated spec plus what the raw-body route hides from FastAPI: the request
    model as its body, and the bearer-key scheme."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=api.title, version="1", description=api.description, routes=api.routes)
        schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(schema.pop("$defs", {}))
        schemas["ChatCompletionRequest"] = schema
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        spec["security"] = [{"bearer": []}]
        spec["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}
        api.openapi_schema = spec
    return api.openapi_schema


api.openapi = _openapi
install(api)


HEALTH_TIMEOUT_S = 10.0


@serve.deployment(name="MedVLModel", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class ModelDeployment:
    """The weights and the batched decoding loop; only the HTTP front calls it."""

    def __init__(self, cfg: ServeConfig):
        import torch

        # A replica given a GPU (ray_actor_options num_gpus) sees exactly that one.
        self.engine = Engine(cfg.model, device="cuda" if torch.cuda.is_available() else "cpu")
        self._generate.set_max_batch_size(cfg.max_batch_size)
        self.batch_wait_s, self.ongoing = cfg.batch_wait_timeout_s, 0

    async def generate(self, prepared: Prepared) -> AsyncIterator[Chunk]:
        """One request's chunks. A request that finds the replica idle starts at once (there
        is no one to wait for); one arriving while others decode waits up to
        ``batch_wait_timeout_s`` for company. A caller that goes away cancels this call; the
        request is then marked, and its row leaves the batch at the next step."""
        self._generate.set_batch_wait_timeout_s(self.batch_wait_s if self.ongoing else 0.0)
        self.ongoing += 1
        try:
            async for chunk in self._generate(prepared):
                yield chunk
        finally:
            self.ongoing -= 1
            prepared.cancelled = True

    async def complete(self, prepared: Prepared) -> Chunk:
        """A non-streaming request: its last chunk only, one object back instead of one per token."""
        async for chunk in self.generate(prepared):
            if chunk.error is not None or chunk.result is not None:
                return chunk
        return Chunk("", error="generation ended without a result")

    def decoding(self) -> int:
        """Requests decoding on this replica now (``/healthz`` reports it)."""
        return self.engine.decoding

    # Up to 4 batches decode at once, their steps interleaved (each in a thread): a request
    # arriving while a batch runs starts within a step instead of after the whole batch.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=CONCURRENT_BATCHES)
    async def _generate(self, batch: list[Prepared]) -> AsyncIterator[list[Chunk | type]]:
        """One decoding loop for the whole batch; a finished request gets StopIteration. Each
        step runs in a thread, so the event loop streams the previous step's tokens while
        the next is computed."""
        steps = self.engine.generate_batch(batch)
        while (step := await asyncio.to_thread(next, steps, None)) is not None:
            yield [c if c is not None else StopIteration for c in step]


@serve.deployment(name="MedVLChat", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class ChatDeployment:
    def __init__(self, cfg: ServeConfig, model: DeploymentHandle):
        self.cfg = cfg
        self.preparer = Preparer(cfg.model)  # tokenizer + template: no weights on the front
        self.special = tuple(self.preparer.tok.all_special_tokens)  # a list HF rebuilds per call
        self.model, self.streams = model, model.options(stream=True)
        self.keys = load_api_keys(cfg)
        # `serve run/deploy` of a config: the host is Serve's, known here for certain.
        host = _get_global_client().http_config.host
        check_exposure(cfg, host, self.keys)
        self.slots = KeySlots(cfg.max_requests_per_key)
        self.pool = ThreadPoolExecutor(FRONT_THREADS, thread_name_prefix="medvl-front")
        # Keyless on loopback: only requests that name a loopback host (see `_local`).
        self.local_only = not self.keys and is_loopback(host)
        self.page = render(cfg.model_name, bool(self.keys), cfg.max_tokens_cap)

    def _check(self, request: Request) -> bytes | None:
        """The caller's API key (None when the server has none), from the headers alone:
        nothing is read for a caller without one."""
        if not self.keys:
            self._keyless(request)
            return None
        if (key := key_of(request.headers.get("authorization", ""), self.keys)) is None:
            raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           "authentication_error", "invalid_api_key")
        return key

    def _keyless(self, request: Request) -> None:
        """Without keys any web page the user opens may send requests here. A form or a
        ``text/plain`` fetch needs no CORS preflight, so POSTs must say
        ``application/json`` (415); and a page whose name was re-pointed at 127.0.0.1 (DNS
        rebinding) may read the answers, so on loopback the Host must be a loopback one (403)."""
        if self.local_only and not is_loopback(host_name(request.headers.get("host", ""))):
            raise APIError(403, "this keyless server answers only requests to a loopback host "
                                "(127.0.0.1, localhost, [::1])", "permission_error", "host_not_allowed")
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and media != "application/json":
            raise APIError(415, "send the body as Content-Type: application/json", code="unsupported_media_type")

    def _admit(self, request: Request) -> Slot:
        """The key, then one of its slots: calling the returned ``Slot`` gives it back."""
        key = self._check(request)
        return Slot(self.slots.take(key) if key is not None else lambda: None, self.pool)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused as soon as it (or its Content-Length) passes the size limit, and
        only as long as the client sends it within ``body_timeout_s``: a half-sent upload
        holds a replica slot for seconds, not forever."""
        limit = self.cfg.max_body_bytes
        too_large = APIError(413, f"request body larger than {limit} bytes", code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large

        async def read() -> bytes:
            body = bytearray()
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise too_large
            return bytes(body)

        try:
            return await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except TimeoutError:
            raise APIError(408, f"request body not received within {self.cfg.body_timeout_s:g} s",
                           code="request_timeout") from None
        except (ClientDisconnect, TaskCancelledError):  # the client went away mid-body (Starlette's
            # word, or Serve's when it cancels the body's receive first): not a server error,
            # whose 40-line traceback it logged at ERROR; nobody is left to read the answer
            raise APIError(400, "client disconnected before sending the whole body",
                           code="client_disconnected") from None

    @api.get("/", include_in_schema=False)
    async def web_page(self) -> Response:
        """The chat page; it holds no data, so no key is asked for it (its API calls carry one)."""
        return Response(self.page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @api.get("/web/{name}", include_in_schema=False)
    async def web_asset(self, name: str) -> Response:
        if name not in ASSETS:
            raise APIError(404, "no such file", code="not_found")
        body, media = ASSETS[name]
        return Response(body, media_type=media, headers=HEADERS)

    @api.post("/v1/images/preview", include_in_schema=False)
    async def preview(self, request: Request) -> Response:
        """``{"image_url": {"url": ...}}`` -> the PNG the model would get from it: the chat
        endpoint's key, slot, size limits, decoding, DICOM windowing and fitting."""
        slot = self._admit(request)
        try:
            parse = functools.partial(parse_request, model=PreviewRequest)
            body = await parsed(slot, parse, await self._read_body(request))
            return Response(await slot.run(self._preview, body), media_type="image/png",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
        finally:
            slot()

    def _preview(self, body: PreviewRequest) -> bytes:
        data, name = image_bytes(body.image_url.url, self.cfg, param="image_url")
        try:
            pixels = self.preparer.pixels(data, name, self.cfg.max_image_pixels, self.cfg.allow_burned_in_annotation)
        except ImageError as e:
            raise image_error(e) from e
        return png(pixels)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """200 while a model replica answers (with how many requests it is decoding)."""
        try:
            decoding = await asyncio.wait_for(self.model.decoding.remote(), HEALTH_TIMEOUT_S)
        except (TimeoutError, *REPLICA_LOST) as e:
            raise APIError(503, f"no model replica answered within {HEALTH_TIMEOUT_S:g} s "
                                f"({type(e).__name__})", "server_error", "model_unavailable") from e
        return {"status": "ok", "decoding": decoding}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._check(request)
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict:
        self._check(request)
        if model_id != self.cfg.model_name:
            raise APIError(404, f"model {model_id!r} does not exist", code="model_not_found", param="model")
        return self._model_card()

    def _model_card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "medvl"}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        """Admission: the key, then one of the key's slots, held until the answer (or its
        stream) ends."""
        slot = self._admit(request)
        try:
            response = await self._answer(request, slot)
        except BaseException:
            slot()
            raise
        if isinstance(response, StreamingResponse):
            return Stream(response.body_iterator, slot)
        slot()
        return response

    async def _answer(self, request: Request, slot: Slot):
        body = await parsed(slot, parse_request, await self._read_body(request))
        prepared = await slot.run(self._prepare, body)  # decode + tokenise off the event loop
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = self.streams.generate.remote(prepared)
            return StreamingResponse(self._sse(chunks, usage), media_type="text/event-stream")
        try:
            chunk = await self.model.complete.remote(prepared)  # a client gone cancels it there too
        except REPLICA_LOST as e:
            raise replica_lost(e) from e
        except Exception as e:  # noqa: BLE001 - the whole batch failed: an OpenAI-shaped 500, not a bare one
            raise server_error("generation failed", e) from e
        if chunk.error is not None:
            raise server_error("generation failed for this request", chunk.error)
        return completion_body(chunk.result, self.cfg.model_name)

    def _prepare(self, body: ChatCompletionRequest) -> Prepared:
        req = to_engine_request(body, self.cfg, self.special)
        try:
            prepared = self.preparer.prepare(req, self.cfg.max_image_pixels, self.cfg.allow_burned_in_annotation)
        except ImageError as e:
            raise image_error(e) from e
        if len(prepared.ids) > self.cfg.max_prompt_tokens:
            raise APIError(400, f"prompt is {len(prepared.ids)} tokens, more than "
                                f"{self.cfg.max_prompt_tokens}", code="context_length_exceeded")
        return prepared

    async def _sse(self, chunks: DeploymentResponseGenerator, include_usage: bool) -> AsyncIterator[str]:
        cid, model = f"chatcmpl-{uuid.uuid4().hex}", self.cfg.model_name
        first = chunk_body(cid, model, {"role": "assistant", "content": ""}, None)
        yield f"data: {json.dumps(first, ensure_ascii=False)}\n\n"
        try:
            async for chunk in chunks:
                if chunk.error is not None:
                    raise RuntimeError(chunk.error)
                if chunk.delta:
                    body = chunk_body(cid, model, {"content": chunk.delta}, None)
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                if chunk.result is not None:
                    body = chunk_body(cid, model, {}, chunk.result.finish_reason)
                    yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
                    if include_usage:  # stream_options.include_usage: one more chunk, no choices
                        body = chunk_body(cid, model, None, None, chunk.result)
                        yield f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
        except REPLICA_LOST as e:
            yield f"data: {json.dumps(error_body(replica_lost(e)), ensure_ascii=False)}\n\n"
        except Exception as e:  # noqa: BLE001 - the stream ends with an error event, never cut
            err = error_body(server_error("generation failed", e))
            yield f"data: {json.dumps(err, ensure_ascii=False)}\n\n"
        finally:
            chunks.cancel()  # a closed stream cancels its request in the model replica
        yield "data: [DONE]\n\n"


def _absolute(cfg: ServeConfig) -> ServeConfig:
    """Replicas run in another working directory: resolve local paths here, in the driver."""
    return dataclasses.replace(cfg, model=storage.absolute(cfg.model),
                               api_key_file=storage.absolute(cfg.api_key_file))


def build_app(args: dict) -> serve.Application:
    """Serve application builder: ``args`` are ``ServeConfig`` fields (see serve/config.yaml)."""
    cfg = config.from_dict(ServeConfig, dict(args))
    if not cfg.model:
        raise ValueError("serve: `model` (an exported HF model directory URI) is required")
    return application(cfg)


def application(cfg: ServeConfig, options: dict | None = None, front: dict | None = None) -> serve.Application:
    """The HTTP front over the engine ``backend`` names: our ``MedVLModel`` or vLLM's (same
    deployment name, same calls). ``options`` (``placement.deployment_options``) place and
    scale the model replicas, ``front`` (``placement.front_options``) the HTTP front;
    default: the decorators' one CPU replica each."""
    cfg = _absolute(cfg)
    if cfg.backend == "vllm":
        from medvl.serving.vllm import VLLMDeployment as engine
    else:
        engine = ModelDeployment
    model = engine.options(**(options or {})).bind(cfg)
    return ChatDeployment.options(**(front or {})).bind(cfg, model)


def run_local(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
              options: dict | None = None, front: dict | None = None) -> None:
    """Start (or join) a local Ray, then serve ``cfg`` at ``http://host:port/v1``; refused
    before anything starts if that would be an endpoint without keys beyond loopback."""
    import ray

    check_exposure(cfg, host, load_api_keys(cfg))
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(cfg, options, front), name="medvl", route_prefix="/", blocking=blocking)
