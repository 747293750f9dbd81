"""scripts/common.py: the one home of the -javaagent: path rewrite and of `alive`, which serve.sh, multi.py,
the container's entry point and the test launcher all use."""

import os
import subprocess
import sys
import time

import pytest

from scripts.common import ROOT, absolute_javaagent, agent_jars, alive

COMMON = [sys.executable, str(ROOT / "scripts" / "common.py")]
CONFIG = """inference_address=http://127.0.0.1:8080
# vmargs=-javaagent:not/this.jar (a comment)
vmargs=-Xmx1g -javaagent:torchserve-patch/build/a.jar=debug -javaagent:/abs/b.jar -Dx=-javaagent:y
"""


def test_relative_agent_paths_become_absolute_and_nothing_else_changes(tmp_path):
    moved = absolute_javaagent(CONFIG, tmp_path)
    assert moved.splitlines()[:2] == CONFIG.splitlines()[:2]
    assert moved.splitlines()[2] == (
        f"vmargs=-Xmx1g -javaagent:{tmp_path}/torchserve-patch/build/a.jar=debug -javaagent:/abs/b.jar "
        "-Dx=-javaagent:y")  # options kept; an absolute path and a non-agent argument untouched
    assert absolute_javaagent(CONFIG) == absolute_javaagent(CONFIG, ROOT)  # default: the repo root
    with pytest.raises(RuntimeError, match="spaces"):
        absolute_javaagent(CONFIG, tmp_path / "with space")


def test_the_command_line_gives_the_same_config(tmp_path):
    (tmp_path / "config.properties").write_text(CONFIG)
    result = subprocess.run([*COMMON, "absolute-agent", str(tmp_path / "config.properties"), "/srv/jai"],
                            capture_output=True, text=True, check=True)
    assert result.stdout == absolute_javaagent(CONFIG, "/srv/jai")
    shipped = subprocess.run([*COMMON, "absolute-agent", str(ROOT / "config.properties")],
                             capture_output=True, text=True, check=True)
    [vmargs] = [line for line in shipped.stdout.splitlines() if line.startswith("vmargs=")]
    assert f"-javaagent:{ROOT}/torchserve-patch/build/jai-torchserve-patch.jar" in vmargs.split()


def test_missing_agent_names_the_first_jar_that_is_not_there(tmp_path):
    (tmp_path / "torchserve-patch" / "build").mkdir(parents=True)
    config = tmp_path / "config.properties"
    config.write_text(CONFIG)
    assert agent_jars(CONFIG) == ["torchserve-patch/build/a.jar", "/abs/b.jar"]

    def missing():
        result = subprocess.run([*COMMON, "missing-agent", "config.properties"], cwd=tmp_path,
                                capture_output=True, text=True, check=True)
        return result.stdout

    assert missing() == "torchserve-patch/build/a.jar\n"  # relative to where torchserve starts
    (tmp_path / "torchserve-patch" / "build" / "a.jar").touch()
    assert missing() == "/abs/b.jar\n"
    config.write_text(CONFIG + "vmargs=-Xmx1g -javaagent:torchserve-patch/build/a.jar\n")  # the last one counts
    assert missing() == ""


def test_alive_tells_running_exited_and_zombie_processes_apart():
    assert alive(os.getpid())
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert alive(child.pid)
        assert subprocess.run([*COMMON, "alive", str(child.pid)]).returncode == 0
        child.kill()
        deadline = time.monotonic() + 10
        while alive(child.pid) and time.monotonic() < deadline:  # killed, not yet reaped: a zombie
            time.sleep(0.05)
        assert not alive(child.pid)
        assert subprocess.run([*COMMON, "alive", str(child.pid)]).returncode == 1
    finally:
        child.kill()
        child.wait()
    assert not alive(child.pid)  # reaped: gone


def test_usage_errors_exit_2():
    for args in ([], ["alive"], ["alive", "x"], ["absolute-agent"], ["nonsense"]):
        result = subprocess.run([*COMMON, *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("usage: scripts/common.py"), args
