#!/usr/bin/env python3
"""Several torchserve instances on this host behind HAProxy (deploy/haproxy/haproxy.cfg).

usage: scripts/multi.py [--dir DIR] [--instances N] [--listen HOST:PORT] [--archive MAR]
                        start | stop | status | stop-instance I | start-instance I | restart-instance I

start             lay out DIR/instance-1..N (each a deployment folder for scripts/serve.sh: its own ports,
                  TMPDIR, logs, token auth off), start them with serve.sh, then HAProxy on --listen
stop              HAProxy stops taking connections and finishes the open ones; each instance drains and stops
stop-instance I   take instance I out of rotation (HAProxy "drain"), then `serve.sh stop` it (drains)
start-instance I  start it again on the same ports and put it back once HAProxy sees it healthy
restart-instance I  both: a rolling restart that loses no request
status            each instance, and HAProxy's view of it (state, running and total requests)

Clients call http://--listen with `Authorization: Bearer <key>`, the key in DIR/api_keys (also written
as DIR/key_file.json, the shape jai_client reads: JAI_KEY_FILE=DIR/key_file.json).
Defaults: DIR=JAI_MULTI_DIR or <repo>/multi, N=JAI_INSTANCES or 2, --listen=JAI_LB_BIND or
127.0.0.1:8090, MAR=<repo>/model_store/jai.mar (`make archive`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
from scripts.common import absolute_javaagent, alive, free_ports  # noqa: E402

SERVE = ROOT / "scripts" / "serve.sh"
TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "jai"  # the backend section of haproxy.cfg
PORT_KEYS = ("inference", "management", "metrics", "grpc_inference", "grpc_management")


def instance_config(base: str, ports: dict[str, int]) -> str:
    """The repo's config.properties for one instance: its own loopback ports, token auth off (the
    balancer authenticates), and paths in vmargs made absolute (the instance runs in another folder)."""
    config = base
    for name in ("inference", "management", "metrics"):
        config = re.sub(rf"^{name}_address=.*$", f"{name}_address=http://127.0.0.1:{ports[name]}", config, flags=re.M)
    for name in ("grpc_inference", "grpc_management"):
        config = re.sub(rf"^{name}_port=.*$", f"{name}_port={ports[name]}", config, flags=re.M)
    config = re.sub(r"^disable_token_authorization=.*$", "disable_token_authorization=true", config, flags=re.M)
    config = absolute_javaagent(config)
    settings = [line for line in config.splitlines() if line and not line.startswith("#")]
    for key in ("inference_address", "management_address", "metrics_address", "grpc_inference_port",
                "grpc_management_port", "disable_token_authorization"):  # a key the repo's file lost
        if not any(line.startswith(key + "=") for line in settings):
            raise SystemExit(f"multi.py: config.properties has no {key}= line to set for an instance")
    return config


class Layout:
    """DIR and what start decided (ports, listen address, archive), kept in DIR/layout.json."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.file = self.folder / "layout.json"
        self.data = json.loads(self.file.read_text()) if self.file.exists() else {}

    def save(self):
        self.file.write_text(json.dumps(self.data, indent=2) + "\n")

    @property
    def instances(self) -> list[int]:
        return list(range(1, len(self.data.get("instances", [])) + 1))

    def instance_dir(self, i: int) -> Path:
        return self.folder / f"instance-{i}"

    def ports(self, i: int) -> dict[str, int]:
        return self.data["instances"][i - 1]

    def env(self, i: int) -> dict[str, str]:
        """serve.sh's environment for instance i: its folder, and a TMPDIR of its own (pid file, worker
        sockets, drain folder)."""
        return dict(os.environ, JAI_DIR=str(self.instance_dir(i)), TMPDIR=str(self.instance_dir(i) / "tmp"))

    def lb_env(self) -> dict[str, str]:
        return dict(os.environ, JAI_LB_BIND=self.data["listen"], JAI_LB_STATE=str(self.folder))


# ----- instances (scripts/serve.sh does the starting, draining and stopping) -----


def serve(layout: Layout, i: int, command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SERVE), command], env=layout.env(i), capture_output=True, text=True)


def lay_out_instance(layout: Layout, i: int, archive: Path):
    folder = layout.instance_dir(i)
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    (folder / "model_store").mkdir(exist_ok=True)
    config = instance_config((ROOT / "config.properties").read_text(), layout.ports(i))
    (folder / "config.properties").write_text(config)
    for relative in re.findall(r"^metrics_config=(\S+)$", config, flags=re.M):
        if not Path(relative).is_absolute():
            shutil.copy(ROOT / relative, folder / relative)
    link = folder / "model_store" / "jai.mar"
    link.unlink(missing_ok=True)
    link.symlink_to(archive)


