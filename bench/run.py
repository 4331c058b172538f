"""The benchmark, one command: tornado-sse against the raw-asyncio floor (peers/floor.py) and
FastAPI + sse-starlette, printed as Markdown.

    python bench/run.py                  # every scenario, 3 runs per side (about 10-15 minutes)
    python bench/run.py --quick          # 1 run, smaller scenarios
    python bench/run.py --scenario hold5000 --runs 1

For every run, scenario and side it starts a fresh upstream (bench/upstream.py) and a fresh server,
warms the server up, drives it with bench/loadgen.py in its own process, reads the server's CPU time
and memory from /proc, and stops everything. Medians over the runs go to a Markdown table on stdout;
every number of every run goes to bench/results/<time>.json (rewritten after each measurement).

`--code HEAD` (or any revision) benchmarks that commit instead of the work tree: `git archive`
extracts it under bench/results/ and every process imports tornado_sse from there (git's state is
only read, never changed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import loadgen
import procs
from scenarios import CONTEXT, ROWS, Scenario, metrics, scenarios

SIDES = ("tornado-sse", "floor", "fastapi-peer")
# tornado-sse with --store redis://... on its own redis-server, compared with tornado-sse alone:
#   python bench/run.py --scenario steady100 --side tornado-sse --side tornado-sse-redis \
#       --tornado-flags="--resume-grace 30"
REDIS_SIDE = "tornado-sse-redis"
RESULTS = procs.BENCH / "results"


def measure(s: Scenario, side: str, logs: Path, latency_limit_ms: float, env: dict[str, str],
            tornado_flags: list[str] | None = None) -> dict[str, Any]:
    """One scenario against one side, with its own upstream and server processes."""
    py = sys.executable
    up = procs.start([py, str(procs.BENCH / "upstream.py"), "--tokens", str(s.tokens),
                      "--token-delay", str(s.token_delay)], logs / "upstream.log", env, stdout_pipe=True)
    srv = redis = None
    try:
        up_port = int(procs.read_line(up, 20).split()[1])
        port = procs.free_port()
        redis_port = procs.free_port() if side == "tornado-sse-redis" else None
        if redis_port is not None:
            redis = procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no"], logs / "redis.log")
            time.sleep(0.3)
        srv = procs.start(procs.server_cmd(side, port, tornado_flags, redis_port), logs / f"{side}.log",
                          env={**env, "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
                               "OPENAI_API_KEY": "bench"})
        procs.wait_http(port, "/healthz")
        warm = asyncio.run(loadgen.run_streams("127.0.0.1", port, 20, prefix="warmup", timeout=15))
        if warm["completed"] != 20:
            raise RuntimeError(f"warm-up failed against {side}: {warm['outcomes']}")
        time.sleep(0.3)
        idle_kib = procs.memory_kib(srv.pid)["VmRSS"]
        cpu0, up_cpu0, t0 = procs.cpu_seconds(srv.pid), procs.cpu_seconds(up.pid), time.monotonic()
        store_cpu0 = procs.cpu_seconds(redis.pid) if redis is not None else 0.0
        sampler = procs.RssSampler(srv.pid)
        lg_proc = procs.start([py, str(procs.BENCH / "loadgen.py"), "--port", str(port),
                               *s.loadgen_args(latency_limit_ms)], logs / "loadgen.log", stdout_pipe=True)
        deadline = t0 + s.timeout * max(1, len(s.steps)) + 30
        open_kib, result = 0, None
        while result is None and time.monotonic() < deadline:
            line = procs.read_line(lg_proc, deadline - time.monotonic())
            if not line:
                break
            if line.startswith("READY"):
                open_kib = procs.memory_kib(srv.pid)["VmRSS"]
            elif line.startswith("{"):
                result = json.loads(line)
        procs.stop(lg_proc, grace=5)
        wall = time.monotonic() - t0
        cpu_s, up_cpu_s = procs.cpu_seconds(srv.pid) - cpu0, procs.cpu_seconds(up.pid) - up_cpu0
        hwm_kib, max_kib = procs.memory_kib(srv.pid)["VmHWM"], sampler.stop()
        if result is None:
            raise RuntimeError(f"the load generator gave no result (see {logs / 'loadgen.log'})")
        stats = upstream_stats(up_port, len(result.get("closed_at", {})))
        m = {"wall_s": wall, "cpu_s": cpu_s, "upstream_cpu_s": up_cpu_s, "idle_kib": idle_kib,
             "open_kib": open_kib, "max_kib": max_kib, "hwm_kib": hwm_kib,
             "loadgen_cpu_s": _loadgen_cpu(result),
             "store_cpu_s": procs.cpu_seconds(redis.pid) - store_cpu0 if redis is not None else None}
        return metrics(s, result, m, stats)
    finally:
        if srv is not None:
            procs.stop(srv)
        procs.stop(up, grace=2)
        if redis is not None:
            procs.stop(redis, grace=2)


def code_env(rev: str | None, stamp: str) -> tuple[dict[str, str], str]:
    """PYTHONPATH for a `git archive` of `rev` (empty: the work tree), and a description of it."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=procs.ROOT, capture_output=True, text=True).stdout.strip()
    if not rev:
        dirty = " + uncommitted changes" if git("status", "--porcelain", "--", "tornado_sse") else ""
        return {}, f"work tree at {git('rev-parse', '--short', 'HEAD')}{dirty}"
    dest = RESULTS / f"code-{stamp}"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "tornado_sse", "templates", "static"], cwd=procs.ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return {"PYTHONPATH": str(dest)}, f"commit {git('rev-parse', '--short', rev)} ({rev})"


