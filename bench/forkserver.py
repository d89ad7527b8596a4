"""The fork server: a process that imports torch, torchvision (and timm when a cell uses it) once and forks one
child per cell, so a cell's process is ready in milliseconds instead of the seconds those imports take.

Each child is still a process of its own: its own session (a kill takes its DataLoader workers too), its own
peak memory, its own CUDA context (the server never initialises CUDA), its own stderr and exit code. It dies
when the server dies (PDEATHSIG), and the server dies with the runner (PDEATHSIG, and the end of its socket).

Not multiprocessing's forkserver: that one re-imports the caller's `__main__` in every child, passes every child
the pipe that keeps the server alive (so a cell would outlive a runner killed with -9), and is one per
interpreter with the environment of its first use. Here the runner and the server share one SOCK_SEQPACKET
socket pair. After its imports the server sends {"ready": true} or {"error": ...}. A request is one JSON message
(target "module:function", args, env, cwd, sys.path) carrying three descriptors: a socket the server answers on
(the child's pid, later its exit code), the child's stdout and its stderr. That socket's end before the exit
code means the server died: the harness failed, not the cell, which runs again next time (`ForkServer`).
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Callable

from bench.errors import BenchError

FORKSERVER, SUBPROCESS = "forkserver", "subprocess"
READY_TIMEOUT_S = 300.0  # importing torch from a cold network file system can take minutes
MAX_DEATHS = 3  # servers that may die in one run before cells start as fresh processes instead
_INT = struct.Struct("q")
# Read once, when a library or the interpreter loads (OpenMP's wait policy and thread count, MKL's and OpenBLAS's,
# the C allocator's, Python's own): a forked child keeps the server's values whatever its environment says. torch
# reads its own variables when it uses them (CUDA_VISIBLE_DEVICES when CUDA initialises, in the child), and sets
# some itself in whichever process imports its compiler (TORCHINDUCTOR_CACHE_DIR), so they are not compared.
_READ_AT_LOAD = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "LD_", "MALLOC_", "GLIBC_TUNABLES", "PYTHON")


def wanted() -> bool:
    """Whether cells start from the fork server: on Linux unless BENCH_START_METHOD=subprocess (or spawn)."""
    method = os.environ.get("BENCH_START_METHOD", FORKSERVER).strip().lower()
    if method not in (FORKSERVER, SUBPROCESS, "spawn"):
        raise BenchError(f"BENCH_START_METHOD={method!r} is not a start method; use forkserver or subprocess")
    # PDEATHSIG, which ties a child to the server and the server to the runner, is Linux's.
    return method == FORKSERVER and sys.platform.startswith("linux")


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (kill -9 included), so no orphan trains on; exit
    at once if the parent (`parent`, or any but init) is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1 or (parent is not None and os.getppid() != parent):
        os._exit(1)


def _read_at_load(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_LOAD)}


class _Server:
    """One fork server process: the runner's end of its socket, its stderr, whether it is ready or was lost."""

    def __init__(self, env: dict[str, str], preload: list[str]):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.stderr = tempfile.TemporaryFile()  # import warnings and a crash's last words; not the user's terminal
        self.ready = self.lost = False
        self._said = ""
        self._ended = threading.Event()
        try:
            self.proc = _popen_kept([sys.executable, "-m", "bench.forkserver", str(theirs.fileno()), ",".join(preload)],
                                    self._ended, pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=self.stderr)
        finally:
            theirs.close()

    def wait_ready(self) -> str | None:
        """Wait for its imports: None once it is ready, else why it is not."""
        self.control.settimeout(READY_TIMEOUT_S)
        try:
            said = json.loads(self.control.recv(1 << 16) or b'{"error": "it exited while importing"}')
        except (OSError, ValueError) as exc:
            said = {"error": f"no answer ({exc.__class__.__name__})"}
        self.control.settimeout(None)
        self.ready = bool(said.get("ready"))
        return None if self.ready else said.get("error", "unknown")

    def last_words(self) -> str:
        """The last line the server wrote to stderr ('' if none)."""
        if self.stderr.closed:
            return self._said
        self.stderr.seek(0)
        tail = [ln for ln in self.stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return tail[-1].strip()[:300] if tail else ""

    def ending(self) -> str:
        """How its process ended, once `close` has waited for it."""
        code = self.proc.returncode
        if code is None or code >= 0:
            return f"it exited with code {code}"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"

    def close(self) -> None:
        """End it (closing its socket ends a live server; any child left dies with it) and its keeper thread."""
        if self.stderr.closed:
            return
        self.control.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._said = self.last_words()
        self.stderr.close()
        self._ended.set()


class ForkServer:
    """The runner's side: starts the server and forks children from it. A server that dies is the harness failing,
    not its cells: the cells it ran end `interrupted` (no row: they run again next time), one warning line says so,
    and the next cell starts a new server (up to MAX_DEATHS times; then cells start as fresh processes)."""

    def __init__(self, env: dict[str, str], preload: list[str]):
        self.env, self._preload = dict(env), list(preload)
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._deaths = 0
        self._server = _Server(self.env, self._preload)

    def start(self, target: str, args: list, env: dict[str, str], stderr: int) -> Forked | None:
        """A child running `target(*args)` with `env`, its stderr on the descriptor `stderr`; None where the
        server cannot give it `env` (a variable read at load time differs) or has failed."""
        if _read_at_load(env) != _read_at_load(self.env):
            return None
        for _ in range(2):  # a server found dead when asked is replaced, and the new one asked, once
            server = self._live()
            if server is None:
                return None
            try:
                return self._fork(server, target, args, env, stderr)
            except (OSError, EOFError) as exc:
                self.lost(server, f"it stopped answering ({exc.__class__.__name__})")
        return None

    def _fork(self, server: _Server, target: str, args: list, env: dict[str, str], stderr: int) -> Forked:
        reply, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        request = {"target": target, "args": args, "env": env, "cwd": os.getcwd(),
                   "sys_path": [str(p) for p in sys.path]}
        try:
            with self._lock:
                socket.send_fds(server.control, [json.dumps(request).encode()], [theirs.fileno(), out_w, stderr])
            pid = _read_int(reply)
        except BaseException:
            reply.close()
            os.close(out_r)
            raise
        finally:
            theirs.close()
            os.close(out_w)
        return Forked(pid, reply, os.fdopen(out_r, "r", errors="replace"), lambda: self.lost(server))

    def wait_ready(self) -> bool:
        """Wait for the server's imports; False (and a warning, once) where it failed."""
        return self._live() is not None

    def _live(self) -> _Server | None:
        """The server to fork from, its imports done: the current one, or a new one in place of one lost; None
        where the server has failed."""
        with self._lock:
            if self._failure is None and self._server.lost:
                if self._deaths >= MAX_DEATHS:
                    self._fail(f"it died {self._deaths} times")
                else:
                    self._server = _Server(self.env, self._preload)
            if self._failure is None and not self._server.ready:
                if (why := self._server.wait_ready()) is not None:
                    self._fail(why)
            return None if self._failure is not None else self._server

    def lost(self, server: _Server, reason: str | None = None) -> None:
        """`server` died (or stopped answering): end it and say so in one line; the next cell starts a new one."""
        with self._lock:
            if server.lost or server.stderr.closed:  # one line for all the cells it ran; none after `close`
                return
            server.lost, self._deaths = True, self._deaths + 1
            server.close()
            said = server.last_words()
            then = "; the next cells start from a new server" if self._deaths < MAX_DEATHS else ""
            # One line on stderr, as the CLI's warnings are: the run goes on.
            print(f"warning: the fork server died ({reason or server.ending()}{'; ' + said if said else ''}); the "
                  f"cells it was running get no row and run again with the next `bench run`{then}", file=sys.stderr,
                  flush=True)

    def _fail(self, reason: str) -> None:
        """From now on every cell starts as a fresh process; say so once, with the server's last words."""
        if self._failure is None:
            self._failure = reason
            said = self._server.last_words()
            warnings.warn(f"bench: the fork server failed ({reason}{'; ' + said if said else ''}); the remaining "
                          f"cells start as fresh processes (start_method = subprocess)", stacklevel=4)

    def close(self) -> None:
        """End the server (closing its socket ends it; any child left dies with it)."""
        with self._lock:
            self._failure = self._failure or "closed"
            self._server.close()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Forked:
    """A child of the server, with the part of `subprocess.Popen` the cell's supervisor uses. Only the server can
    wait for it, so its exit code arrives on `reply`; the reply's end before the exit code means the server died
    (`server_lost`), and the child with it."""

    def __init__(self, pid: int, reply: socket.socket, stdout, on_lost: Callable[[], None]):
        self.pid, self.stdout, self.returncode, self._reply = pid, stdout, None, reply
        self.server_lost, self._on_lost = False, on_lost

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._reply.settimeout(timeout)
            try:
                self.returncode = _read_int(self._reply)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: a timeout of 0 makes the socket non-blocking
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout or 0) from None
            except (OSError, EOFError):  # the server died, and its children with it (PDEATHSIG)
                self.returncode, self.server_lost = -signal.SIGKILL, True
                self._on_lost()
            self._reply.close()
        return self.returncode