def start_instance_process(layout: Layout, i: int):
    result = serve(layout, i, "start")
    if result.returncode != 0:
        raise SystemExit(f"multi.py: instance {i} did not start:\n{result.stdout}{result.stderr}")
    already = " (it was " + result.stdout.strip().removeprefix("serve.sh: ") + ")" if "already" in result.stdout else ""
    print(f"multi.py: instance {i} serving on 127.0.0.1:{layout.ports(i)['inference']}{already}")


def stop_instance_process(layout: Layout, i: int):
    result = serve(layout, i, "stop")
    print(f"multi.py: instance {i}: " + " / ".join((result.stdout + result.stderr).split("\n")).strip(" /"))
    if result.returncode != 0:
        raise SystemExit(f"multi.py: instance {i} did not stop")


# ----- HAProxy -----


def runtime(layout: Layout, command: str) -> str:
    """One command on HAProxy's runtime API (its admin socket)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(layout.folder / "haproxy.sock"))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def servers(layout: Layout) -> dict[str, dict[str, str]]:
    """HAProxy's stats for each server of the backend: status (UP, DOWN, DRAIN, MAINT...), scur
    (requests running now), stot (requests sent to it so far)."""
    lines = runtime(layout, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r["pxname"] == BACKEND and r["svname"] not in ("FRONTEND", "BACKEND")}


def haproxy_pid(layout: Layout) -> int | None:
    try:
        pid = int((layout.folder / "haproxy.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def wait_until(condition, timeout: float, what: str, explain=lambda: ""):
    """Poll ``condition``; on timeout exit with a message that says what was awaited and ``explain()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"multi.py: timed out after {timeout:.0f}s waiting for {what}{explain()}")
        time.sleep(0.2)


def server_status(layout: Layout, name: str) -> str:
    try:
        return servers(layout)[name]["status"]
    except OSError:
        return "unknown"


def health_report(layout: Layout, i: int) -> str:
    """Why HAProxy may not see instance ``i`` healthy: its last check, and what /ping answers us."""
    try:
        row = servers(layout)[f"jai{i}"]
        seen = ", ".join(f"{k}={row.get(k, '')}" for k in ("status", "check_status", "check_code", "check_desc",
                                                          "last_chk", "chkfail", "downtime"))
    except (OSError, KeyError) as exc:
        seen = f"no answer ({exc!r})"
    url = f"http://127.0.0.1:{layout.ports(i)['inference']}/ping"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            ping = f"{response.status} {response.read(200)!r}"
    except OSError as exc:  # refused, timed out, or an HTTP error status (urllib's HTTPError)
        ping = repr(exc)
    state = serve(layout, i, "status").stdout.strip()
    return f"\n  HAProxy's view of jai{i}: {seen}\n  GET {url}: {ping}\n  {state}"


