"""Which HTTP client carries the requests to the upstream, through which proxy, trusting which CAs.

The default is the lean transport (`transport.py`) under the SDK's httpx client. Where a proxy
from the environment applies to the upstream URL (HTTP_PROXY / HTTPS_PROXY / ALL_PROXY, unless
NO_PROXY covers it, by the standard library's rules, which httpx and aiohttp follow too), the SDK's
own aiohttp client (`openai.DefaultAioHttpClient`, the `openai[aiohttp]` extra) carries them
instead: a proxied request is rare enough that the lean transport does not speak CONNECT.
`--upstream-transport aiohttp` picks aiohttp always.

Measured against the aiohttp client (issue 9), the lean transport needed ~30% less CPU to open a
stream and 12-14 kB less memory per stream, the same CPU per token; httpx's own stack needed 2.2x
aiohttp's CPU to open 2,000 streams, hence no httpx choice any more.
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Literal

import httpx2
import openai

from .settings import Settings, SettingsError
from .transport import FastTransport

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the SDK's, when neither flag nor variable says
Transport = Literal["fast", "aiohttp"]


def proxy_for(url: str, proxies: Mapping[str, str]) -> str | None:
    """The proxy that applies to `url`, or None. `proxies` is keyed as `urllib.request.getproxies()`
    is ("http", "https", "all", "no"); NO_PROXY matching is the standard library's own."""
    parts = urllib.parse.urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or parts.hostname is None:
        return None
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    # Undocumented but public since Python 2 (typeshed omits it); getproxies() feeds it likewise.
    if urllib.request.proxy_bypass_environment(host, dict(proxies)):  # type: ignore[attr-defined]
        return None
    return proxy


def choose(settings: Settings, url: str) -> tuple[Transport, str]:
    """The transport for requests to `url`, and why, in words for the start-up log."""
    if settings.upstream_transport == "aiohttp":
        return "aiohttp", "--upstream-transport aiohttp"
    proxy = proxy_for(url, dict(settings.proxies))
    if proxy is None:
        return "fast", "no proxy applies"
    host = urllib.parse.urlsplit(url).hostname
    return "aiohttp", f"the proxy {_without_credentials(proxy)} applies to {host}"


def tls_context(settings: Settings) -> ssl.SSLContext:
    """What the upstream's certificate is checked against: SSL_CERT_FILE / SSL_CERT_DIR when set
    (as OpenSSL, httpx and the SDK read them), else the system's trust store."""
    if settings.ssl_cert_file or settings.ssl_cert_dir:
        try:
            return ssl.create_default_context(cafile=settings.ssl_cert_file, capath=settings.ssl_cert_dir)
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"cannot load the CA certificates in SSL_CERT_FILE "
                                f"{settings.ssl_cert_file!r} / SSL_CERT_DIR {settings.ssl_cert_dir!r}: {exc}") from None
    return httpx2.create_ssl_context(trust_env=False)


def make_http_client(settings: Settings, timeout: httpx2.Timeout,
                     base_url: str | None) -> tuple[httpx2.AsyncClient, FastTransport | None]:
    """The SDK's HTTP client for the upstream at `base_url`, and the lean transport under it
    when it is that one; says at start-up which, and why."""
    url = base_url or DEFAULT_BASE_URL
    kind, why = choose(settings, url)
    log.info("upstream transport: %s (%s)", kind, why)
    # Only an https upstream needs the CAs loaded (the system bundle takes milliseconds).
    tls = tls_context(settings) if url.startswith("https:") or kind == "aiohttp" else None
    if kind == "fast":
        transport = FastTransport(connect_timeout=settings.connect_timeout, ssl_context=tls)
        return openai.DefaultAsyncHttpxClient(timeout=timeout, transport=transport), transport
    # httpx2 reads the proxy variables (trust_env) and mounts, per URL pattern, an aiohttp transport
    # that is handed the proxy explicitly; aiohttp's own trust_env stays off (it would also send
    # ~/.netrc credentials to the upstream). Its connector holds `max_connections` at most, the
    # SDK's default 1,000 doubled time to first token at 2,000 streams: 0 is aiohttp's "no limit".
    assert tls is not None
    return openai.DefaultAioHttpClient(
        timeout=timeout, verify=tls, trust_env=True,
        limits=httpx2.Limits(max_connections=0, max_keepalive_connections=200)), None


def _without_credentials(proxy: str) -> str:
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
