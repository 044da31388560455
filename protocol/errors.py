"""Typed errors that travel in replies: a stable code, a human message, optional details."""

from __future__ import annotations

from typing import Any

BAD_REQUEST = "bad_request"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
TOO_LARGE = "too_large"
BAD_IMAGE = "bad_image"
NO_FACE = "no_face"
FACE_TOO_SMALL = "face_too_small"
CANCELLED = "cancelled"
BUSY = "busy"
TIMEOUT = "timeout"
REFUSED = "refused"
STORAGE = "storage"
INTERNAL = "internal"

CODES = (
    BAD_REQUEST, UNSUPPORTED_VERSION, UNKNOWN_OP, NOT_FOUND, TOO_LARGE, BAD_IMAGE,
    NO_FACE, FACE_TOO_SMALL, CANCELLED, BUSY, TIMEOUT, REFUSED, STORAGE, INTERNAL,
)  # fmt: skip


class ProtocolError(Exception):
    """An error with a stable ``code`` from :data:`CODES` and a human ``message``.

    Raised by the service's validation (and sent back as an error reply) and by
    :class:`protocol.Client` when a reply carries an error. ``remote_traceback`` is set
    for ``internal`` errors so a bug report has the service's side too.
    """

    def __init__(
        self,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}
        self.remote_traceback = remote_traceback

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        if self.remote_traceback:
            out["traceback"] = self.remote_traceback
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ProtocolError:
        if not isinstance(d, dict):
            return cls(INTERNAL, f"malformed error reply: {d!r}"[:500])
        return cls(
            str(d.get("code", INTERNAL)),
            str(d.get("message", "")),
            d.get("details") if isinstance(d.get("details"), dict) else None,
            d.get("traceback") if isinstance(d.get("traceback"), str) else None,
        )
