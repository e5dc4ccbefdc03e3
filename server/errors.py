"""Every error leaves the server as OpenAI's error object: {"error": {"message", "type", "param", "code"}},
except under /v1/messages, where it is Anthropic's: {"type": "error", "error": {"type", "message"}}.

Routes raise APIError (or one of the helpers below); FastAPI's validation errors are answered 400, not
422; unknown routes 404; anything unexpected 500 with the detail in the log, never in the body."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("glm_serve.errors")
_SURROGATES = re.compile("[\ud800-\udfff]")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def anthropic_body(self) -> dict[str, Any]:
        error_type = _ANTHROPIC_TYPE_BY_STATUS.get(self.status, "api_error")
        return {"type": "error", "error": {"type": error_type, "message": self.message}}

    def response(self, path: str = "") -> JSONResponse:
        """The error as JSON, in the shape of the API that `path` belongs to."""
        body = self.anthropic_body() if is_anthropic_path(path) else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    502: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": encodable(message), "type": error_type, "param": param, "code": code}}


def encodable(text: str) -> str:
    """text with what UTF-8 cannot encode (lone surrogates echoed from a request) replaced by U+FFFD."""
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unauthorized() -> APIError:
    return APIError(
        401,
        "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


def request_timeout(timeout_s: float) -> APIError:
    return APIError(
        408, f"The request body did not arrive within {timeout_s:g} s.", code="request_timeout",
        headers={"Connection": "close"},
    )  # fmt: skip


def too_many_requests(
    message: str, retry_after_s: float = 1.0, code: str = "rate_limit_exceeded"
) -> APIError:
    return APIError(429, message, code=code, headers={"Retry-After": str(max(1, round(retry_after_s)))})


def unavailable(message: str, retry_after_s: float = 1.0, code: str = "service_unavailable") -> APIError:
    retry_after = str(max(1, round(retry_after_s)))
    return APIError(503, message, code=code, headers={"Retry-After": retry_after})


def internal_error(request_id: str | None = None) -> APIError:
    where = f" (request id {request_id})" if request_id else ""
    return APIError(
        500, f"Internal server error{where}; the details are in the server log.", code="internal_error"
    )


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic names the union member it tried ("str", "list[...]"); the client only needs the field
    parts = [p for p in parts if not (p[:1].islower() and ("[" in p or p in {"str", "int", "float", "bool"}))]
    return ".".join(parts) or None


def validation_error_to_api_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return bad_request("Invalid request body.")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"The request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    param = _param_from_loc(tuple(first.get("loc", ())))
    if first.get("type") == "missing" and param:
        return bad_request(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if param is None and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return bad_request(
            "The request body must be a JSON object, sent with Content-Type: application/json.",
            code="invalid_body",
        )
    message = first.get("msg", "Invalid value")
    where = f"'{param}'" if param else "the request body"
    return bad_request(f"Invalid value for {where}: {message}.", param=param, code="invalid_value")


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response(request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_to_api_error(exc).response(request.url.path)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, APIError):  # pragma: no cover - APIError is not an HTTPException
        return exc.response(request.url.path)
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    if exc.status_code == 404:
        message = "Not found. The routes are /v1/chat/completions, /v1/completions, /v1/models and friends."
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    error = APIError(
        exc.status_code, message, code=codes.get(exc.status_code), headers=getattr(exc, "headers", None)
    )
    return error.response(request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)


class TracebackBudget:
    """Rate-limits tracebacks in the log: at most `per_minute` unexpected errors are logged with their
    traceback; past that, the exception's type and message only until the minute is over. A flood of
    failing requests then cannot fill the disk with stack traces."""

    def __init__(self, per_minute: int = 10) -> None:
        self.per_minute = per_minute
        self._window_start = 0.0
        self._logged = 0

    def log(self, logger: logging.Logger, exc: BaseException, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._window_start >= 60.0:
            self._window_start, self._logged = now, 0
        self._logged += 1
        if self._logged <= self.per_minute:
            logger.error(message, *args, exc_info=exc)
        else:  # the exception without its traceback: one line
            logger.error(message + " (traceback rate-limited)", *args, exc_info=(type(exc), exc, None))


tracebacks = TracebackBudget()  # one per process: the log it protects is one per process
