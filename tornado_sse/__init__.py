"""tornado-sse: stream chat completions to the browser over Server-Sent Events."""

__version__ = "0.1.0"
