"""The errors the colo package raises on purpose.

Every one derives from `ColoError`, so the socket layer can catch "the peer or the protocol went
wrong" in one place and drop the connection, while genuine bugs (TypeError, KeyError, ...) still
surface as themselves.
"""

from __future__ import annotations


class ColoError(Exception):
    """Base class of every error that colo raises deliberately."""


class WireError(ColoError):
    """A frame or message that cannot go on, or come off, the wire.

    Bad magic, wrong format version, oversized length, undecodable msgpack, an unknown message
    name, or a missing, extra or ill-typed field.
    """


class IntegrityError(WireError):
    """A frame after the handshake that is not authentic: altered, injected, replayed, reordered,
    dropped, from another connection or reflected back. The connection cannot be trusted any more."""


class ProtocolError(ColoError):
    """A message that is not legal in the current state, or carries the wrong epoch or size.

    `expected` and `got` hold the two halves of the message text separately, so tests and logs
    can use them without parsing.
    """

    def __init__(self, text: str, *, expected: str = "", got: str = "") -> None:
        super().__init__(text)
        self.expected = expected
        self.got = got


class AuthError(ColoError):
    """The peer did not prove knowledge of the shared key, or the key itself is unusable."""
