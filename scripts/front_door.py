#!/usr/bin/env python3
"""The front door on 127.0.0.1:8000: nginx running deploy/nginx/jai.conf in front of torchserve.

usage: scripts/front_door.py start|stop|status

`make serve` starts it after torchserve and `make stop` stops it (docs/front-door.md). It runs from
logs/nginx/ (its nginx.conf, the site written from deploy/nginx/jai.conf with this repo's path, pid, logs,
scratch folders); the upstream is config.properties' inference_address. JAI_FRONT_DOOR_LISTEN moves the
listening address (default 127.0.0.1:8000). Without nginx it says so and exits 0: torchserve alone still
serves on its own address. The tests render the same files (render_site, render_main).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT))
from scripts.common import alive  # noqa: E402

SITE = ROOT / "deploy" / "nginx" / "jai.conf"
INSTALLED_AT = "/opt/jai-serve"  # the repo's path as the shipped site names it (deploy/docker installs there)
LISTEN = "127.0.0.1:8000"
ASSETS = ROOT / "web" / "node_modules"


def nginx_binary() -> str | None:
    """Debian puts nginx in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_site(listen: str, upstream: str, root: Path = ROOT) -> str:
    """deploy/nginx/jai.conf listening on ``listen`` (host:port) in front of ``upstream`` (host:port)."""
    site = SITE.read_text()
    for old, new in (("listen 8000;", f"listen {listen};"), ("server 127.0.0.1:8080;", f"server {upstream};")):
        if old not in site:
            raise ValueError(f"{SITE}: expected {old!r}")
        site = site.replace(old, new)
    return site.replace(INSTALLED_AT, str(root))


# the types of the files the site serves (browsers refuse a stylesheet served as anything but text/css)
TYPES = {"text/html": "html", "text/css": "css", "application/javascript": "js", "application/yaml": "yaml"}


def render_main(prefix: Path, site: Path, daemon: bool = True) -> str:
    """An nginx.conf of its own (no system files): everything it writes stays under ``prefix``.
    ``daemon=False``: nginx stays in the foreground (a test's child process)."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers must read the repo's files
    temp = "".join(f"  {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    types = "".join(f" {kind} {ext};" for kind, ext in TYPES.items())
    return (f"{user}{'' if daemon else 'daemon off;' + chr(10)}worker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log;\nevents {{ worker_connections 512; }}\nhttp {{\n"
            f"  types {{{types} }}\n  default_type application/octet-stream;\n  access_log {prefix}/access.log;\n"
            f"{temp}  include {site};\n}}\n")


def write_config(prefix: Path, listen: str, upstream: str, root: Path = ROOT, daemon: bool = True) -> Path:
    """Write prefix/jai.conf and prefix/nginx.conf; return the latter."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "jai.conf").write_text(render_site(listen, upstream, root))
    (prefix / "nginx.conf").write_text(render_main(prefix, prefix / "jai.conf", daemon))
    return prefix / "nginx.conf"


def inference_upstream(config: Path) -> str:
    """host:port of config.properties' inference_address (TorchServe's default when it has none)."""
    found = re.findall(r"^inference_address=\w+://(\S+)$", config.read_text(), flags=re.M)
    address = found[-1] if found else "127.0.0.1:8080"
    return address.replace("0.0.0.0", "127.0.0.1")


def _pid(prefix: Path) -> int | None:
    try:
        pid = int((prefix / "nginx.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def start(prefix: Path, listen: str, config: Path) -> int:
    binary = nginx_binary()
    if binary is None:
        print("front_door: nginx is not installed, so nothing answers on :8000; torchserve alone serves on "
              f"http://{inference_upstream(config)} (/predictions/jai, /predictions/jai/1.0/v1). "
              "Install it (Debian: apt-get install nginx; `make serve` does as root) and run `make start`.",
              file=sys.stderr)
        return 0
    if _pid(prefix):
        stop(prefix)
    conf = write_config(prefix, listen, inference_upstream(config))
    result = subprocess.run([binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"front_door: nginx did not start ({conf}):\n{result.stderr.strip()}", file=sys.stderr)
        return 1
    url = f"http://{listen}"
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=2) as page:
                page.read()
            break
        except urllib.error.HTTPError:
            break  # answering (a 404: the chat page is missing from web/)
        except OSError:
            if time.monotonic() > deadline:
                print(f"front_door: nginx started but {url} does not answer; see {prefix}/error.log", file=sys.stderr)
                return 1
            time.sleep(0.1)
    print(f"front_door: {url}: / (chat page), /docs, /redoc, /generate, /chat, /health, /v1 (nginx pid {_pid(prefix)}). "
          "With $TOKEN as above (docs/front-door.md):")
    print(f"  curl -s {url}/chat -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
          "-d '{\"prompt\": \"판교에서 백엔드 개발자 채용하는 곳 알려줘\", \"max_tokens\": 64}'")
    if not (ASSETS / "swagger-ui-dist").is_dir() or not (ASSETS / "redoc").is_dir():
        print("front_door: web/node_modules is missing, so /docs and /redoc cannot render: run `make web`",
              file=sys.stderr)
    return 0


def stop(prefix: Path) -> int:
    pid = _pid(prefix)
    if pid is None:
        print("front_door: not running")
        return 0
    os.kill(pid, signal.SIGQUIT)  # graceful: running streams finish (torchserve has drained them by now)
    deadline = time.monotonic() + 30
    while _pid(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _pid(prefix):
        os.kill(pid, signal.SIGTERM)
    print("front_door: stopped")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("start", "stop", "status"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    jai_dir = Path(os.environ.get("JAI_DIR", ROOT))
    prefix = jai_dir / "logs" / "nginx"
    if argv[0] == "start":
        return start(prefix, os.environ.get("JAI_FRONT_DOOR_LISTEN", LISTEN), jai_dir / "config.properties")
    if argv[0] == "stop":
        return stop(prefix)
    pid = _pid(prefix)
    print(f"front_door: running (nginx pid {pid})" if pid else "front_door: stopped")
    return 0 if pid else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
