"""Errors answered in OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, and
the request-body checks that raise them (JSON, size, schema, options we do not implement)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pocketlm.serve")
MAX_BODY_BYTES = 8 * 2**20  # far above any context these models take


class APIError(Exception):
    """An error answered as OpenAI's error body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def finish_error(reason: str, timeout: float | None) -> APIError | None:
    if reason == "timeout":
        return APIError(
            408,
            f"generation ran past the server's per-request timeout of {timeout}s; "
            "ask for fewer tokens (max_tokens) or start the server with a larger "
            "--timeout",
            type="timeout",
            code="timeout",
        )
    if reason == "cancelled":
        return APIError(
            503,
            "the server is shutting down; retry on another replica",
            type="server_error",
            code="shutting_down",
        )
    if reason == "error":
        return APIError(
            500, "the engine failed on this batch (see the server log)", type="server_error"
        )
    return None


def install_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's body: ours, Starlette's (404, 405) and bugs (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return APIError(
            e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind
        ).response()

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unhandled error")
        return APIError(
            500, f"internal error ({type(e).__name__}); see the server log", type="server_error"
        ).response()


async def parse(http: HTTPRequest, model):
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
    raw = await http.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MiB")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(
            400, f"{param}: {err['msg']}" if param else err["msg"], param=param
        ) from None


def refuse_unsupported(req) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise APIError(
                400,
                f"{name} is not supported; use repetition_penalty (> 1) instead",
                param=name,
                code="unsupported_parameter",
            )
    if req.logit_bias:
        raise APIError(
            400,
            "logit_bias is not supported by pocketlm serve",
            param="logit_bias",
            code="unsupported_parameter",
        )
