"""Model updates on a running server: which checkpoint the workers should serve, and which one each serves.

``scripts/update.py`` (``make update`` / ``make rollback``) and the workers share the server's folder of
jaiserve/drain.py, ``${TMPDIR:-/tmp}/jai-drain.<frontend pid>/``:

- ``model``: one line, the absolute path of a folder holding ``ckpt.pt`` and ``tokenizer.json``: the
  version new requests should go to. Written by the script (atomically); read by every worker at its
  next handle() call (one stat per call; read again only when it changes).
- ``version.<worker pid>``: ``<version> <folder>`` that worker admits new requests to, once it has loaded
  and warmed it (or ``failed <folder>: <why>`` when it could not): what the script waits for.

A version is named after its checkpoint: the first 12 hex digits of its SHA-256 (``version_name``), the
name answers, describe and the metrics carry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

TARGET = "model"
CHECKPOINT = "ckpt.pt"  # file names in a version folder: the archive's (model-config.yaml handler:)
TOKENIZER = "tokenizer.json"


def version_name(checkpoint_sha256: str) -> str:
    return checkpoint_sha256[:12]


class UpdateState:
    """One worker's side: the folder the script names (when it changes), and this worker's report."""

    def __init__(self, folder: Path, pid: int | None = None):
        self.folder = Path(folder)
        self.target_file = self.folder / TARGET
        self.pid = pid if pid is not None else os.getpid()
        self.report_file = self.folder / f"version.{self.pid}"
        self._seen: tuple | None = None  # (mtime_ns, size) of the target file last read
        self._target: Path | None = None

    def target(self) -> Path | None:
        """The version folder new requests should go to; None while the script has named none."""
        try:
            stat = self.target_file.stat()
        except FileNotFoundError:
            self._seen, self._target = None, None
            return None
        key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if key != self._seen:
            try:
                text = self.target_file.read_text().strip()
            except OSError:
                return self._target
            self._seen, self._target = key, Path(text) if text else None
        return self._target

    def report(self, line: str) -> None:
        """Publish what this worker serves (or why it could not), written whole like drain's counts."""
        scratch = self.folder / f".version.{self.pid}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            scratch.write_text(line + "\n")
            os.replace(scratch, self.report_file)
        except OSError as exc:  # never fail a request over it; the script then waits in vain and says so
            logger.warning("cannot record the served version in %s: %s", self.report_file, exc)
