"""POST a streamed request straight through the lean transport, with the SDK's own decisions.

Per stream, `client.post` builds options (pydantic), headers (httpx Headers), a URL and an httpx
Request, and httpx wraps the answer in a Response: most of a stream's set-up CPU and ~9 kB held
for the stream's whole life (issue 12). Here the SDK builds the request head once (auth, base
URL, its default headers, `X-Stainless-Retry-Count` per attempt); per stream only the JSON body
changes. Everything that is not a 2xx answer goes through the SDK's own pieces, as in its
`AsyncAPIClient.request` (openai/_base_client.py): which answers are retried (`_should_retry`:
408, 409, 429, 5xx, `x-should-retry`, a `Retry-After` over 60 s refuses), how long to wait
and the log line before a retry (`_sleep_for_retry`: `Retry-After`, else exponential back-off
with jitter), the typed error (`_make_status_error_from_response`), and `APITimeoutError` /
`APIConnectionError` for failures before an answer.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx2
import openai
from openai._models import FinalRequestOptions

from .transport import Exchange, FastTransport, key_of

# json.dumps with these arguments builds an encoder on every call (3.4 -> 2.6 us a body).
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class DirectPoster:
    def __init__(self, client: openai.AsyncOpenAI, transport: FastTransport, path: str):
        self._client = client
        self._transport = transport
        self._options = FinalRequestOptions.construct(method="post", url=path, json_data=b"")
        self._heads: dict[int, tuple[tuple[str, str, int], bytes, httpx2.Request]] = {}

    def _head(self, retries_taken: int) -> tuple[tuple[str, str, int], bytes, httpx2.Request]:
        """The request head for this attempt, up to `Content-Length: `, built once by the SDK."""
        head = self._heads.get(retries_taken)
        if head is None:
            request = self._client._build_request(self._options, retries_taken=retries_taken)
            del request.headers["Content-Length"]
            prefix = FastTransport._head(request)[:-2] + b"Content-Length: "
            head = self._heads[retries_taken] = (key_of(request.url), prefix, request)
        return head

    async def post(self, body: dict[str, Any]) -> Exchange | None:
        """A 2xx answer, its body unread; else the SDK's typed error, after its retries; None for
        a redirect, which the caller sends through the SDK's client (it follows redirects)."""
        # The bytes httpx's JSON encoding (and the SDK's openapi_dumps) would send.
        content = _to_json(body).encode()
        client = self._client
        max_retries = client.max_retries
        for retries_taken in range(max_retries + 1):
            remaining = max_retries - retries_taken
            key, prefix, request = self._head(retries_taken)
            try:
                exchange = await self._transport.exchange(
                    key, prefix + b"%d\r\n\r\n" % len(content) + content)
            except (httpx2.RequestError, ssl.SSLError) as err:  # timeouts included
                if remaining > 0:
                    await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                                  options=self._options, response=None)
                    continue
                if isinstance(err, httpx2.TimeoutException):
                    raise openai.APITimeoutError(request=request) from err
                raise openai.APIConnectionError(request=request) from err
            if 200 <= exchange.status < 300:
                exchange.headers = []  # nothing reads them: ~0.8 kB less held for the stream's life
                return exchange
            if 300 <= exchange.status < 400:
                await exchange.aclose()
                return None
            try:
                response = httpx2.Response(exchange.status, headers=exchange.headers,
                                           content=await exchange.read(), request=request)
            finally:
                await exchange.aclose()
            if remaining > 0 and client._should_retry(response):
                await client._sleep_for_retry(retries_taken=retries_taken, max_retries=max_retries,
                                              options=self._options, response=response)
                continue
            raise client._make_status_error_from_response(response) from None
        raise AssertionError("unreachable: the last attempt returns or raises")
