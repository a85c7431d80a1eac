"""The errors a client can act on: an HTTP status, a short code and a sentence saying what to fix.

Every non-2xx answer of the server has the body ``{"error": code, "detail": sentence}``; a 503
(``overloaded``: the replica's admission queue or memory budget is full) also says when to come
back in a ``Retry-After`` header.
"""

from __future__ import annotations

# code -> HTTP status. 4xx are the caller's to fix; 5xx are ours.
STATUS = {
    "unauthorized": 401,
    "not_found": 404,
    "unknown_model": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "volume_too_large": 413,
    "empty_body": 400,
    "invalid_nifti": 422,
    "invalid_dicom": 422,
    "invalid_view": 422,
    "wrong_input_kind": 415,
    "invalid_conditioning": 422,
    "invalid_request": 422,
    "internal_error": 500,
    "overloaded": 503,
}


class ApiError(Exception):
    """Raised anywhere in request handling; turned into a JSON answer by the app.

    A plain exception class (not a frozen dataclass): Python code such as contextlib assigns
    ``__traceback__`` on exceptions, which a frozen dataclass refuses.
    """

    def __init__(self, error: str, detail: str, *, retry_after_s: int | None = None) -> None:
        if error not in STATUS:
            raise ValueError(f"unknown error code {error!r}")
        super().__init__(error, detail)
        self.error = error
        self.detail = detail
        self.retry_after_s = retry_after_s

    @property
    def status(self) -> int:
        return STATUS[self.error]

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}

    def headers(self) -> dict[str, str] | None:
        """HTTP headers the answer needs: the auth scheme on a 401, when to retry on a 503."""
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return None

    def __str__(self) -> str:
        return f"{self.error}: {self.detail}"
