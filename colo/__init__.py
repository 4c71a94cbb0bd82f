"""colo: COLO-style replication for toyvm.

The protocol core is sans-I/O: `messages` (the vocabulary), `wire` (framing), `auth` (the HMAC
handshake) and `protocol` (the per-side state machines) turn bytes into events and messages into
bytes, and never touch a socket, a thread or a clock. See docs/protocol.md.
"""
