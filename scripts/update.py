#!/usr/bin/env python3
"""Put a new JAI checkpoint live on the running torchserve, or go back to the previous one (docs/updates.md).

usage: scripts/update.py update --checkpoint PATH --tokenizer PATH [--model-store DIR] [--timeout S]
       scripts/update.py rollback [--model-store DIR] [--timeout S]
       scripts/update.py status

update: stores the files as a version (DIR/versions/<version>/, named after the checkpoint's SHA-256),
repacks DIR/jai.mar with them (archive.sh checks they load; a restart then serves them too), and names
the version in the running server's folder (handler/jaiserve/updates.py). Every worker loads and warms
it beside the one it serves, then sends new requests to it; requests already running finish on theirs.
Returns once every worker serves it. rollback does the same with the version before (DIR/versions/history).
The server is the one whose pid torchserve wrote to ${TMPDIR:-/tmp}/.model_server.pid (as serve.sh).
`make update CHECKPOINT=... TOKENIZER=...`, `make rollback` and `python -m jai_client update` run this.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "handler"))
from jaiserve.drain import drain_folder  # noqa: E402  (the server's folder: the workers read it)
from jaiserve.updates import CHECKPOINT, TARGET, TOKENIZER, version_name  # noqa: E402

HISTORY = "history"  # DIR/versions/history: one version per line, the live one last


class UpdateError(Exception):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def server_folder() -> Path:
    pid_file = Path(os.environ.get("TMPDIR") or "/tmp") / ".model_server.pid"
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        raise UpdateError(f"no running torchserve (no live pid in {pid_file}): start it with 'make serve'") from None
    return drain_folder(pid)


def store_version(versions: Path, checkpoint: Path, tokenizer: Path) -> str:
    """Copy a checkpoint and tokenizer into versions/<version>/ (whole, or not at all); return the version."""
    for path in (checkpoint, tokenizer):
        if not path.is_file():
            raise UpdateError(f"{path} not found")
    name = version_name(sha256(checkpoint))
    folder = versions / name
    if not folder.is_dir():
        stage = Path(tempfile.mkdtemp(dir=versions, prefix=".stage."))
        shutil.copy(checkpoint, stage / CHECKPOINT)
        shutil.copy(tokenizer, stage / TOKENIZER)
        os.replace(stage, folder)
    return name


def archived_files(mar: Path, into: Path) -> Path:
    """Unpack the archive's checkpoint, tokenizer and model config into ``into``; return the config."""
    with zipfile.ZipFile(mar) as archive:
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        config = manifest["model"].get("configFile")
        if not config:
            raise UpdateError(f"{mar} has no model config (pack it with archive.sh)")
        for name in (CHECKPOINT, TOKENIZER, config):
            archive.extract(name, into)
    return into / config


def history(versions: Path) -> list[str]:
    path = versions / HISTORY
    return path.read_text().split() if path.exists() else []


def write_history(versions: Path, names: list[str]) -> None:
    scratch = versions / f".{HISTORY}"
    scratch.write_text("".join(f"{n}\n" for n in names))
    os.replace(scratch, versions / HISTORY)


def repack(store: Path, name: str) -> None:
    """archive.sh with the version's files and the model config the archive had: loads them first."""
    mar = store / "jai.mar"
    with tempfile.TemporaryDirectory() as scratch:
        config = archived_files(mar, Path(scratch))
        folder = store / "versions" / name
        result = subprocess.run(
            [str(REPO / "archive.sh"), "--checkpoint", str(folder / CHECKPOINT), "--tokenizer",
             str(folder / TOKENIZER), "--model-store", str(store), "--config", str(config)],
            capture_output=True, text=True,
        )
    if result.returncode != 0:
        raise UpdateError(result.stderr.strip() or result.stdout.strip())


def workers(folder: Path) -> dict[int, str]:
    """What each live worker reported: ``<version> <folder>`` or ``failed <folder>: <why>``."""
    found = {}
    for report in folder.glob("version.*"):
        pid = int(report.name.split(".", 1)[1])
        try:
            os.kill(pid, 0)
            found[pid] = report.read_text().strip()
        except (ProcessLookupError, FileNotFoundError):
            continue
    return found


def go_live(folder: Path, store: Path, name: str, timeout: float) -> None:
    """Name the version to the running workers (their server's ``folder``) and wait until every one serves it."""
    target = (store / "versions" / name).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / f".{TARGET}"
    scratch.write_text(f"{target}\n")
    os.replace(scratch, folder / TARGET)
    print(f"update.py: {name}: every worker loads it beside the one it serves, then sends new requests to it")
    deadline = time.monotonic() + timeout
    while True:
        reports = workers(folder)
        failed = [r for r in reports.values() if r.startswith("failed ") and r.split(" ", 1)[1].startswith(str(target))]
        if failed:
            raise UpdateError(f"a worker could not serve {name}: {failed[0]} (the others keep the old version: "
                              "run 'make rollback' or fix the files and update again)")
        if reports and all(r.split(" ", 1)[0] == name for r in reports.values()):
            print(f"update.py: {name} is live on {len(reports)} worker(s); requests that were running finish "
                  "on the version they started on")
            return
        if time.monotonic() > deadline:
            raise UpdateError(f"{name} not live on every worker after {timeout:g} s: {reports}")
        time.sleep(0.2)


def update(store: Path, checkpoint: Path, tokenizer: Path, timeout: float) -> None:
    folder = server_folder()  # first: nothing is stored or repacked for a server that is not there
    versions = store / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    names = history(versions)
    if not names:  # the archive's own version, so that rollback can return to it
        if not (store / "jai.mar").is_file():
            raise UpdateError(f"{store / 'jai.mar'} not found: run 'make archive' first")
        with tempfile.TemporaryDirectory() as scratch:
            archived_files(store / "jai.mar", Path(scratch))
            names = [store_version(versions, Path(scratch) / CHECKPOINT, Path(scratch) / TOKENIZER)]
    name = store_version(versions, checkpoint.resolve(), tokenizer.resolve())
    repack(store, name)
    if names[-1] != name:
        write_history(versions, names + [name])
    go_live(folder, store, name, timeout)


def rollback(store: Path, timeout: float) -> None:
    folder = server_folder()
    versions = store / "versions"
    names = history(versions)
    if len(names) < 2:
        raise UpdateError("no earlier version to return to (nothing was updated with update.py here)")
    name = names[-2]
    repack(store, name)
    write_history(versions, names[:-1])
    go_live(folder, store, name, timeout)


def status() -> None:
    for pid, report in sorted(workers(server_folder()).items()):
        print(f"worker {pid}: {report}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="update.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("update", "rollback", "status"))
    parser.add_argument("--checkpoint", type=Path, help="update: the new checkpoint (ckpt.pt)")
    parser.add_argument("--tokenizer", type=Path, help="update: its tokenizer.json")
    parser.add_argument("--model-store", type=Path, default=REPO / "model_store", help="default: model_store/")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for every worker (300)")
    args = parser.parse_args(argv)
    try:
        if args.command == "update":
            if args.checkpoint is None or args.tokenizer is None:
                parser.error("update needs --checkpoint and --tokenizer")
            update(args.model_store.resolve(), args.checkpoint, args.tokenizer, args.timeout)
        elif args.command == "rollback":
            rollback(args.model_store.resolve(), args.timeout)
        else:
            status()
    except UpdateError as exc:
        print(f"update.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
