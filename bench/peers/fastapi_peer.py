"""The peer: the same `/ask` SSE relay written the idiomatic FastAPI + sse-starlette way.

    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 OPENAI_API_KEY=bench python bench/peers/fastapi_peer.py --port 8890

uvicorn, one worker, uvloop and httptools. `AsyncOpenAI(...).chat.completions.create(stream=True)`,
`async for chunk in stream`, one `update` event per text delta, then the same end frame as
tornado-sse. Two settings match tornado-sse's so the comparison is of the code path, not of the
configuration: no retries (the server runs with `--max-retries 0`) and no cap on the connection
pool (the SDK's default pool stops at 1,000 connections; tornado-sse lifts it too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from collections.abc import AsyncIterator

import httpx2
import openai
import uvicorn
from fastapi import FastAPI
from sse_starlette import EventSourceResponse

END_MARKER = "<END_STREAMING_SSE>"
MODEL = "gpt-4o-mini"

app = FastAPI()
client = openai.AsyncOpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL"),
    api_key=os.environ.get("OPENAI_API_KEY", "no-key"),
    max_retries=0,
    http_client=openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=None,
                                                                     max_keepalive_connections=200)),
)


@app.get("/ask")
async def ask(question: str) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": question}],
                temperature=0.8,
                max_tokens=1024,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield {"event": "update", "data": chunk.choices[0].delta.content}
        except openai.OpenAIError as exc:
            yield {"event": "error", "data": json.dumps({"code": type(exc).__name__, "message": str(exc)})}
        yield {"event": "update", "data": END_MARKER}

    return EventSourceResponse(events())


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8890)
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvicorn.run(app, host=args.host, port=args.port, workers=1, loop="uvloop", http="httptools",
                log_level="warning")


if __name__ == "__main__":
    main()
