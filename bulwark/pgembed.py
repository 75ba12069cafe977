"""A private PostgreSQL cluster for development and tests, driven through `pg_ctl`.

The default when `DATABASE_URL` is unset: one cluster under `.data/pg`, kept across runs.
Layout of `data_dir` (ours; the cluster itself is one level down so that our own files
never confuse initdb)::

    data_dir/pgdata/        the cluster (PGDATA)
    data_dir/port           the TCP port, so a restart reuses it and DSNs stay valid
    data_dir/postgres.log   server log

initdb refuses to run as root, so as root every server binary runs as the `postgres`
system user (created when missing) through `runuser`, `data_dir` belongs to that user,
and its parents are made traversable (o+x), as pgserver does. As an ordinary user the
binaries run directly. The server listens on 127.0.0.1 only, with trust authentication
and no Unix socket (socket paths are limited to ~100 bytes, which deep temp dirs exceed).
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import TracebackType

PG_USER = "postgres"  # the OS user the server runs as when we are root
ROLE = "bulwark"  # bootstrap superuser of the cluster (initdb -U), owner of the database
DATABASE = "bulwark"
HOST = "127.0.0.1"
DEFAULT_DATA_DIR = Path(".data/pg")

#: Generous: the first start of a fresh cluster on a loaded 2-core CI box takes seconds.
_PG_CTL_WAIT_SEC = 60


class EmbeddedPostgresError(RuntimeError):
    """The cluster could not be initialised, started or stopped; the message says why."""


def find_bindir() -> Path:
    """Directory holding initdb, pg_ctl and postgres of one PostgreSQL version."""
    wanted = ("initdb", "pg_ctl", "postgres")
    found = shutil.which("pg_ctl")
    if found is not None:
        # /usr/local/bin/pg_ctl is a symlink into the versioned directory; resolving it
        # keeps all three binaries of the same version together.
        bindir = Path(found).resolve().parent
        if all((bindir / tool).exists() for tool in wanted):
            return bindir
    candidates = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.is_dir()]

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.parent.name)) or (0,)

    for bindir in sorted(candidates, key=version, reverse=True):
        if all((bindir / tool).exists() for tool in wanted):
            return bindir
    raise EmbeddedPostgresError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin; install the postgresql server package or set DATABASE_URL"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As Postgres binds: connections of our last run may linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _ensure_pg_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        pass
    # A concurrent process may create it between our check and useradd; re-read either way.
    subprocess.run(  # noqa: S603 (fixed arguments)
        [  # noqa: S607 (useradd lives in /usr/sbin or /sbin depending on the distribution)
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            PG_USER,
        ],
        capture_output=True,
        check=False,
    )
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        raise EmbeddedPostgresError(
            f"running as root and the {PG_USER!r} system user could not be created"
        ) from None


def _make_traversable(path: Path) -> None:
    """chmod o+x every ancestor of `path`, so the server user can reach its data dir."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def _clean_env() -> dict[str, str]:
    # PGDATA, PGPORT, PGOPTIONS… from the caller's shell must not steer our cluster.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


