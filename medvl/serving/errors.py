"""The front's errors in OpenAI's shape. Every body carries the request id that finds the
request in the server log; no exception text ever reaches the client."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from medvl.data.images import ImageError
from medvl.serving.api import APIError
from medvl.serving.guard import logger, request_id

# A model replica gone mid-request (crashed, killed, its node lost): the caller may retry.
REPLICA_LOST = (RayActorError, ActorUnavailableError)


def error_body(e: APIError) -> dict:
    """OpenAI's error object plus the request id, which finds the request in the server log."""
    body = e.body()
    body["error"]["request_id"] = request_id()
    return body


def server_error(what: str, detail: str | Exception) -> APIError:
    """A 500 whose text is ours alone: exception text (remote tracebacks name node IPs and
    paths) goes to the server log under the request id, never to the client."""
    logger.error("request %s: %s: %s", request_id(), what, detail,
                 exc_info=detail if isinstance(detail, Exception) else None)
    return APIError(500, f"{what}; the server log has the details under this request id",
                    "server_error", "generation_failed")


def image_error(e: ImageError) -> APIError:
    """An image the decoder refused: 413 when too large, else 400, in the decoder's words."""
    return APIError(413 if e.reason == "image_too_large" else 400, f"image rejected: {e.detail}", code=e.reason)


def replica_lost(e: Exception) -> APIError:
    return APIError(503, f"the model replica answering this request failed ({type(e).__name__}); "
                         "retry", "server_error", "model_unavailable")


async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=getattr(e, "headers", None))


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in OpenAI's error shape too."""
    kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(error_body(APIError(e.status_code, str(e.detail), code=kind)), status_code=e.status_code)


async def _unexpected(_: Request, e: Exception) -> JSONResponse:
    logger.exception("request %s failed", request_id(), exc_info=e)
    return JSONResponse(error_body(APIError(500, "internal error; the server log has the details under "
                                                 "this request id", "server_error", "internal_error")),
                        status_code=500)


async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    msg = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid")
    return JSONResponse(error_body(APIError(400, msg, code="invalid_request", param=where or None)), status_code=400)


def install(api: FastAPI) -> None:
    """Answer every error of ``api`` in OpenAI's shape."""
    for kind, handler in ((APIError, _api_error), (StarletteHTTPException, _http_error),
                          (Exception, _unexpected), (RequestValidationError, _invalid)):
        api.add_exception_handler(kind, handler)
