"""Start a real torchserve from the repo's config.properties in a scratch folder (tests, benchmarks), and
the front door (nginx) in front of one.

The folder gets its own copy of config.properties with the three ports moved to free ones (and the patch
agent's jar named by its absolute path), its own model store, logs, key_file.json and pid file, so it
never touches a server the user is running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from scripts import front_door
# what every way of starting torchserve shares (scripts/common.py); tests import them from here
from scripts.common import absolute_javaagent, alive, free_ports

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"
if not (BIN / "torchserve").exists():
    BIN = ROOT / ".venv" / "bin"


@dataclass
class Server:
    root: Path
    inference: str
    management: str
    metrics: str

    def key(self, kind="inference"):
        return json.loads((self.root / "key_file.json").read_text())[kind]["key"]

    def headers(self, kind="inference"):
        return {"Authorization": f"Bearer {self.key(kind)}"}

    def predict(self, body, **kwargs):
        return requests.post(f"{self.inference}/predictions/jai", json=body, headers=self.headers(), **kwargs)

    def stream_lines(self, body, until=None, timeout=120) -> list[dict]:
        """POST a streamed request; return its JSON lines (all of them, or the first ``until``, then hang up)."""
        lines = []
        with self.predict(body, stream=True, timeout=timeout) as response:
            assert response.status_code == 200, response.text
            for raw in response.iter_lines():
                if raw:
                    lines.append(json.loads(raw))
                if until is not None and len(lines) >= until:
                    break  # leaving the with-block closes the connection: the client hangs up
        return lines

    def describe(self, customized=False):
        url = f"{self.management}/models/jai" + ("?customized=true" if customized else "")
        response = requests.get(url, headers=self.headers("management"), timeout=10)
        response.raise_for_status()
        return response.json()[0]

    def ready_workers(self):
        return [w for w in self.describe()["workers"] if w["status"] == "READY"]

    def log(self, name="logs/model_log.log", lines=40) -> str:
        """The last lines of a file under the server's folder (its logs/ is not there before log4j starts)."""
        path = self.root / name
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else f"({path} missing)"


def archive(root: Path, checkpoint, tokenizer, config_file=None) -> Path:
    """Run the repo's archive.sh into ``root/model_store``."""
    command = [str(ROOT / "archive.sh"), "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer),
               "--model-store", str(root / "model_store")]
    if config_file is not None:
        command += ["--config", str(config_file)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return root / "model_store" / "jai.mar"


def _alive(pid_file: Path) -> bool:
    """Whether the torchserve that wrote ``pid_file`` still runs (it exits at once on a port clash)."""
    try:
        return alive(int(pid_file.read_text()))
    except (FileNotFoundError, ValueError):
        return False


@contextmanager
def running_torchserve(root: Path, start_timeout: float = 180, properties: dict[str, str] | None = None):
    """Serve ``root/model_store/jai.mar`` with the repo's config.properties (``properties`` replace or add
    lines of it, e.g. a benchmark's JVM variant); always stop it."""
    root = Path(root)
    server = write_config(root, properties)
    env = dict(os.environ, TMPDIR=str(root), LOG_LOCATION=str(root / "logs"), METRICS_LOCATION=str(root / "logs"))
    torchserve = str(BIN / "torchserve")
    with open(root / "start.log", "w") as log:  # not a pipe: the daemon inherits it and never closes it
        subprocess.run([torchserve, "--start", "--ncs", "--ts-config", "config.properties"],
                       cwd=root, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if server.ready_workers():
                    break
            except (requests.ConnectionError, requests.HTTPError, FileNotFoundError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline or not _alive(root / ".model_server.pid"):
                raise RuntimeError(
                    "torchserve did not become ready:\n" + server.log() + "\n" + server.log("start.log")
                )
            time.sleep(0.5)
        yield server
    finally:
        with open(root / "stop.log", "w") as log:
            subprocess.run([torchserve, "--stop"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=120)


def write_config(root: Path, properties: dict[str, str] | None = None) -> Server:
    """``root/config.properties``: the repo's with ``properties`` replacing (or added to) its lines, its
    ports moved to free ones; the Server it describes."""
    ports = dict(zip(("8080", "8081", "8082", "7070", "7071"), free_ports(5)))
    config = (ROOT / "config.properties").read_text()
    for key, value in (properties or {}).items():
        line = f"{key}={value}"
        config, found = re.subn(rf"^{re.escape(key)}=.*$", lambda _: line, config, flags=re.M)
        config += "" if found else f"\n{line}\n"
    config = re.sub(r"127\.0\.0\.1:(808[012])", lambda m: f"127.0.0.1:{ports[m.group(1)]}", config)
    config = re.sub(r"^(grpc_\w+_port)=(\d+)$", lambda m: f"{m.group(1)}={ports[m.group(2)]}", config, flags=re.M)
    # the frontend names its worker sockets after java.io.tmpdir, not TMPDIR: keep them in the scratch folder
    config = re.sub(r"^vmargs=(.*)$", lambda m: f"vmargs={m.group(1)} -Djava.io.tmpdir={root}", config, flags=re.M)
    config = absolute_javaagent(config)
    (root / "config.properties").write_text(config)
    for relative in re.findall(r"^metrics_config=(\S+)$", config, flags=re.M):  # files it names
        if not Path(relative).is_absolute():
            shutil.copy(ROOT / relative, root / relative)
    return Server(root, *(f"http://127.0.0.1:{ports[p]}" for p in ("8080", "8081", "8082")))


@contextmanager
def running_front_door(root: Path, upstream: str):
    """Debian's nginx running deploy/nginx/jai.conf on a free port, as `make serve` writes it (only the
    ports moved), in front of ``upstream`` (host:port); yields its base URL; always stopped."""
    binary = front_door.nginx_binary()
    if binary is None:
        message = "nginx not installed (apt-get install nginx; `make test` installs it as root)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    [port] = free_ports(1)
    conf = front_door.write_config(root, f"127.0.0.1:{port}", upstream, daemon=False)
    process = subprocess.Popen([binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (root / "error.log").read_text()[-3000:]
            try:
                requests.get(url + "/", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
