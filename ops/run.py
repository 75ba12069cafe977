"""`ops/run`: everything a newcomer needs on one machine, in one command.

- PostgreSQL: `DATABASE_URL` if set, else an embedded cluster kept under `.data/pg`.
- The schema (`python -m schema migrate`).
- The provider simulator on :9100 (served by the web process) as three providers, alpha,
  beta and gamma, when no providers file is configured, so that the first `curl` gets an
  answer and a second shows a failover once one of them is failed.
- healthd, and `--web N` web processes sharing `BULWARK_PORT` (default 8080).

Ctrl-C (or SIGTERM) stops the processes, then the embedded cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bulwark.config import SIM_FLEET, providers_path, settings_from_env

ROOT = Path(__file__).resolve().parent.parent


def _wait_http(url: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status < 500:
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops/run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--web", type=int, default=1, help="web processes (default 1)")
    parser.add_argument("--no-healthd", action="store_true", help="do not start healthd")
    parser.add_argument("--data-dir", default=str(ROOT / ".data" / "pg"))
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    settings = settings_from_env(env)
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    pg = None
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if not settings.database_url:
            from bulwark.pgembed import EmbeddedPostgres

            pg = EmbeddedPostgres(Path(args.data_dir))
            env["DATABASE_URL"] = pg.start()
            print(f"run: embedded PostgreSQL at {env['DATABASE_URL']} (data in {args.data_dir})",
                  flush=True)
        from schema.migrate import migrate

        applied = asyncio.run(migrate(env["DATABASE_URL"]))
        print(f"run: schema ready (applied now: {applied or 'nothing'})", flush=True)

        python = sys.executable
        sim_root = settings.sim_url.rstrip("/").removesuffix("/v1")
        if providers_path(settings) is None:
            print(f"run: no providers file: the web process serves the simulator as "
                  f"{', '.join(SIM_FLEET)} at {sim_root}/<name>/v1", flush=True)
        if not args.no_healthd:
            procs.append(("healthd", subprocess.Popen([python, "-m", "healthd"], env=env)))
        for _ in range(args.web):
            procs.append(("web", subprocess.Popen([python, "-m", "service"], env=env)))
        base = f"http://{settings.host}:{settings.port}"
        if _wait_http(f"{base}/health/live", 15):
            print(f"run: ready — try:\n  curl {base}/v1/chat/completions "
                  "-H 'Content-Type: application/json' "
                  "-d '{\"model\": \"default\", \"messages\": [{\"role\": \"user\", "
                  "\"content\": \"Hello\"}]}'", flush=True)
            if providers_path(settings) is None:
                print(f"run: fail a provider:  curl -X POST {sim_root}/{SIM_FLEET[0]}/_sim/fail"
                      f"   (heal: …/_sim/reset)\n"
                      f"run: watch it:         {base}/status", flush=True)
        while not stopping:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"run: {name} exited with {proc.returncode}; stopping", flush=True)
                    stopping = True
            time.sleep(0.2)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg is not None:
            pg.stop()
            print("run: embedded PostgreSQL stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
