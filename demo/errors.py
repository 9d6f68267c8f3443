"""One error type for everything a client can be told: a code, a message, an HTTP status."""

from __future__ import annotations

import math
from typing import Any


class DemoError(Exception):
    """A request the demo refuses or cannot serve; ``message`` says what to do about it."""

    def __init__(self, code: str, message: str, *, status: int = 400,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.retry_after is not None:
            d["retry_after"] = self.retry_after
        return d

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def busy(retry_after: float, what: str = "the model") -> DemoError:
    secs = max(1, math.ceil(retry_after))
    return DemoError("busy", f"busy: {what} is serving other people, retry in {secs} s",
                     status=503, retry_after=secs)


def rate_limited(retry_after: float, rate: str) -> DemoError:
    secs = max(1, math.ceil(retry_after))
    return DemoError("rate_limited",
                     f"too many requests from this client (limit {rate}), retry in {secs} s",
                     status=429, retry_after=secs)
