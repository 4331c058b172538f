"""What padding frames costs per token: CPU to build a frame, and bytes on the wire.

    python bench/padding.py            # medians of 9 rounds of 200,000 frames each

It times exactly what Stream.number does per token (tornado_sse/streams.py), with and without
`--pad-frames`: the frame's bytes (sse.encode_event), then the random step
(StreamRegistry.pad_step) and sse.pad. In-process and single-threaded, so a machine busy with other work changes the
absolute numbers but hardly the difference. The whole relay (bench/run.py --scenario steady100,
once with TORNADO_SSE_PAD_FRAMES=false in the environment) puts it in proportion.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tornado_sse import sse
from tornado_sse.registry import StreamRegistry

# Token-sized deltas like a chat model's: 1 to 12 characters, some with a leading space.
TOKENS = ["The", " answer", " is", " 42", ".", "\n\n", " Tornado", "'s", " event", " loop", ",",
          " relays", " every", " token", " as", " it", " comes", " in", "!", " \u00e9t\u00e9"]


def plain(n: int) -> float:
    start = time.perf_counter_ns()
    for i in range(n):
        sse.encode_event("update", TOKENS[i % 20], f"opg6h1TTwA6_WExb.{i}")
    return (time.perf_counter_ns() - start) / n


def padded(n: int) -> float:
    step = StreamRegistry.__new__(StreamRegistry)  # only its random steps: no backend, no loop
    step._random = []
    start = time.perf_counter_ns()
    for i in range(n):
        frame = sse.encode_event("update", TOKENS[i % 20], f"opg6h1TTwA6_WExb.{i}")
        sse.pad(frame, step.pad_step())
    return (time.perf_counter_ns() - start) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--frames", type=int, default=200_000)
    args = p.parse_args()
    off, on = [], []
    for _ in range(args.rounds):  # interleaved, so a burst of load hits both alike
        off.append(plain(args.frames))
        on.append(padded(args.frames))
    frames = [sse.encode_event("update", t, f"opg6h1TTwA6_WExb.{100 + i}") for i, t in enumerate(TOKENS)]
    size_off = statistics.mean(len(f) for f in frames)
    size_on = statistics.mean(len(sse.pad(f, n)) for f in frames for n in range(sse.PAD_STEPS))
    print(f"frame building, median of {args.rounds} x {args.frames:,} frames:")
    print(f"  --no-pad-frames  {statistics.median(off):7.0f} ns per token")
    print(f"  --pad-frames     {statistics.median(on):7.0f} ns per token "
          f"(+{statistics.median(on) - statistics.median(off):.0f} ns)")
    print(f"bytes per token frame (SSE only, before chunk and TLS framing): "
          f"{size_off:.1f} unpadded, {size_on:.1f} padded")


if __name__ == "__main__":
    main()
