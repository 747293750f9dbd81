"""Draining: a server stops admitting requests and lets the admitted ones finish before it stops.

TorchServe 0.12 has no drain API and its frontend cannot tell how many requests a worker is generating,
so the workers and ``scripts/serve.sh drain`` share one folder per server, named after the frontend's
pid (the workers' parent, the pid TorchServe writes to ``$TMPDIR/.model_server.pid``):
``${TMPDIR:-/tmp}/jai-drain.<frontend pid>/``.

- ``draining``: while this file exists every worker answers each NEW request with a 503 whose type is
  ``Draining`` (``serve.sh drain`` creates it); requests already admitted run to the end. A balancer
  re-sends the 503 to another server (deploy/haproxy/haproxy.cfg ``retry-on 503``).
- ``active.<worker pid>``: that worker's number of admitted, unfinished requests, rewritten whenever it
  changes. A file is read without asking the worker, which may be busy inside a batch for seconds;
  ``serve.sh`` ignores the file of a worker that no longer runs.

A folder per frontend pid means a new server never sees an old server's marker, and a handler running
outside TorchServe (tests, benchmarks) never touches a real server's folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

MARKER = "draining"
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"  # what TorchServe's own launcher looks for in a pid's command line


# the message of a request refused (503) while draining, in the shape of the route it came by
DRAINING = "this server is draining (shutting down): send the request to another server"


def drain_folder(frontend_pid: int, environ=os.environ) -> Path:
    """The folder for the server whose frontend is ``frontend_pid``: the same path serve.sh computes."""
    return Path(environ.get("TMPDIR") or "/tmp") / f"jai-drain.{frontend_pid}"


class DrainState:
    """One worker's side of the folder: is the server draining, and how many requests this worker holds."""

    def __init__(self, folder: Path, pid: int | None = None):
        self.folder = Path(folder)
        self.marker = self.folder / MARKER
        self.pid = pid if pid is not None else os.getpid()
        self.active_file = self.folder / f"active.{self.pid}"
        self.recorded: int | None = None

    @classmethod
    def for_worker(cls) -> DrainState | None:
        """The state of the server this process is a worker of; None when its parent is no TorchServe
        frontend (a handler built in a test or a benchmark)."""
        parent = os.getppid()
        try:
            import psutil  # a TorchServe dependency

            if FRONTEND_CLASS not in psutil.Process(parent).cmdline():
                return None
        except Exception:  # psutil.Error (the parent is gone) or no psutil: no server to drain with
            return None
        return cls(drain_folder(parent))

    def draining(self) -> bool:
        """One stat() per call: cheap enough for every handle() (every engine step in continuous mode)."""
        return self.marker.exists()

    def record_active(self, count: int) -> None:
        """Publish this worker's count of admitted, unfinished requests (when it changed)."""
        if count == self.recorded:
            return
        # written under a name serve.sh does not read (it reads active.*), then renamed: never half a file
        scratch = self.folder / f".writing.{self.pid}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            scratch.write_text(f"{count}\n")
            os.replace(scratch, self.active_file)
        except OSError as exc:  # never fail a request over it; a drain then cannot see this worker
            logger.warning("cannot record active requests in %s: %s", self.active_file, exc)
            return
        self.recorded = count