def start_balancer(layout: Layout):
    binary = shutil.which("haproxy")
    if binary is None:
        raise SystemExit("multi.py: haproxy not found: apt-get install haproxy (or: make haproxy, as root)")
    keys = layout.folder / "api_keys"
    if not keys.exists():  # kept across restarts: clients keep their key
        keys.write_text(secrets.token_urlsafe(24) + "\n")
        keys.chmod(0o600)
    key = keys.read_text().split()[0]
    key_file = layout.folder / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": key}}) + "\n")
    key_file.chmod(0o600)
    lines = [f"    server jai{i} 127.0.0.1:{layout.ports(i)['inference']}" for i in layout.instances]
    config = layout.folder / "haproxy.cfg"
    config.write_text(TEMPLATE.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    check = subprocess.run([binary, "-c", "-q", "-f", str(config)], env=layout.lb_env(), capture_output=True,
                           text=True)
    if check.returncode != 0:
        raise SystemExit(f"multi.py: {config} is not valid:\n{check.stdout}{check.stderr}")
    with open(layout.folder / "haproxy.log", "ab") as log:  # -db: stays in the foreground, logs to stdout
        process = subprocess.Popen([binary, "-db", "-f", str(config)], env=layout.lb_env(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (layout.folder / "haproxy.pid").write_text(f"{process.pid}\n")
    wait_until(lambda: process.poll() is not None or (layout.folder / "haproxy.sock").exists(), 30,
               "HAProxy's runtime socket")
    if process.poll() is not None:
        raise SystemExit(f"multi.py: haproxy exited; see {layout.folder / 'haproxy.log'}")
    wait_until(lambda: all(server_status(layout, f"jai{i}") == "UP" for i in layout.instances), 60,
               "HAProxy to see every instance healthy",
               lambda: "".join(health_report(layout, i) for i in layout.instances))
    print(f"multi.py: HAProxy on http://{layout.data['listen']} balancing {len(layout.instances)} instances")


def stop_balancer(layout: Layout, timeout: float):
    pid = haproxy_pid(layout)
    if pid is None:
        return
    os.kill(pid, signal.SIGUSR1)  # soft stop: close the listener, let open requests finish
    deadline = time.monotonic() + timeout
    while haproxy_pid(layout) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    if haproxy_pid(layout) is not None:
        os.kill(pid, signal.SIGTERM)
    (layout.folder / "haproxy.pid").unlink(missing_ok=True)
    print("multi.py: HAProxy stopped")


# ----- commands -----


def start(args):
    layout = Layout(args.dir)
    running = [i for i in layout.instances if serve(layout, i, "status").returncode == 0]
    if haproxy_pid(layout) is not None or running:
        raise SystemExit(f"multi.py: already running in {layout.folder} (multi.py stop first)")
    archive = Path(args.archive).resolve()
    if not archive.is_file():
        raise SystemExit(f"multi.py: {archive} missing: run `make archive` (or pass --archive)")
    layout.folder.mkdir(parents=True, exist_ok=True)
    ports = free_ports(len(PORT_KEYS) * args.instances)
    layout.data = {
        "listen": args.listen,
        "archive": str(archive),
        "instances": [dict(zip(PORT_KEYS, ports[i * 5:(i + 1) * 5])) for i in range(args.instances)],
    }
    layout.save()
    for i in layout.instances:
        lay_out_instance(layout, i, archive)
    with ThreadPoolExecutor(len(layout.instances)) as pool:  # the instances load their models side by side
        list(pool.map(lambda i: start_instance_process(layout, i), layout.instances))
    start_balancer(layout)


def stop(args):
    layout = Layout(args.dir)
    stop_balancer(layout, timeout=float(os.environ.get("JAI_DRAIN_TIMEOUT", 120)))
    with ThreadPoolExecutor(max(1, len(layout.instances))) as pool:
        list(pool.map(lambda i: stop_instance_process(layout, i), layout.instances))


def instance_number(layout: Layout, value: int) -> int:
    if value not in layout.instances:
        raise SystemExit(f"multi.py: no instance {value} (have {layout.instances or 'none: start first'})")
    return value


def stop_instance(args):
    layout = Layout(args.dir)
    i = instance_number(layout, args.instance)
    if haproxy_pid(layout) is not None:
        runtime(layout, f"set server {BACKEND}/jai{i} state drain")  # no new requests; health checks go on
    stop_instance_process(layout, i)
    if haproxy_pid(layout) is not None:
        runtime(layout, f"set server {BACKEND}/jai{i} state maint")  # stopped on purpose, not failing


def start_instance(args):
    layout = Layout(args.dir)
    i = instance_number(layout, args.instance)
    start_instance_process(layout, i)
    if haproxy_pid(layout) is not None:
        runtime(layout, f"set server {BACKEND}/jai{i} state ready")
        wait_until(lambda: server_status(layout, f"jai{i}") == "UP", 60, f"HAProxy to see instance {i} healthy",
                   lambda: health_report(layout, i))
        print(f"multi.py: instance {i} back in rotation")


def restart_instance(args):
    stop_instance(args)
    start_instance(args)


def status(args):
    layout = Layout(args.dir)
    if not layout.instances:
        print(f"multi.py: nothing laid out in {layout.folder}")
        return 3
    seen = servers(layout) if haproxy_pid(layout) is not None else {}
    print(f"HAProxy: {'http://' + layout.data['listen'] if seen else 'stopped'}")
    for i in layout.instances:
        state = serve(layout, i, "status").stdout.strip().removeprefix("serve.sh: ")
        row = seen.get(f"jai{i}")
        view = f"{row['status']}, {row['scur']} running, {row['stot']} sent" if row else "-"
        print(f"instance {i} (127.0.0.1:{layout.ports(i)['inference']}): {state}; balancer: {view}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/multi.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("JAI_MULTI_DIR", ROOT / "multi")))
    parser.add_argument("--instances", type=int, default=int(os.environ.get("JAI_INSTANCES", 2)))
    parser.add_argument("--listen", default=os.environ.get("JAI_LB_BIND", "127.0.0.1:8090"))
    parser.add_argument("--archive", default=str(ROOT / "model_store" / "jai.mar"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start").set_defaults(run=start)
    commands.add_parser("stop").set_defaults(run=stop)
    commands.add_parser("status").set_defaults(run=status)
    for name, run in (("stop-instance", stop_instance), ("start-instance", start_instance),
                      ("restart-instance", restart_instance)):
        sub = commands.add_parser(name)
        sub.add_argument("instance", type=int)
        sub.set_defaults(run=run)
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be >= 1")
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