def upstream_stats(port: int, dropped: int, wait: float = 6.0) -> dict[str, Any]:
    """The upstream's /_stats; with dropped streams, wait up to `wait` s for it to see them all."""
    deadline = time.monotonic() + wait
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as r:
            stats: dict[str, Any] = json.load(r)
        if len(stats["gone"]) >= dropped or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def _loadgen_cpu(result: dict[str, Any]) -> float:
    if "steps" in result:
        return float(sum(st["loadgen_cpu_s"] for st in result["steps"]))
    return float(result["loadgen_cpu_s"])


def median(values: list[Any]) -> float | None:
    nums = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


def ratio(ours: float | None, other: float | None) -> str:
    return f"{ours / other:.2f}" if ours is not None and other else "-"


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) >= 10:
        return f"{int(v):,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"


def store_table(runs: dict[str, dict[str, list[dict[str, Any]]]], chosen: dict[str, Scenario]) -> str:
    """tornado-sse with the memory store against the Redis store: redis / memory per metric."""
    head = ["| scenario | metric | --store memory | --store redis | redis/memory |",
            "| --- | --- | ---: | ---: | ---: |"]
    ctx = ["| scenario | side | " + " | ".join(label for _, label in CONTEXT) + " |",
           "| --- | --- |" + " ---: |" * len(CONTEXT)]
    for name, s in chosen.items():
        per_side = runs.get(name, {})
        for key, label, better in ROWS[name]:
            memory, shared = (median([r.get(key) for r in per_side.get(side, [])])
                              for side in (SIDES[0], REDIS_SIDE))
            arrow = {"lower": " (lower is better)", "higher": " (higher is better)"}.get(better, "")
            head.append(f"| {s.title} | {label}{arrow} | {fmt(memory)} | {fmt(shared)} | {ratio(shared, memory)} |")
        for side in (SIDES[0], REDIS_SIDE):
            values = [fmt(median([r.get(k) for r in per_side.get(side, [])])) for k, _ in CONTEXT]
            ctx.append(f"| {name} | {side} | " + " | ".join(values) + " |")
    return "\n".join(head) + "\n\nContext (medians; CPU % is of one core over the scenario):\n\n" + "\n".join(ctx)


