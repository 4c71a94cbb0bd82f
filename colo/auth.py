"""Peer authentication: an HMAC-SHA256 challenge and response over a shared key, sans-I/O.

Both sides run the same `Handshake`, in two flights:

    1. each sends  auth-challenge {role, nonce, flags}   (a fresh 32-byte random nonce; flags:
                                                          FLAG_ENCRYPT or 0)
    2. each sends  auth-proof {mac}, mac = HMAC-SHA256(key, b"COLO-AUTH-2" 0x00 role 0x00
                                             own nonce || peer nonce || own flags || peer flags)

and each checks the peer's mac with `hmac.compare_digest`. Knowing the key is the only way to
compute a proof over a nonce we just chose, so a peer without the key fails; fresh nonces make an
old proof worthless (no replay); the role inside the MAC makes our own proof useless to send back
to us (no reflection), even from a second connection, since we only ever sign our own role. Both
ends must ask for the same flags, and the proofs cover both, so nobody in the middle can turn
encryption off (no downgrade).

Enforcement: the handshake is a separate object that the socket layer completes first, and the
protocol objects (`colo.protocol`) refuse to be built from a handshake that is not complete. Bytes
that arrive after the peer's proof are kept in `unused_data`; `session()` turns the completed
handshake into the `colo.session.SessionCodec` that seals every later frame, fed with those bytes.
Until then the decoder accepts only tiny frames (`AUTH_MAX_PAYLOAD`): an unauthenticated peer
cannot make us buffer a 64 MiB frame.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Collection, Mapping
from typing import NoReturn

from colo.errors import AuthError, ColoError, WireError
from colo.messages import FLAG_ENCRYPT, NONCE_SIZE, AuthChallenge, AuthProof, Message, describe
from colo.session import SessionCodec, direction_secret, transcript
from colo.wire import MAX_PAYLOAD, FrameDecoder, encode_frame

KEY_ENV = "COLO_KEY"
MIN_KEY_BYTES = 16
CONTEXT = b"COLO-AUTH-2"  # domain separation: these MACs mean "colo handshake, version 2" only
AUTH_MAX_PAYLOAD = 256  # the largest handshake payload is about 80 bytes


def generate_key() -> bytes:
    """A fresh 256-bit key, as 64 hex characters: safe in a text file and an env variable."""
    return secrets.token_hex(32).encode("ascii")


def check_key(key: bytes, source: str = "key") -> bytes:
    if not isinstance(key, bytes):
        raise AuthError(f"{source} must be bytes, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(
            f"{source} is {len(key)} bytes long; at least {MIN_KEY_BYTES} are needed "
            "(generate one with colo.auth.generate_key())"
        )
    return key


def load_key(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> bytes:
    """The shared key: from the file at `path` if given, else from the COLO_KEY variable.

    Surrounding whitespace is stripped (a trailing newline from an editor is not key material).
    """
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read(64 * 1024)  # a key file is small; do not slurp a mistaken large file
        except OSError as exc:
            raise AuthError(f"cannot read key file {os.fspath(path)!r}: {exc.strerror}") from exc
        return check_key(raw.strip(), f"key file {os.fspath(path)!r}")
    env = os.environ if environ is None else environ
    value = env.get(KEY_ENV)
    if value is None:
        raise AuthError(f"no key: pass a key file or set the {KEY_ENV} environment variable")
    return check_key(value.strip().encode("utf-8"), f"${KEY_ENV}")


def compute_proof(key: bytes, role: str, own_nonce: bytes, peer_nonce: bytes,
                  own_flags: int = 0, peer_flags: int = 0) -> bytes:
    """HMAC-SHA256 proof that the side playing `role` knows `key`, bound to both nonces and both
    ends' flags."""
    text = (CONTEXT + b"\x00" + role.encode("ascii") + b"\x00" + own_nonce + peer_nonce
            + own_flags.to_bytes(4, "big") + peer_flags.to_bytes(4, "big"))
    return hmac.new(key, text, hashlib.sha256).digest()


