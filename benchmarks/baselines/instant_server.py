"""A server that answers every request at once with one fixed prediction: the load generator's ceiling.

``siam bench`` loads it like the real systems (same requests, same clients, same machine), so its rate
is the most the load generator can measure here; a system that comes near it is measured by the load
generator, not by itself. Plain asyncio (uvloop when installed) and a hand-rolled HTTP/1.1 reader, the
lightest server Python has, so that it spends as little of the shared CPU as it can.

``python -m benchmarks.baselines.instant_server --port 8000``
"""

from __future__ import annotations

import argparse
import asyncio
import json

# What siam answers for one image at m = 16 (the load generator reads it as it reads a real answer).
ANSWER = json.dumps({"id": "0" * 32, "label": 3, "class_name": "cat", "probabilities": [0.1] * 10,
                     "vote_share": 0.5, "samples": 16, "model": "instant", "latency_ms": 0.0,
                     "aggregation": "softmax"}).encode()


def response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode() + body


OK, HEALTH = response("200 OK", ANSWER), response("200 OK", b'{"status":"ok"}')


class Instant(asyncio.Protocol):
    """Keep-alive HTTP/1.1: each complete request (head and Content-Length body) gets its answer at once."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return  # the rest of the body is still coming
            del self.buffer[: end + 4 + length]
            assert self.transport is not None
            self.transport.write(HEALTH if head.startswith("GET") else OK)


async def serve(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Instant, host, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
