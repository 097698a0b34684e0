"""Typed errors of the TurboMind API. A bad request raises one of these in its caller's thread;
the engine thread and every other request go on."""
from . import _turbomind as _tm


class EngineError(RuntimeError):
    """The engine could not serve a request (a failure inside a step, or a closed engine)."""


class EngineFailure(EngineError):
    """The engine cannot go on (e.g. a tensor-parallel rank died): the loop stops and every
    request, running or later, fails with this error."""


class RequestError(ValueError):
    """A request the engine rejected; `code` is v0.0.2's error code (kInvalid=1, ...)."""

    code = _tm.ERR_INVALID

    def __init__(self, message: str, code: int = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidRequest(RequestError):
    """Malformed input: bad ids, bad sampling parameters, unknown session, ..."""
    code = _tm.ERR_INVALID


class SessionConflict(RequestError):
    """Another request for the same session is already queued."""
    code = _tm.ERR_CONFLICT


class SessionBusy(RequestError):
    """The session is generating; wait for it or cancel it."""
    code = _tm.ERR_BUSY


class SessionInactive(RequestError):
    """Nothing is running for the session (cancel of an idle or unknown session)."""
    code = _tm.ERR_INACTIVE


class SessionTooLong(RequestError):
    """History + input does not fit session_len; end the session and start a new one."""
    code = _tm.ERR_TOO_LONG


class NoCapacity(RequestError):
    """The request needs more KV blocks than the whole pool holds."""
    code = _tm.ERR_NO_CAPACITY


_BY_CODE = {cls.code: cls for cls in (InvalidRequest, SessionConflict, SessionBusy,
                                      SessionInactive, SessionTooLong, NoCapacity)}


def error_for(code: int, message: str) -> Exception:
    """The exception for a scheduler error code."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls else EngineError(message)
