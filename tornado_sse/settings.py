"""Every setting of the server in one frozen object, with its default and its validation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

BackendName = Literal["auto", "openai", "demo"]
BACKENDS: tuple[BackendName, ...] = ("auto", "openai", "demo")
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting and what it accepts."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8888
    model: str = "gpt-4o-mini"
    temperature: float = 0.8
    max_tokens: int = 1024
    backend: BackendName = "auto"
    max_question_chars: int = 4000
    log_level: str = "info"
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    max_retries: int = 2
    # From the environment, the variables the openai SDK itself reads. The key never reaches a
    # repr, a log line or a response.
    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, "backend", self.backend, "one of " + "|".join(BACKENDS))
        _check(0 <= self.port <= 65535, "port", self.port, "0 to 65535")
        _check(0.0 <= self.temperature <= 2.0, "temperature", self.temperature, "0 to 2")
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "a whole number >= 1")
        _check(self.max_question_chars >= 1, "max_question_chars", self.max_question_chars, ">= 1")
        _check(self.log_level in LOG_LEVELS, "log_level", self.log_level, "|".join(LOG_LEVELS))
        _check(self.connect_timeout > 0, "connect_timeout", self.connect_timeout, "seconds > 0")
        _check(self.read_timeout > 0, "read_timeout", self.read_timeout, "seconds > 0")
        _check(self.max_retries >= 0, "max_retries", self.max_retries, "a whole number >= 0")
        _check(bool(self.model.strip()), "model", self.model, "a model name")

    @property
    def resolved_backend(self) -> Literal["openai", "demo"]:
        """`auto` means: a real upstream when one is configured (a key or a base URL), else the demo."""
        if self.backend == "auto":
            return "openai" if (self.api_key or self.base_url) else "demo"
        return self.backend

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))

    def with_environment(self, environ: Mapping[str, str]) -> Settings:
        """The openai SDK's own variables: OPENAI_API_KEY and OPENAI_BASE_URL."""
        return dataclasses.replace(
            self,
            api_key=environ.get("OPENAI_API_KEY") or None,
            base_url=environ.get("OPENAI_BASE_URL") or None,
        )


def _check(ok: bool, name: str, value: object, accepted: str) -> None:
    if not ok:
        flag = "--" + name.replace("_", "-")
        raise SettingsError(f"invalid {flag}: {value!r} (accepted: {accepted})")