def _popen_kept(argv: list[str], keep_until: threading.Event, **popen) -> subprocess.Popen:
    """Popen from a thread of its own that lives until `keep_until` is set. Linux sends PDEATHSIG when the *thread*
    that started a process ends, and a new server in place of a dead one is asked for from a device's thread,
    which may end (no cells left for it) while the server still serves the others."""
    handed: queue.SimpleQueue = queue.SimpleQueue()

    def keep() -> None:
        try:
            handed.put(subprocess.Popen(argv, **popen))
        except Exception as exc:  # noqa: BLE001 - raised again in the thread that asked
            handed.put(exc)
            return
        keep_until.wait()

    threading.Thread(target=keep, name="bench-forkserver-keeper", daemon=True).start()
    started = handed.get()
    if isinstance(started, Exception):
        raise started
    return started


def _read_int(sock: socket.socket) -> int:
    data = b""
    while len(data) < _INT.size:
        chunk = sock.recv(_INT.size - len(data))
        if not chunk:
            raise EOFError("the fork server closed the connection")
        data += chunk
    return _INT.unpack(data)[0]


# ----- the server's side: `python -m bench.forkserver FD MODULES` -----


def serve(control: socket.socket, preload: list[str]) -> None:
    """Import `preload`, say whether that worked, then fork a child per request until the runner goes away."""
    try:
        for name in preload:
            importlib.import_module(name)
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            raise RuntimeError("importing initialised CUDA, which a forked child could not use")
    except Exception as exc:  # noqa: BLE001 - reported to the runner, which starts fresh processes instead
        control.send(json.dumps({"error": f"{exc.__class__.__name__}: {exc}"}).encode())
        return
    control.send(b'{"ready": true}')
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the runner's to handle: it ends us by closing the socket
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # SIGCHLD wakes the loop below
    signal.signal(signal.SIGCHLD, lambda *_: None)
    replies: dict[int, socket.socket] = {}
    with selectors.DefaultSelector() as selector:
        selector.register(control, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is control:
                    message, fds, _, _ = socket.recv_fds(control, 1 << 20, 3)
                    if not message:  # the runner closed its end, or died
                        return
                    _fork(json.loads(message), fds, replies, theirs=[selector, control, wake_r, wake_w])
                else:
                    os.read(wake_r, 4096)
                    _reap(replies)


def _fork(request: dict, fds: list[int], replies: dict[int, socket.socket], theirs: list) -> None:
    """Fork the child `request` asks for; `theirs` (the server's selector, socket and pipe) are closed in it."""
    reply, stdout, stderr = socket.socket(fileno=fds[0]), fds[1], fds[2]
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        _child(request, stdout, stderr, server, [*theirs, reply, *replies.values()])
    os.close(stdout)
    os.close(stderr)
    try:
        reply.sendall(_INT.pack(pid))
        replies[pid] = reply
    except OSError:  # the runner gave up on this child already; it is reaped all the same
        reply.close()


def _child(request: dict, stdout: int, stderr: int, server: int, inherited: list) -> None:
    """Become the cell's process: its own session, dead with the server, the runner's descriptors, environment,
    working directory and import path; then run the target and exit with its return value."""
    code = 1
    try:
        os.setsid()
        die_with_parent(server)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for held in inherited:  # descriptors as ints, sockets and the selector as objects that own theirs
            os.close(held) if isinstance(held, int) else held.close()
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        os.close(stdout)
        os.close(stderr)
        sys.stdout.reconfigure(line_buffering=True)
        os.environ.clear()
        os.environ.update(request["env"])  # CUDA reads CUDA_VISIBLE_DEVICES when it initialises: here, later
        os.chdir(request["cwd"])
        sys.path[:] = request["sys_path"]
        module, _, name = request["target"].partition(":")
        code = getattr(importlib.import_module(module), name)(*request["args"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the traceback goes to the cell's log; the exit code says it failed
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _reap(replies: dict[int, socket.socket]) -> None:
    """Send each ended child's exit code (negative: the signal that ended it) to whoever started it."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply = replies.pop(pid, None)
        if reply is not None:
            try:
                reply.sendall(_INT.pack(os.waitstatus_to_exitcode(status)))
            except OSError:
                pass
            reply.close()


if __name__ == "__main__":
    die_with_parent()
    serve(socket.socket(fileno=int(sys.argv[1])), [m for m in sys.argv[2].split(",") if m])
