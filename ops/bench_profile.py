"""`python -m service` under a profiler, for `ops/bench_chat.py --gateway-module ops.bench_profile`.

The service's own files stay untouched: this wrapper runs the same `main()` with a profiler
on and writes what it saw when the process stops (SIGTERM ends `run_app` normally, so the
`finally` runs). Two profilers, chosen by `BENCH_PROFILE_MODE`:

- `stat` (default): a sampling profiler. SIGPROF fires every `BENCH_PROFILE_MS` (1) ms of
  the process's CPU time — in practice every scheduler tick (4 ms at HZ=250), the kernel's
  CPU-timer granularity — and the handler records the Python stack. Cheap (<1 % overhead),
  so shares are close to the real ones. Writes `<out>.folded` (flame-graph input: one stack per
  line, `;`-joined, then the count) and `<out>.txt` (self and inclusive shares per function).
  Python runs a signal handler at the next bytecode, so time inside C code called from
  Python is charged to its caller (right), while time in the event loop's own C code
  (epoll, reads, uvloop callbacks) is charged to the first Python frame that runs after it
  (a data_received, a task step): read those entries as "loop + that callback".
- `cprofile`: cProfile with a CPU-time clock, written to `<out>` (pstats). Deterministic
  counts (calls per request), but its per-call overhead inflates code of many small calls.

    BENCH_PROFILE_OUT=/tmp/gw .venv/bin/python -m ops.bench_chat --modes stream \\
        --concurrency 32 --gateway-module ops.bench_profile
    less /tmp/gw.txt
"""

from __future__ import annotations

import collections
import cProfile
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from service.__main__ import main as service_main

Frame = tuple[str, int, str]


def _where(frame: FrameType) -> Frame:
    code = frame.f_code
    return code.co_filename, code.co_firstlineno, code.co_name


class Sampler:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stacks: collections.Counter[tuple[Frame, ...]] = collections.Counter()
        self._cpu0 = 0.0

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        stack: list[Frame] = []
        while frame is not None:
            stack.append(_where(frame))
            frame = frame.f_back
        self.stacks[tuple(reversed(stack))] += 1

    def start(self) -> None:
        self._cpu0 = time.process_time()
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def write(self, out: Path) -> None:
        root = str(Path(__file__).resolve().parent.parent) + "/"

        def name(f: Frame) -> str:
            path = f[0].replace(root, "").split("site-packages/")[-1]
            return f"{f[2]} ({path}:{f[1]})"

        total = sum(self.stacks.values()) or 1
        cpu = time.process_time() - self._cpu0
        own: collections.Counter[str] = collections.Counter()
        incl: collections.Counter[str] = collections.Counter()
        with out.with_suffix(".folded").open("w") as folded:
            for stack, n in self.stacks.items():
                names = [name(f) for f in stack]
                folded.write(";".join(names) + f" {n}\n")
                if names:
                    own[names[-1]] += n
                for fn in set(names):
                    incl[fn] += n
        lines = [f"{total} samples over {cpu:.2f} s of CPU (one per {cpu * 1000 / total:.1f} ms)",
                 "", "self %  function"]
        lines += [f"{n * 100 / total:6.2f}  {fn}" for fn, n in own.most_common(60)]
        lines += ["", "incl %  function"]
        lines += [f"{n * 100 / total:6.2f}  {fn}" for fn, n in incl.most_common(80)]
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


def main() -> int:
    out = Path(os.environ.get("BENCH_PROFILE_OUT", "/tmp/gateway.prof"))
    if os.environ.get("BENCH_PROFILE_MODE", "stat") == "cprofile":
        # CPU time, not wall time: the event loop's idle waits in epoll would swamp it.
        prof = cProfile.Profile(time.process_time_ns, 1e-9)
        prof.enable()
        try:
            return service_main()
        finally:
            prof.disable()
            prof.dump_stats(out)
    sampler = Sampler(float(os.environ.get("BENCH_PROFILE_MS", "1")) / 1000)
    sampler.start()
    try:
        return service_main()
    finally:
        sampler.stop()
        sampler.write(out)


if __name__ == "__main__":
    sys.exit(main())