class EmbeddedPostgres:
    """One private cluster in `data_dir`; `start()` returns its asyncpg DSN."""

    def __init__(self, data_dir: Path, *, port: int | None = None, throwaway: bool = False) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.port_file = self.data_dir / "port"
        self.log_file = self.data_dir / "postgres.log"
        self._port = port
        #: Test clusters trade crash safety for speed; never set for data you keep.
        self.throwaway = throwaway
        self._as_root = os.geteuid() == 0
        self._bindir: Path | None = None

    # -- public ---------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        port = self._current_port()
        if port is None:
            raise EmbeddedPostgresError(f"no cluster has been started in {self.data_dir}")
        return f"postgresql://{ROLE}@{HOST}:{port}/{DATABASE}"

    def start(self) -> str:
        """Initialise if needed and start; a running cluster is reused. Returns the DSN."""
        self._prepare_dir()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        if self._running_pid() is not None:
            return self.dsn
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)  # stale: its process is gone
        port = self._choose_port()
        opts = [f"-p {port}"]
        if self.throwaway:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        result = self._run(
            "pg_ctl",
            "start",
            "-D",
            self.pgdata,
            "-l",
            self.log_file,
            "-w",
            "-t",
            str(_PG_CTL_WAIT_SEC),
            "-s",
            "-o",
            " ".join(opts),
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_ctl start failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{self._log_tail()}"
            )
        return self.dsn

    def stop(self) -> None:
        """Fast shutdown (disconnects clients, no crash recovery needed); no-op if stopped."""
        if self._running_pid() is None:
            return
        result = self._run(
            "pg_ctl",
            "stop",
            "-D",
            self.pgdata,
            "-m",
            "fast",
            "-w",
            "-t",
            str(_PG_CTL_WAIT_SEC),
            "-s",
        )
        if result.returncode != 0 and self._running_pid() is not None:
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed ({result.returncode}): {result.stderr.strip()}"
            )

    def is_running(self) -> bool:
        return self._running_pid() is not None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------

    def _bin(self, tool: str) -> str:
        if self._bindir is None:
            self._bindir = find_bindir()
        return str(self._bindir / tool)

    def _run(
        self, tool: str, *args: str | Path, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self._bin(tool), *map(str, args)]
        if self._as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        return subprocess.run(  # noqa: S603 (our binaries, our paths)
            cmd,
            cwd=self.data_dir,  # the caller's cwd may be unreadable by the postgres user
            env=_clean_env(),
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            # A new session: a Ctrl-C meant for the caller's terminal must not reach the
            # server; the cluster is stopped explicitly (stop(), or the CLI).
            start_new_session=True,
        )

    def _prepare_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self._as_root:
            return
        user = _ensure_pg_user()
        _make_traversable(self.data_dir)
        if self.data_dir.stat().st_uid != user.pw_uid or (
            self.pgdata.exists() and self.pgdata.stat().st_uid != user.pw_uid
        ):
            _chown_tree(self.data_dir, user.pw_uid, user.pw_gid)
        os.chmod(self.data_dir, 0o700)

    def _initdb(self) -> None:
        # Initialise aside and rename at the end, so a crash mid-way never leaves a
        # half-made cluster that a later start would take for a real one.
        staging = self.data_dir / "pgdata.init"
        if staging.exists():
            shutil.rmtree(staging)
        args: list[str | Path] = [
            "-D",
            staging,
            "-U",
            ROLE,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if self.throwaway:
            args.append("--no-sync")
        result = self._run("initdb", *args)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"initdb failed: {result.stderr.strip()}")
        with open(staging / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# bulwark embedded cluster\n"
                f"listen_addresses = '{HOST}'\n"
                "unix_socket_directories = ''\n"
                # web x N (listener + pool each), healthd, migrations and tests at once.
                "max_connections = 200\n"
            )
        # Single-user mode runs as the bootstrap superuser (ROLE) without a listening
        # server, so the database exists before the first real start.
        result = self._run(
            "postgres",
            "--single",
            "-D",
            staging,
            "-F",
            "-c",
            "exit_on_error=true",
            "postgres",
            stdin=f"CREATE DATABASE {DATABASE} OWNER {ROLE};\n",
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"creating database {DATABASE!r} failed: {result.stderr.strip()}"
            )
        staging.rename(self.pgdata)

    def _choose_port(self) -> int:
        if self._port is not None:
            port = self._port
        else:
            try:
                port = int(self.port_file.read_text().strip())
            except (FileNotFoundError, ValueError):
                port = free_port()
            if not _port_is_free(port):
                # Someone else took our old port while we were stopped: move, since
                # nobody can be holding a DSN to a cluster that is not running.
                port = free_port()
        self.port_file.write_text(f"{port}\n")
        return port

    def _current_port(self) -> int | None:
        # While running, postmaster.pid line 4 is authoritative; otherwise the port file.
        if self._running_pid() is not None:
            try:
                return int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
            except (OSError, IndexError, ValueError):
                pass
        if self._port is not None:
            return self._port
        try:
            return int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _running_pid(self) -> int | None:
        """The postmaster's pid if this cluster is running; None if stopped or stale."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, IndexError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            # Alive but not ours (our server runs as us, or as PG_USER that root can
            # signal): a recycled pid after a crash or a container restart.
            return None
        # A recycled pid can also belong to a process we may signal (root may signal
        # any): the postmaster lives in its data directory and was started with it.
        proc = Path(f"/proc/{pid}")
        if not Path("/proc/self").exists():
            return pid  # no procfs to ask: trust the pid file
        try:
            cwd = proc.joinpath("cwd").resolve(strict=True)
        except FileNotFoundError:
            return None
        except PermissionError:
            pass  # hardened procfs hides cwd even from root; the command line stays readable
        else:
            return pid if cwd == self.pgdata.resolve() else None
        try:
            argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return None
        except PermissionError:
            return pid
        return pid if os.fsencode(self.pgdata) in argv else None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bulwark.pgembed", description="Manage the embedded PostgreSQL cluster."
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--throwaway", action="store_true", help="fsync off: fast, loses data on an OS crash"
    )
    args = parser.parse_args(argv)
    pg = EmbeddedPostgres(args.data_dir, port=args.port, throwaway=args.throwaway)
    try:
        if args.command == "start":
            print(pg.start())
            return 0
        if args.command == "stop":
            pg.stop()
            return 0
        if pg.is_running():
            print(f"running {pg.dsn}")
            return 0
        print("stopped")
        return 3  # pg_ctl's code for "not running"
    except EmbeddedPostgresError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
