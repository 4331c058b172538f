"""The scenarios: what the upstream sends, how the load generator drives it, what is reported."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    streams: int  # for saturation: the first step
    tokens: int  # per stream
    token_delay: float  # seconds between tokens at the upstream (1 / tokens per second)
    ramp: float  # seconds over which the streams are opened (0: all at once)
    drop_after: int = 0  # disconnect mode: the client closes after this many tokens
    steps: tuple[int, ...] = ()  # saturation: tokens/s per stream, raised until p99 > the limit
    step_seconds: float = 2.5  # saturation: seconds of steady streaming per step
    hold: float = 0.0  # close every stream this many seconds after all are open
    timeout: float = 60.0  # seconds the load generator may take at most (per step)

    def loadgen_args(self, latency_limit_ms: float) -> list[str]:
        args = ["--ramp", str(self.ramp), "--timeout", str(self.timeout)]
        if self.steps:
            args += ["--steps", ",".join(map(str, self.steps)), "--step-seconds", str(self.step_seconds),
                     "--latency-limit-ms", str(latency_limit_ms)]
        return args + ["--streams", str(self.streams), "--drop-after", str(self.drop_after),
                       "--hold", str(self.hold)]


def scenarios(quick: bool) -> dict[str, Scenario]:
    q = quick
    found = [
        Scenario("steady100", "100 streams x 50 tok/s", 100, 100 if q else 250, 0.02, 1.0),
        Scenario("steady500", "500 streams x 20 tok/s", 500, 40 if q else 100, 0.05, 1.0),
        Scenario("burst2000", "2,000 streams opened at once", 2000, 4, 0.05, 0.0, timeout=45.0),
        Scenario("saturation", "saturation: 200 streams, tok/s per stream raised", 200, 0, 0.05, 1.0,
                 steps=(2, 5, 10, 20, 40, 80) if q else (2, 5, 10, 20, 30, 45, 65, 90, 130, 180),
                 step_seconds=1.5 if q else 2.5, timeout=30.0),
        Scenario("hold5000", f"{2000 if q else 5000:,} slow streams (1 tok/s) held open",
                 2000 if q else 5000, 900, 1.0, 1.5 if q else 3.0, hold=3.0 if q else 5.0,
                 timeout=300.0),
        # 9,900, not 10,000: each stream holds two descriptors (reader, upstream) and the hard
        # RLIMIT_NOFILE here is 20,000.
        Scenario("burst9900", f"{2000 if q else 9900:,} streams opened at once", 2000 if q else 9900,
                 4, 0.05, 0.0, timeout=90.0),
        Scenario("disconnect100", "100 streams dropped after 10 tokens", 100, 250, 0.02, 1.0,
                 drop_after=10, timeout=30.0),
    ]
    return {s.name: s for s in found}


# (key, label, direction) per scenario; direction "lower"/"higher" is better, "" = context
ROWS: dict[str, list[tuple[str, str, str]]] = {
    "steady100": [("relay_p50_ms", "relay latency p50 (ms)", "lower"),
                  ("relay_p99_ms", "relay latency p99 (ms)", "lower"),
                  ("relay_early_p99_ms", "relay p99 while streams open (ms)", "lower"),
                  ("ttft_p50_ms", "TTFT p50 (ms)", "lower"),
                  ("tokens_per_s", "tokens/s delivered", "higher"),
                  ("cpu_us_per_token", "server CPU per token (us)", "lower"),
                  ("peak_rss_mib", "server peak RSS (MiB)", "lower"),
                  ("failed", "failed streams", "lower")],
    "burst2000": [("cpu_s", "server CPU to open them and relay 4 tokens each (s)", "lower"),
                  ("ttft_p50_ms", "TTFT p50 (ms)", "lower"),
                  ("ttft_p99_ms", "TTFT p99 (ms)", "lower"),
                  ("cpu_ms_per_stream", "server CPU per stream, set-up included (ms)", "lower"),
                  ("peak_rss_mib", "server peak RSS (MiB)", "lower"),
                  ("failed", "failed streams", "lower")],
    "saturation": [("sat_tokens_per_s", "tokens/s reached with p99 <= limit", "higher"),
                   ("sat_rate", "tok/s per stream at that step", "higher"),
                   ("sat_break_p99_ms", "p99 at the first step over (ms)", ""),
                   ("failed", "failed streams (all steps)", "lower")],
    "hold5000": [("rss_per_stream_kib", "RSS per open stream (KiB)", "lower"),
                 ("all_open_s", "seconds until every stream had a token", "lower"),
                 ("idle_rss_mib", "idle RSS (MiB)", "lower"),
                 ("open_rss_mib", "RSS with streams open (MiB)", "lower"),
                 ("relay_p99_ms", "relay latency p99 (ms)", "lower"),
                 ("cpu_s", "server CPU (s)", "lower"),
                 ("failed", "failed streams", "lower")],
    "disconnect100": [("close_seen_p50_ms", "upstream sees close, p50 (ms)", "lower"),
                      ("close_seen_p99_ms", "upstream sees close, p99 (ms)", "lower"),
                      ("chunks_after_close_mean", "chunks written after close, mean", "lower"),
                      ("chunks_after_close_max", "chunks written after close, max", "lower"),
                      ("close_not_seen", "closes never seen by upstream", "lower"),
                      ("failed", "failed streams", "lower")],
}
ROWS["steady500"] = ROWS["steady100"]
ROWS["burst9900"] = [("ttft_p50_ms", "TTFT p50 (ms)", "lower"),
                     ("ttft_p99_ms", "TTFT p99 (ms)", "lower"),
                     ("all_open_s", "seconds until every stream had a token", "lower"),
                     ("cpu_s", "server CPU (s)", "lower"),
                     ("peak_rss_mib", "server peak RSS (MiB)", "lower"),
                     ("failed", "failed streams", "lower")]
CONTEXT = [("server_cpu_pct", "server CPU %"), ("upstream_cpu_pct", "upstream CPU %"),
           ("loadgen_cpu_pct", "loadgen CPU %"), ("loadgen_lag_p99_ms", "loadgen loop lag p99 (ms)"),
           ("store_cpu_pct", "redis-server CPU %")]


def metrics(s: Scenario, lg: dict[str, Any], m: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers: from the load generator (`lg`), /proc (`m`) and the upstream's stats."""
    mib = 1 / 1024
    wall = max(m["wall_s"], 1e-9)
    out: dict[str, Any] = {
        "cpu_s": m["cpu_s"],
        "peak_rss_mib": m["hwm_kib"] * mib,
        "idle_rss_mib": m["idle_kib"] * mib,
        "open_rss_mib": (m["open_kib"] or m["max_kib"]) * mib,
        "server_cpu_pct": 100 * m["cpu_s"] / wall,
        "upstream_cpu_pct": 100 * m["upstream_cpu_s"] / wall,
        "loadgen_cpu_pct": 100 * m["loadgen_cpu_s"] / wall,
        "loadgen_lag_p99_ms": lg["loop_lag_ms"]["p99"],
        "store_cpu_pct": 100 * m["store_cpu_s"] / wall if m.get("store_cpu_s") is not None else None,
    }
    if s.steps:
        steps = lg["steps"]
        ok = [st for st in steps if not st["failed"] and (st["latency_ms"]["p99"] or 1e9) <= lg_limit(lg)]
        best = max(ok, key=lambda st: st["tokens_per_s"] or 0) if ok else None
        over = [st for st in steps if st not in ok]
        out.update(sat_tokens_per_s=best["tokens_per_s"] if best else 0.0,
                   sat_rate=best["rate"] if best else 0,
                   sat_break_p99_ms=over[0]["latency_ms"]["p99"] if over else None,
                   failed=sum(st["failed"] for st in steps),
                   steps=[{"rate": st["rate"], "tokens_per_s": st["tokens_per_s"],
                           "p99_ms": st["latency_ms"]["p99"], "failed": st["failed"]} for st in steps])
        return out
    tokens = lg["tokens"]
    out.update(
        relay_p50_ms=lg["latency_ms"]["p50"], relay_p99_ms=lg["latency_ms"]["p99"],
        ttft_p50_ms=lg["ttft_ms"]["p50"], ttft_p99_ms=lg["ttft_ms"]["p99"],
        tokens_per_s=lg["tokens_per_s"], failed=lg["failed"], outcomes=lg["outcomes"],
        all_open_s=lg["all_open_s"], relay_early_p99_ms=lg["latency_early_ms"]["p99"],
        cpu_us_per_token=1e6 * m["cpu_s"] / tokens if tokens else None,
        cpu_ms_per_stream=1e3 * m["cpu_s"] / s.streams,
        rss_per_stream_kib=((m["open_kib"] or m["max_kib"]) - m["idle_kib"]) / s.streams,
    )
    if s.drop_after:
        closed: dict[str, float] = lg["closed_at"]
        lags, after = [], []
        for gone in upstream.get("gone", []):
            at = closed.get(gone["question"])
            if at is not None:
                lags.append(1e3 * (gone["seen"] - at))
                after.append(sum(1 for t in gone["write_times"] if t > at))
        out.update(close_seen_p50_ms=_pct(lags, 50), close_seen_p99_ms=_pct(lags, 99),
                   chunks_after_close_mean=statistics.fmean(after) if after else None,
                   chunks_after_close_max=max(after) if after else None,
                   close_not_seen=len(closed) - len(lags))
    return out


def lg_limit(lg: dict[str, Any]) -> float:
    return float(lg.get("latency_limit_ms", 50.0))


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]
