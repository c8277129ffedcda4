"""ZeroMQ socket helpers: the same options everywhere, so nothing is dropped silently."""

from __future__ import annotations

import os
from typing import Any

import msgspec
import zmq

# PUB drops and PUSH blocks once a peer's queue holds this many messages; set high enough
# that a healthy peer never reaches it (a dropped token batch would corrupt an answer).
HIGH_WATER_MARK = 1_000_000


def make_socket(ctx: zmq.Context, kind: int, address: str, *, bind: bool) -> zmq.Socket:
    """Create a socket of `kind`, bind or connect it to `address`, with the project's options."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.LINGER, 0)
    if bind:
        if address.startswith("ipc://"):
            path = address[len("ipc://") :]
            if os.path.exists(path):
                os.unlink(path)  # left by a process that was killed
        sock.bind(address)
    else:
        sock.connect(address)
    return sock


class Codec:
    """msgpack encoder and a typed decoder for one socket's union of messages."""

    def __init__(self, union: Any) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(union)

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self.encoder.encode(msg)

    def decode(self, data: bytes | memoryview) -> Any:
        return self.decoder.decode(data)
