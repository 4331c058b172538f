"""Time to first token at low load: what each server adds over the upstream's own, p50.

One question at a time, each on a new connection: first straight to the fake upstream (POST
/v1/chat/completions, until the first content chunk), then through the server under test (GET
/ask, until the first `update` frame). The difference of the medians is what the relay adds.

    python bench/ttft.py            # both sides, 200 questions each
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import free_port, start, stop, server_cmd, wait_http  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def first_token_ms(port: int, request: bytes, marker: bytes) -> float:
    """Milliseconds from sending `request` on a new connection to receiving `marker`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seen = b""
        started = time.perf_counter()
        sock.sendall(request)
        while marker not in seen:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"closed before {marker!r}: {seen[-300:]!r}")
            seen += chunk
        return 1000 * (time.perf_counter() - started)


def direct_request() -> bytes:
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "q"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


ASK = b"GET /ask?question=q HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    up_port = free_port()
    upstream = start([sys.executable, "-m", "tornado_sse.demo", "--port", str(up_port), "--tokens", "3",
                      "--first-token-delay", "0", "--token-delay", "0"], RESULTS / "ttft-upstream.log")
    rows = []
    try:
        time.sleep(1.0)
        direct = [first_token_ms(up_port, direct_request(), b'"content": "tok0') for _ in range(args.questions)]
        env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1", "OPENAI_API_KEY": "bench"}
        for side in ("tornado-sse", "fastapi-peer"):
            port = free_port()
            server = start(server_cmd(side, port), RESULTS / f"ttft-{side}.log", env=env)
            try:
                wait_http(port, "/ask?question=warmup")
                for _ in range(20):
                    first_token_ms(port, ASK, b"event: update")
                via = [first_token_ms(port, ASK, b"event: update") for _ in range(args.questions)]
            finally:
                stop(server)
            rows.append((side, statistics.median(via), statistics.median(via) - statistics.median(direct)))
    finally:
        stop(upstream)
    print(f"upstream alone: time to first token p50 {statistics.median(direct):.2f} ms "
          f"({args.questions} questions, one at a time)\n")
    print("| server | TTFT p50 (ms) | added over the upstream, p50 (ms) |\n| --- | ---: | ---: |")
    for side, p50, added in rows:
        print(f"| {side} | {p50:.2f} | {added:.2f} |")


if __name__ == "__main__":
    main()
