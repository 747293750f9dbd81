"""`pip install .`: the client package and its `jaiserve` command work without the repo on the path."""

import os
import shutil
import subprocess
import sys

from ts_launcher import ROOT, free_ports


def test_pip_install_gives_the_client_and_its_command(tmp_path):
    source = tmp_path / "source"  # a copy: building in the repo would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "jai_client", source / "jai_client", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True)
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "jai_client"]

    elsewhere = tmp_path / "elsewhere"  # not the repo: only the installed copy can be imported
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import jai_client; print(jai_client.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(target / "jai_client"))
    usage = subprocess.run([target / "bin" / "jaiserve", "--help"], cwd=elsewhere, env=env, capture_output=True,
                           text=True)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: jaiserve ")
    [port] = free_ports(1)
    down = subprocess.run([target / "bin" / "jaiserve", "--url", f"http://127.0.0.1:{port}", "health"],
                          cwd=elsewhere, env=env, capture_output=True, text=True)
    assert down.returncode == 1 and down.stderr.startswith(f"error: cannot reach http://127.0.0.1:{port}")