def table(runs: dict[str, dict[str, list[dict[str, Any]]]], chosen: dict[str, Scenario]) -> str:
    head = ["| scenario | metric | tornado-sse | floor | FastAPI peer | ours/floor | ours/peer |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    ctx = ["| scenario | side | " + " | ".join(label for _, label in CONTEXT) + " |",
           "| --- | --- |" + " ---: |" * len(CONTEXT)]
    for name, s in chosen.items():
        per_side = runs.get(name, {})
        for key, label, better in ROWS[name]:
            ours, floor, peer = (median([r.get(key) for r in per_side.get(side, [])]) for side in SIDES)
            arrow = {"lower": " (lower is better)", "higher": " (higher is better)"}.get(better, "")
            head.append(f"| {s.title} | {label}{arrow} | {fmt(ours)} | {fmt(floor)} | {fmt(peer)} "
                        f"| {ratio(ours, floor)} | {ratio(ours, peer)} |")
        for side in SIDES:
            values = [fmt(median([r.get(k) for r in per_side.get(side, [])])) for k, _ in CONTEXT]
            ctx.append(f"| {name} | {side} | " + " | ".join(values) + " |")
    return "\n".join(head) + "\n\nContext (medians; CPU % is of one core over the scenario):\n\n" + "\n".join(ctx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run, smaller scenarios")
    p.add_argument("--runs", type=int, default=None, help="runs per side (default 3, --quick 1)")
    p.add_argument("--scenario", action="append", default=[], help="run only this one (repeatable)")
    p.add_argument("--side", action="append", choices=(*SIDES, REDIS_SIDE), default=[],
                   help="only this side")
    p.add_argument("--latency-limit-ms", type=float, default=50.0, help="saturation: p99 limit")
    p.add_argument("--code", default=None, help="benchmark this git revision instead of the work tree")
    p.add_argument("--tornado-flags", default="", help="extra flags for the tornado-sse sides, "
                   "e.g. \"--resume-grace 30\" (the Redis store shares frames only with a grace)")
    args = p.parse_args()
    procs.raise_nofile()
    every = scenarios(args.quick)
    unknown = [n for n in args.scenario if n not in every]
    if unknown:
        p.error(f"unknown scenario {unknown}; choose from {', '.join(every)}")
    chosen = {n: every[n] for n in (args.scenario or every)}
    sides = [s for s in (*SIDES, REDIS_SIDE) if (s in args.side if args.side else s in SIDES)]
    n_runs = args.runs or (1 if args.quick else 3)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / f"logs-{stamp}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    env, code = code_env(args.code, stamp)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    errors: list[str] = []
    out = RESULTS / f"{stamp}.json"
    for i in range(n_runs):
        for name, s in chosen.items():
            for side in (sides if i % 2 == 0 else sides[::-1]):  # alternate who goes first
                t = time.monotonic()
                try:
                    r = measure(s, side, logs, args.latency_limit_ms, env, args.tornado_flags.split())
                    runs.setdefault(name, {}).setdefault(side, []).append(r)
                except Exception as exc:  # one broken measurement must not lose the others
                    errors.append(f"run {i + 1} {name} {side}: {type(exc).__name__}: {exc}")
                print(f"run {i + 1}/{n_runs} {name:<14} {side:<13} {time.monotonic() - t:5.1f} s",
                      file=sys.stderr, flush=True)
                out.write_text(json.dumps({"args": vars(args), "code": code, "runs": runs,
                                           "errors": errors}, indent=1))
    if REDIS_SIDE in sides:
        print(f"## tornado-sse: the memory store vs the Redis store (median of {n_runs} run(s); {code})\n")
        print(store_table(runs, chosen))
    else:
        print(f"## tornado-sse vs the raw-asyncio floor and FastAPI + sse-starlette (median of {n_runs} run(s); {code})\n")
        print(table(runs, chosen))
    for e in errors:
        print(f"\n- ERROR {e}")
    print(f"\nAll numbers: {out.relative_to(procs.ROOT)}; process logs: {logs.relative_to(procs.ROOT)}/")


if __name__ == "__main__":
    main()
