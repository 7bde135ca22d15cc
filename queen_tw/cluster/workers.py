"""NUM_WORKERS: several server processes sharing one listening socket.

The parent opens the socket once and starts each worker as ``twistd queen`` with the socket
inherited as file descriptor 3 (``QUEEN_LISTEN_FD``); the kernel spreads new connections
over the processes that accept on it. The parent serves nothing itself:

- it restarts a worker that dies, with a growing delay while it keeps dying;
- a worker that refused to start (status 1, after saying why: a failed schema upgrade, an
  unusable buffer directory) ends the whole server the same way, since a restart would only
  refuse again;
- on stop, it sends SIGTERM to every worker and waits for them; a worker still running
  :data:`~queen_tw.lifecycle.WORKER_KILL_AFTER_S` later gets SIGKILL, inside the parent's
  own stop budget (the numbers live in ``queen_tw.lifecycle``).

A worker whose parent is gone (SIGKILLed, crashed) stops itself gracefully within a second
(:func:`parent_watch`): left running it would keep the port, so a restarted parent could not
listen, and nobody would restart it when it died.

With peer sync on, the parent also binds the one UDP socket of the instance and hands it to
worker 1 alone (descriptor 4, ``QUEEN_SYNC_FD``); why and how the other workers take part is
told in :mod:`queen_tw.cluster.wiring`.
"""

import os
import signal
import socket
import sys
from typing import Dict, Optional

from twisted.application import internet, service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger

from queen_tw.cluster.wiring import open_udp_socket
from queen_tw.cluster.worker_names import worker_name
from queen_tw.config import Config
from queen_tw.lifecycle import WORKER_KILL_AFTER_S
from queen_tw.listening import open_listening_socket
from queen_tw.services.retry import Backoff
from queen_tw.startup import EXIT_FAILURE, fatal

log = Logger()

INHERITED_FD = 3
SYNC_FD = 4
"""Where worker 1 finds the peer-sync UDP socket."""
RESTART_BACKOFF = (1.0, 2.0, 30.0)
"""Restart delay of a worker that died: 1 s, doubling up to 30 s while it keeps dying young."""
STEADY_S = 60.0
"""A worker that ran this long before dying is restarted after the initial delay again."""
PARENT_ENV = "QUEEN_WORKER_PARENT"
"""The parent's pid, as a worker is told it (internal: set by the parent, not an option)."""
PARENT_CHECK_S = 1.0


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", index: int, started: float):
        self.supervisor = supervisor
        self.index = index
        self.started = started
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)
        self.supervisor.worker_ended(self, reason.value)