class Handshake:
    """One side of the handshake. Call `start()` once and send its bytes; feed every received
    byte to `receive_data()` and send what it returns; when `done`, hand over to the protocol.

    Any failure raises `AuthError` naming the problem and leaves the handshake failed for good.
    """

    def __init__(self, key: bytes, role: str, peer_role: str | Collection[str], *,
                 encrypt: bool = False, nonce: bytes | None = None) -> None:
        """`peer_role` is the role the peer must claim, or a collection of acceptable roles (a server
        that several kinds of peer connect to); `peer_role` then becomes the one the peer claimed.
        `encrypt`: the session after the handshake is encrypted; the peer must want the same."""
        self._key = check_key(key)
        accepted = frozenset([peer_role] if isinstance(peer_role, str) else peer_role)
        if role in accepted or not accepted:
            raise ValueError(f"role and peer_role must differ: peer_role must be one or more roles other than "
                             f"{role!r}, got {peer_role!r}")
        self.role = role
        self._accepted = accepted
        self.peer_role: str = peer_role if isinstance(peer_role, str) else ""
        # `nonce` is for tests only; real use takes a fresh one from the OS's CSPRNG.
        self._nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
        if type(encrypt) is not bool:
            raise ValueError(f"encrypt must be a bool, got {encrypt!r}")
        self.encrypt = encrypt
        self._flags = FLAG_ENCRYPT if encrypt else 0
        self._challenge = encode_frame(AuthChallenge(role, self._nonce, self._flags))  # validates
        for accepted_role in accepted:
            AuthChallenge(accepted_role, self._nonce)  # validate peer roles by the same rule
        self._decoder = FrameDecoder(AUTH_MAX_PAYLOAD)
        self._started = False
        self._peer_nonce: bytes | None = None
        self._own_proof: bytes | None = None
        self._done = False
        self._unused = b""
        self._failed: AuthError | None = None
        self._session_taken = False
        self._connection_id: str | None = None

    @property
    def done(self) -> bool:
        """True once we have sent our proof and verified the peer's."""
        return self._done

    @property
    def connection_id(self) -> str:
        """A short name of this connection that both ends compute alike, from both nonces (public values): the
        event stream matches a frame's sending to its receipt by it (colo.trace)."""
        if self._peer_nonce is None:
            return "-"
        if self._connection_id is None:
            a, b = sorted((self._nonce, self._peer_nonce))
            self._connection_id = hashlib.sha256(a + b).hexdigest()[:8]
        return self._connection_id

    @property
    def unused_data(self) -> bytes:
        """Bytes received after the peer's proof: the first bytes of the protocol stream."""
        if not self._done:
            raise RuntimeError("handshake not complete")
        return self._unused

    def session(self, *, encrypt: bool | None = None, max_payload: int = MAX_PAYLOAD) -> SessionCodec:
        """The codec that seals this connection's frames from now on, already fed with
        `unused_data`. Once per handshake: two codecs would reuse sequence numbers, which are the
        AEAD's nonces. `encrypt` defaults to what was negotiated; a different value is a bug.

        Bad bytes in `unused_data` do not raise here: the codec is returned failed (its `error`
        says why) and raises on the first `next_message()`, like any later bad frame."""
        if not self._done:
            raise RuntimeError("handshake not complete")
        if self._session_taken:
            raise RuntimeError("session() called twice: one codec per connection (its sequence "
                               "numbers are the AEAD's nonces)")
        if encrypt is not None and encrypt is not self.encrypt:
            raise ValueError(f"session(encrypt={encrypt}) but the handshake negotiated "
                             f"encrypt={self.encrypt}")
        assert self._peer_nonce is not None
        t = transcript([(self.role, self._nonce, self._flags),
                        (self.peer_role, self._peer_nonce, self._flags)])
        codec = SessionCodec(
            send_secret=direction_secret(self._key, t, self.role, self.peer_role),
            receive_secret=direction_secret(self._key, t, self.peer_role, self.role),
            encrypt=self.encrypt, role=self.role, peer_role=self.peer_role, max_payload=max_payload)
        self._session_taken = True
        try:
            codec.feed(self._unused)
        except ColoError:
            pass  # the codec stays failed and says so on its next call
        return codec

    def start(self) -> bytes:
        """Our auth-challenge frame. Send it first, before reading anything."""
        self._check_alive()
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        return self._challenge

    def receive_data(self, data: bytes) -> bytes:
        """Feed received bytes (b"" means the peer closed); returns bytes to send now."""
        self._check_alive()
        if not self._started:
            raise RuntimeError("call start() and send its bytes before receiving")
        if self._done:
            raise RuntimeError("handshake complete: feed further bytes to the protocol object")
        if not data:
            pending = self._decoder.buffered
            # A peer that rejects our proof says nothing (an impostor learns nothing): it closes. After our
            # proof, the likeliest reason by far is a different key on the two ends.
            self._fail(
                "connection closed during authentication"
                + (f" (inside a frame, {pending} bytes buffered)" if pending else "")
                + (": the peer closed after our proof (does it have our key?)" if self._own_proof else "")
            )
        try:
            self._decoder.feed(data)
            out = b""
            while not self._done and (msg := self._decoder.next_message()) is not None:
                out += self._handle(msg)
        except WireError as exc:
            self._fail(f"bad handshake frame: {exc}", exc)
        if self._done:
            self._unused = self._decoder.take_unused()
        return out

    def _handle(self, msg: Message) -> bytes:
        if self._peer_nonce is None:
            if not isinstance(msg, AuthChallenge):
                self._fail(f"expected auth-challenge, got {describe(msg)}")
            if msg.role not in self._accepted:
                roles = " or ".join(repr(r) for r in sorted(self._accepted))
                self._fail(f"peer says it is {msg.role!r}, expected {roles}")
            self.peer_role = msg.role
            if hmac.compare_digest(msg.nonce, self._nonce):
                self._fail("peer sent our own nonce back (reflected challenge)")
            if msg.flags != self._flags:  # the only flag is FLAG_ENCRYPT (the field rule)
                wants = "wants encryption, we do not" if msg.flags & FLAG_ENCRYPT else \
                    "does not want encryption, we do"
                self._fail(f"the peer {wants}: start both with --encrypt or neither")
            self._peer_nonce = msg.nonce
            self._own_proof = compute_proof(self._key, self.role, self._nonce, msg.nonce,
                                            self._flags, msg.flags)
            return encode_frame(AuthProof(self._own_proof))
        if not isinstance(msg, AuthProof):
            self._fail(f"expected auth-proof, got {describe(msg)}")
        assert self._own_proof is not None
        if hmac.compare_digest(msg.mac, self._own_proof):
            self._fail("peer sent our own proof back (reflected proof)")
        wanted = compute_proof(self._key, self.peer_role, self._peer_nonce, self._nonce,
                               self._flags, self._flags)
        if not hmac.compare_digest(msg.mac, wanted):
            self._fail("auth-proof does not verify: the peer does not have our key")
        self._done = True
        return b""

    def _fail(self, text: str, cause: BaseException | None = None) -> NoReturn:
        self._failed = AuthError(f"{self.role}: authentication failed: {text}")
        raise self._failed from cause

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise AuthError(f"{self.role}: handshake already failed: {self._failed}")
