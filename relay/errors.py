"""The relay's error vocabulary.

Modelled on h11's LocalProtocolError/RemoteProtocolError split: *remote* errors mean a peer
(Twilio, an agent, a caller of our HTTP API) sent something wrong; they end only the call or
request they belong to and become a close event with a reason, never a crash. *Local*
errors mean we were asked to do something invalid.
"""

from __future__ import annotations

#: exit status of a command cut short by Ctrl-C (128 + SIGINT, as shells report it)
EXIT_INTERRUPTED = 130


class RelayError(Exception):
    """Base of every error the relay raises on purpose.

    ``kind`` is a short stable label used as the ``kind`` label of the
    ``relay_errors_total`` metric and in the one-line log of the failure.
    """

    kind = "relay"

    def __init__(self, message: str, *, kind: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class LocalProtocolError(RelayError):
    """We tried to do something the protocol does not allow (a bug or misuse)."""

    kind = "local_protocol"


class RemoteProtocolError(RelayError):
    """A peer sent bytes that break its protocol (malformed JSON, oversized frame, ...)."""

    kind = "remote_protocol"


class ConnectionClosed(RelayError):
    """The peer closed (or we closed) a WebSocket; carries the close code and reason."""

    kind = "closed"

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason

    def copy(self) -> ConnectionClosed:
        """A fresh exception to raise for a close that is kept as state. Raising the kept
        one would attach a traceback whose frames hold the socket that holds the exception:
        a reference cycle per connection that only the cyclic collector can free."""
        return type(self)(self.code, self.reason)


class AuthError(RelayError):
    """A signature or token did not verify."""

    kind = "auth"


class AgentError(RelayError):
    """The voice agent failed (connect failure, fatal error event, dead socket)."""

    kind = "agent"


class ConfigError(RelayError):
    """The configuration is invalid; the message says which key and why."""

    kind = "config"