class WorkerSupervisor(service.Service):
    """Starts, restarts and stops the worker processes.

    :param config: the parent's configuration; each worker gets it as environment
        variables plus its own ``WORKER_ID`` and the inherited socket.
    :param reactor: provides ``spawnProcess`` and ``callLater``.
    :param base_env: the environment the workers inherit (PATH and the like).
    :param kill_after: seconds between SIGTERM and SIGKILL at stop.
    """

    def __init__(self, config: Config, reactor, base_env: Dict[str, str],
                 kill_after: float = WORKER_KILL_AFTER_S):
        self._config = config
        self._reactor = reactor
        self._base_env = base_env
        self._kill_after = kill_after
        self._socket: Optional[socket.socket] = None
        self._sync_socket: Optional[socket.socket] = None
        self._workers: Dict[int, _Worker] = {}
        self._processes: Dict[int, IProcessTransport] = {}
        self._restarts: Dict[int, Backoff] = {}

    def privilegedStartService(self):
        # Bound before the reactor runs (and before an embedded PostgreSQL starts), so a port
        # in use refuses to start with one line instead of leaving a parent without workers.
        super().privilegedStartService()
        self._socket = open_listening_socket(self._config.host, self._config.port)
        self._open_sync_socket()

    def startService(self):
        super().startService()
        if self._socket is None:  # started without twistd's privileged step
            self._socket = open_listening_socket(self._config.host, self._config.port)
            self._open_sync_socket()
        listening = self._socket
        log.info("{n} workers sharing {host}:{port}", n=self._config.num_workers,
                 host=self._config.host, port=listening.getsockname()[1])
        for index in range(self._config.num_workers):
            self._spawn(index, listening)

    def _open_sync_socket(self) -> None:
        if self._config.sync_wanted:
            self._sync_socket = open_udp_socket(self._config.udp_interface,
                                                self._config.udp_notify_port)

    def _spawn(self, index: int, listening: socket.socket) -> None:
        env = dict(self._base_env)
        env.update(self._config.as_env())
        env.update({"NUM_WORKERS": "1", "QUEEN_LISTEN_FD": str(INHERITED_FD),
                    "WORKER_ID": worker_name(self._config.worker_id, index),
                    PARENT_ENV: str(os.getpid())})
        env.pop("QUEEN_EMBEDDED_PG", None)  # the parent runs it; workers use its PG_* settings
        child_fds: Dict[int, object] = {0: "w", 1: 1, 2: 2, INHERITED_FD: listening.fileno()}
        if index == 0 and self._sync_socket is not None:  # worker 1 owns the peer sync
            env["QUEEN_SYNC_FD"] = str(SYNC_FD)
            child_fds[SYNC_FD] = self._sync_socket.fileno()
        worker = _Worker(self, index, self._reactor.seconds())
        args = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logfile=-", "queen"]
        self._processes[index] = self._reactor.spawnProcess(
            worker, sys.executable, args, env=env, childFDs=child_fds)
        self._workers[index] = worker

    def worker_ended(self, worker: _Worker, reason) -> None:
        if self._workers.get(worker.index) is not worker:
            return
        del self._workers[worker.index]
        if not self.running:
            return
        if isinstance(reason, ProcessTerminated) and reason.exitCode == EXIT_FAILURE:
            # it refused to start (a failed schema upgrade, an unusable buffer directory) and
            # said why; a restart would refuse again, so the server ends the same way
            fatal(self._reactor, f"worker {worker.index + 1} refused to start")
            return
        backoff = self._restarts.setdefault(worker.index, Backoff(*RESTART_BACKOFF))
        if self._reactor.seconds() - worker.started >= STEADY_S:
            backoff.reset()
        delay = backoff.next_delay()
        log.warn("worker {n} ended ({reason}); restarting it in {delay:g}s", n=worker.index + 1,
                 reason=reason, delay=delay)
        self._reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self._workers and self._socket is not None:
            self._spawn(index, self._socket)

    def stopService(self):
        super().stopService()
        ended = [worker.ended for worker in self._workers.values()]
        for index in list(self._workers):
            self._signal(index, signal.SIGTERM)
        kill_timer = self._reactor.callLater(self._kill_after, self._kill_all)
        done = defer.DeferredList(ended)

        def finished(_):
            if kill_timer.active():
                kill_timer.cancel()
            for held in (self._socket, self._sync_socket):
                if held is not None:
                    held.close()
        return done.addBoth(finished)

    def _kill_all(self) -> None:
        if self._workers:
            log.warn("{n} workers still running {s:.0f}s after SIGTERM: sending SIGKILL",
                     n=len(self._workers), s=self._kill_after)
        for index in list(self._workers):
            self._signal(index, signal.SIGKILL)

    def _signal(self, index: int, signum: int) -> None:
        process = self._processes.get(index)
        if process is None:
            return
        try:
            process.signalProcess(signum)
        except Exception:  # already gone
            pass


def parent_watch(environ: Optional[Dict[str, str]] = None) -> Optional[service.Service]:
    """For a worker: a check, every second from the start, that the parent which started it
    is still its parent; once it is not, the worker sends itself SIGTERM (the graceful stop).
    None for a process no parent started as a worker."""
    parent = (os.environ if environ is None else environ).get(PARENT_ENV, "")
    if not parent.isdigit():
        return None
    stopping = False

    def check() -> None:
        nonlocal stopping
        if stopping or os.getppid() == int(parent):
            return
        stopping = True
        log.warn("the parent process {pid} is gone: stopping this worker", pid=parent)
        os.kill(os.getpid(), signal.SIGTERM)

    return internet.TimerService(PARENT_CHECK_S, check)


def worker_base_env() -> Dict[str, str]:
    """The environment workers inherit (PATH, PYTHONPATH…); their options come from Config."""
    return dict(os.environ)
