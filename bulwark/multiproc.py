"""The per-host directory where every web process keeps its Prometheus samples.

prometheus_client's multiprocess mode: each process writes its counters, histograms and
gauges to memory-mapped files of its own (`<type>_<pid>.db`) in one directory, and whichever
process answers `GET /metrics` sums them. The mode is chosen when prometheus_client is
imported (`PROMETHEUS_MULTIPROC_DIR`), so `prepare()` runs at the very start of
`python -m service`, before anything imports `bulwark.metrics`.

The directory is `PROMETHEUS_MULTIPROC_DIR` when the operator sets one, else
`<system temp dir>/bulwark-metrics-<host>-<port>`: the processes serving one address on one
host are one formation, whatever started them. Several of them start at once, and any may
have been killed before, so each start tidies up under an exclusive lock on `.lock`:

- a `live-<pid>` marker says "this process is alive and writing here", written before the
  lock is released, so a process that starts a moment later never mistakes it for a leftover;
- files of processes that are gone: their `live*` gauges (a dead process's breaker state is
  no state at all) are removed always; their counters and histograms only when no process of
  the formation is alive, that is, when the whole formation restarts — counters must not
  go backwards under a scraper while other processes still count;
- at exit, the process removes its own live gauges (`mark_process_dead`) and its marker,
  and the last one to leave removes every file.

Nothing here imports prometheus_client before the environment variable is set.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import re
import sys
import tempfile
from collections.abc import MutableMapping
from pathlib import Path
from typing import Final

log = logging.getLogger("bulwark.metrics")

ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_FILE = re.compile(r"^(?P<kind>[a-z]+)(?:_(?P<mode>[a-z]+))?_(?P<pid>\d+)\.db$")
_MARKER = re.compile(r"^live-(?P<pid>\d+)$")


def default_dir(host: str, port: int) -> Path:
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", host) or "any"
    return Path(tempfile.gettempdir()) / f"bulwark-metrics-{safe_host}-{port}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge, keep its files
    return True


def tidy(path: Path, *, own_pid: int) -> dict[str, int]:
    """Remove what dead processes left (see the module docstring); caller holds the lock.
    Returns how many files went, by kind, for the start-up log line."""
    pids: set[int] = set()
    for entry in path.iterdir():
        m = _FILE.match(entry.name) or _MARKER.match(entry.name)
        if m:
            pids.add(int(m["pid"]))
    alive = {pid for pid in pids if pid == own_pid or _alive(pid)}
    others_alive = bool(alive - {own_pid})
    removed = {"gauges": 0, "totals": 0, "markers": 0}
    for entry in path.iterdir():
        if (m := _MARKER.match(entry.name)) and int(m["pid"]) not in alive:
            entry.unlink(missing_ok=True)
            removed["markers"] += 1
            continue
        m = _FILE.match(entry.name)
        if m is None or int(m["pid"]) in alive:
            continue
        if m["kind"] == "gauge" and (m["mode"] or "").startswith("live"):
            entry.unlink(missing_ok=True)
            removed["gauges"] += 1
        elif not others_alive:
            entry.unlink(missing_ok=True)
            removed["totals"] += 1
    return removed


def prepare(host: str, port: int, env: MutableMapping[str, str] | None = None) -> Path:
    """Choose, create and tidy this formation's directory, and set the variable that puts
    prometheus_client in multiprocess mode. Must run before prometheus_client is imported."""
    env = os.environ if env is None else env
    if "prometheus_client" in sys.modules and not env.get(ENV):
        raise RuntimeError(
            "prometheus_client was imported before the metrics directory was chosen: "
            "call bulwark.multiproc.prepare() first in the process's entry point")
    path = Path(env.get(ENV) or default_dir(host, port))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    pid = os.getpid()
    with (path / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            removed = tidy(path, own_pid=pid)
            (path / f"live-{pid}").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    env[ENV] = str(path)
    atexit.register(_at_exit, path, pid)
    log.debug("metrics directory ready", extra={"path": str(path), **removed})
    return path


def _at_exit(path: Path, pid: int) -> None:
    """Remove this process's gauges and marker; the last process of the formation to leave
    removes every file (the next start would, anyway), so stopped formations leave nothing."""
    if os.getpid() != pid:  # a forked child inherits atexit; the files are the parent's
        return
    from prometheus_client import multiprocess

    with contextlib.suppress(OSError), (path / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
            (path / f"live-{pid}").unlink(missing_ok=True)
            tidy(path, own_pid=pid)
            if not any(_MARKER.match(p.name) for p in path.iterdir()):
                for entry in path.iterdir():
                    if _FILE.match(entry.name):
                        entry.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
