#!/usr/bin/env python3
"""What every way of starting torchserve here shares: scripts/serve.sh, scripts/multi.py, the container's
entry point (deploy/docker/entrypoint.sh) and the test launcher (tests/ts_launcher.py).

usage: scripts/common.py absolute-agent CONFIG [ROOT]   print CONFIG with vmargs' -javaagent: paths made
                                                       absolute against ROOT (default: the repo root)
       scripts/common.py missing-agent CONFIG          print the first -javaagent: jar of CONFIG's vmargs
                                                       that does not exist (relative to the current folder,
                                                       where torchserve starts); print nothing if none
       scripts/common.py alive PID                     exit 0 when PID runs, 1 when it does not

Standard library only: serve.sh calls it with whichever python runs torchserve.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_VMARGS = re.compile(r"^vmargs=(.*)$", re.M)
_AGENT = "-javaagent:"


def agent_jars(config: str) -> list[str]:
    """The jar paths named by ``-javaagent:`` arguments in config.properties' ``vmargs`` (agent options cut
    off; the last ``vmargs`` line is the one TorchServe reads)."""
    lines = _VMARGS.findall(config)
    arguments = lines[-1].split() if lines else []
    return [a.removeprefix(_AGENT).partition("=")[0] for a in arguments if a.startswith(_AGENT)]


def absolute_javaagent(config: str, root: Path = ROOT) -> str:
    """config.properties names the patch agent's jar (torchserve-patch/) relative to the repo root, where
    torchserve normally starts; a server started in another folder (an instance of multi.py, a test's
    scratch folder, the container's runtime folder) needs the absolute path."""

    def absolute(argument: str) -> str:
        if not argument.startswith(_AGENT):
            return argument
        path, equals, options = argument.removeprefix(_AGENT).partition("=")
        path = Path(path) if Path(path).is_absolute() else Path(root) / path
        if re.search(r"\s", str(path)):  # the launcher splits vmargs on whitespace
            raise RuntimeError(f"{path}: vmargs cannot name a path with spaces; move the checkout")
        return f"{_AGENT}{path}{equals}{options}"

    def line(match) -> str:  # whitespace kept as it was
        return "vmargs=" + "".join(absolute(part) for part in re.split(r"(\s+)", match.group(1)))

    return _VMARGS.sub(line, config)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a killed process stays a zombie, which signal 0 still reaches, until reaped."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or no procfs: signal 0 is all we can ask
        return True
    return stat.rpartition(") ")[2][:1] != "Z"  # "pid (command) state ..."


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free right now (for a server started beside others)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "absolute-agent" and len(args) in (1, 2):
        sys.stdout.write(absolute_javaagent(Path(args[0]).read_text(), Path(args[1]) if len(args) == 2 else ROOT))
        return 0
    if command == "missing-agent" and len(args) == 1:
        missing = [jar for jar in agent_jars(Path(args[0]).read_text()) if not Path(jar).is_file()]
        print(missing[0] if missing else "", end="\n" if missing else "")
        return 0
    if command == "alive" and len(args) == 1 and args[0].isdigit():
        return 0 if alive(int(args[0])) else 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
