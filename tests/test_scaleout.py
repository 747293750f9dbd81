"""Scaling out, for real: `scripts/serve.sh drain`, and two torchserve instances behind HAProxy
(scripts/multi.py, deploy/haproxy/haproxy.cfg) under a closed-loop load of 16 clients: requests spread
over both, a killed instance fails only its in-flight requests, it comes back and takes traffic again,
and a drained restart of an instance loses no request.

The served model is the tiny random-weights checkpoint under greedy decoding: it never produces its
end-of-text token on these prompts, so every request generates exactly max_tokens tokens and a "long"
request is long on any machine (each test asserts the count). Traffic stays on 127.0.0.1 and every
load is bounded in requests and seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch

from conftest import TINY
from test_operations import wait_for
from ts_launcher import BIN, ROOT, alive, absolute_javaagent, archive, free_ports

pytestmark = pytest.mark.e2e

MULTI = ROOT / "scripts" / "multi.py"
SERVE = ROOT / "scripts" / "serve.sh"
LONG = 1024  # tokens of a request that must still be running while something else happens
CONFIG = """\
minWorkers: 1
maxWorkers: 1
batchSize: 8
maxBatchDelay: 5
responseTimeout: 120
startupTimeout: 120
jobQueueSize: 64
handler:
  n_head: 2
  threads: 1
  defaults: {max_tokens: 8, temperature: 0}
"""


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory, tiny_ckpt, korean_tokenizer):
    """jai.mar of the tiny checkpoint, its shape stored in it (archive.sh loads it before packing)."""
    root = tmp_path_factory.mktemp("tiny_archive")
    checkpoint = torch.load(tiny_ckpt[0], weights_only=True)
    torch.save({**checkpoint, "model_args": TINY}, root / "ckpt.pt")
    korean_tokenizer.save(str(root / "tokenizer.json"))
    (root / "model-config.yaml").write_text(CONFIG)
    return archive(root, root / "ckpt.pt", root / "tokenizer.json", config_file=root / "model-config.yaml")


def long_stream(url, headers=None):
    """A streamed greedy request of LONG tokens; returns the response once its first line has arrived."""
    response = requests.post(f"{url}/predictions/jai", headers=headers, stream=True, timeout=120,
                             json={"prompt": "서울 채용", "max_tokens": LONG, "temperature": 0, "stream": True})
    assert response.status_code == 200, response.text
    lines = response.iter_lines()
    first = json.loads(next(lines))
    assert first["token_ids"], first
    return response, lines


def finish(lines) -> dict:
    *_, last = (json.loads(line) for line in lines)
    return last


# ----- serve.sh drain on one server (also what the pod's preStop and the systemd unit's ExecStop run) -----


def test_serve_sh_stop_drains_running_requests_and_refuses_new_ones(tmp_path, tiny_archive):
    """Token auth on (the shipped config): drain reads the management key to see the job queue."""
    ports = dict(zip(("8080", "8081", "8082", "7070", "7071"), free_ports(5)))
    config = (ROOT / "config.properties").read_text()
    config = re.sub(r"127\.0\.0\.1:(808[012])", lambda m: f"127.0.0.1:{ports[m[1]]}", config)
    config = re.sub(r"^(grpc_\w+_port)=(\d+)$", lambda m: f"{m[1]}={ports[m[2]]}", config, flags=re.M)
    config = absolute_javaagent(config)  # agent jars
    (tmp_path / "config.properties").write_text(config)
    shutil.copy(ROOT / "metrics.yaml", tmp_path / "metrics.yaml")
    (tmp_path / "model_store").mkdir()
    shutil.copy(tiny_archive, tmp_path / "model_store" / "jai.mar")
    env = dict(os.environ, JAI_DIR=str(tmp_path), TMPDIR=str(tmp_path), JAI_DRAIN_TIMEOUT="100")
    url = f"http://127.0.0.1:{ports['8080']}"

    def serve(command, **kwargs):
        return subprocess.run([str(SERVE), command], env=env, capture_output=True, text=True, timeout=200, **kwargs)

    started = serve("start")
    assert started.returncode == 0, started.stdout + started.stderr
    pid = int((tmp_path / ".model_server.pid").read_text())
    folder = tmp_path / f"jai-drain.{pid}"
    try:
        # the image's health check, with the token auth of the shipped config (it reads key_file.json)
        health = [str(ROOT / "deploy" / "docker" / "healthcheck.sh"), "--ready"]
        assert subprocess.run(health, env=env, capture_output=True, text=True, timeout=30).stdout == "healthy\n"
        keys = json.loads((tmp_path / "key_file.json").read_text())
        headers = {"Authorization": f"Bearer {keys['inference']['key']}"}
        [worker] = requests.get(f"http://127.0.0.1:{ports['8081']}/models/jai", timeout=30,
                                headers={"Authorization": f"Bearer {keys['management']['key']}"}).json()[0]["workers"]
        response, lines = long_stream(url, headers)
        count = folder / f"active.{worker['pid']}"  # the worker published that it holds one request
        wait_for(lambda: count.exists() and count.read_text() == "1\n", 30, what="the worker's count")
        with open(tmp_path / "stop.out", "w") as out:
            stopping = subprocess.Popen([str(SERVE), "stop"], env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        wait_for(lambda: (folder / "draining").exists(), 30, what="the drain marker")
        assert subprocess.run(health, env=env, capture_output=True, text=True, timeout=30).stdout == "draining\n"
        refused = requests.post(f"{url}/predictions/jai", headers=headers, json={"prompt": "부산"}, timeout=120)
        assert refused.status_code == 503, refused.text
        assert refused.json()["type"] == "Draining" and "draining" in refused.json()["message"]
        last = finish(lines)  # the request admitted before the drain runs to its end
        finished_at = time.monotonic()
        assert last["usage"]["completion_tokens"] == LONG and last["finish_reason"] == "length"
        assert stopping.wait(timeout=150) == 0
        stopped_at = time.monotonic()
        out = (tmp_path / "stop.out").read_text()
        assert "serve.sh: drained" in out and out.strip().endswith("serve.sh: stopped"), out
        assert finished_at <= stopped_at  # stop returned only after the running request had ended
        assert not folder.exists()  # stop removes the server's drain folder
        assert not alive(pid)  # stop waited for the frontend to exit (a zombie counts as gone)
    finally:
        if serve("status").returncode == 0:
            serve("stop", input="")


def test_a_drain_without_a_running_server_succeeds_at_once(tmp_path):
    """serve.sh drain on a server that is not running says so and succeeds (a preStop on a dead pod)."""
    env = dict(os.environ, JAI_DIR=str(ROOT), TMPDIR=str(tmp_path), JAI_DRAIN_TIMEOUT="0")
    result = subprocess.run([str(SERVE), "drain"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "serve.sh: not running"


# ----- the container's entry script and health check, run outside a container -----

ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.sh"


def test_the_image_entry_script_serves_and_drains_on_sigterm(tmp_path, tiny_archive):
    """What `docker run` and the pod run: pack the archive from a checkpoint with a model config (the
    ConfigMap's role), serve in the foreground, report health, and on SIGTERM drain before stopping."""
    ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), free_ports(5)))
    container = (ROOT / "deploy" / "docker" / "container.properties").read_text()
    overrides = re.sub(r"http://[\d.]+:(\d+)", lambda m: {"8080": f"http://127.0.0.1:{ports['inference']}",
                       "8081": f"http://127.0.0.1:{ports['management']}",
                       "8082": f"http://127.0.0.1:{ports['metrics']}"}[m[1]], container)  # loopback only, here
    overrides += f"grpc_inference_port={ports['grpc_inference']}\ngrpc_management_port={ports['grpc_management']}\n"
    (tmp_path / "overrides.properties").write_text(overrides)
    model = tiny_archive.parent.parent  # ckpt.pt, tokenizer.json, model-config.yaml of the tiny archive
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, JAI_DIR=str(run_dir), TMPDIR=str(tmp), JAI_CONFIG_OVERRIDES=str(tmp_path / "overrides.properties"),
               JAI_CHECKPOINT=str(model / "ckpt.pt"), JAI_TOKENIZER=str(model / "tokenizer.json"),
               JAI_MODEL_CONFIG=str(model / "model-config.yaml"), JAI_DRAIN_TIMEOUT="100")
    url = f"http://127.0.0.1:{ports['inference']}"

    def health(*args):
        return subprocess.run([str(HEALTHCHECK), *args], env=env, capture_output=True, text=True, timeout=30)

    with open(tmp_path / "entrypoint.log", "w") as log:
        entry = subprocess.Popen([str(ENTRYPOINT)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: entry.poll() is not None or health().returncode == 0, 180, what="a healthy server")
        assert entry.poll() is None, (tmp_path / "entrypoint.log").read_text()[-3000:]
        assert health().stdout.strip() == "healthy" and health("--ready").returncode == 0
        config = properties((run_dir / "config.properties").read_text())  # the repo's, then the overrides
        assert config["disable_token_authorization"] == "true" and not (run_dir / "key_file.json").exists()
        answer = requests.post(f"{url}/predictions/jai", json={"prompt": "서울", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3  # no token needed
        response, lines = long_stream(url)
        entry.send_signal(signal.SIGTERM)  # docker stop; the kubelet after the preStop
        ready = wait_for(lambda: (r := health("--ready")).returncode != 0 and r, 30, what="readiness to fail")
        assert ready.stdout.strip() == "draining" and health().returncode == 0  # alive, just not ready
        refused = requests.post(f"{url}/predictions/jai", json={"prompt": "부산"}, timeout=120)
        assert refused.status_code == 503 and refused.json()["type"] == "Draining"
        assert finish(lines)["usage"]["completion_tokens"] == LONG
        assert entry.wait(timeout=150) == 0, (tmp_path / "entrypoint.log").read_text()[-3000:]
        assert "serve.sh: drained" in (tmp_path / "entrypoint.log").read_text()
        unhealthy = health()
        assert unhealthy.returncode == 1 and unhealthy.stdout.startswith("unhealthy")
    finally:
        if entry.poll() is None:
            entry.send_signal(signal.SIGTERM)
            entry.wait(timeout=150)


def properties(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


# ----- two instances behind HAProxy -----


@dataclass
class Cluster:
    folder: Path
    url: str
    key: str

    def multi(self, *command, timeout=300):
        result = subprocess.run([str(BIN / "python"), str(MULTI), "--dir", str(self.folder), *command],
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def layout(self) -> dict:
        return json.loads((self.folder / "layout.json").read_text())

    def instance_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.layout()['instances'][i - 1]['inference']}"

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"}

    def servers(self) -> dict:
        """HAProxy's view through scripts/multi.py status: {jaiN: status}."""
        return dict(re.findall(r"^instance (\d+) .*balancer: (\w+)", self.multi("status"), re.M))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_archive):
    if shutil.which("haproxy") is None:
        message = "haproxy not installed (apt-get install haproxy; `make test` installs it as root)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    folder = tmp_path_factory.mktemp("multi")
    [port] = free_ports(1)
    cluster = Cluster(folder, f"http://127.0.0.1:{port}", "")
    try:
        cluster.multi("--instances", "2", "--listen", f"127.0.0.1:{port}", "--archive", str(tiny_archive), "start")
        cluster.key = (folder / "api_keys").read_text().split()[0]
        yield cluster
    finally:
        subprocess.run([str(BIN / "python"), str(MULTI), "--dir", str(folder), "stop"], capture_output=True,
                       timeout=300, env=dict(os.environ, JAI_DRAIN_TIMEOUT="30"))


@dataclass
class Result:
    started: float
    ended: float
    status: int | None  # None: no HTTP answer, or a stream cut short
    instance: str | None
    error: str = ""


@dataclass
class Load:
    """A closed loop: each client sends its next request when the last one is answered. Bounded: at most
    ``per_client`` requests per client and ``seconds`` in all, whatever the test does."""

    cluster: Cluster
    clients: int = 16
    per_client: int = 400
    seconds: float = 240
    results: list[Result] = field(default_factory=list)

    def __post_init__(self):
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True) for n in range(self.clients)]

    def __enter__(self):
        self.deadline = time.monotonic() + self.seconds
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=150)

    def client(self, n: int):
        session = requests.Session()
        for i in range(self.per_client):
            if self.stop.is_set() or time.monotonic() > self.deadline:
                return
            stream = (n + i) % 2 == 0  # half streamed, half not
            body = {"prompt": f"서울 {n} {i}", "max_tokens": 8, "temperature": 0, "stream": stream}
            started = time.monotonic()
            status, instance, error = None, None, ""
            try:
                response = session.post(f"{self.cluster.url}/predictions/jai", json=body, timeout=60,
                                        headers=self.cluster.headers())
                instance = response.headers.get("X-JAI-Instance")
                last = json.loads(response.text.splitlines()[-1])  # a cut stream: not valid JSON, or no usage
                if response.status_code == 200 and last["usage"]["completion_tokens"] == 8:
                    status = 200
                else:
                    status, error = response.status_code, response.text[:200]
            except (requests.RequestException, ValueError, KeyError, IndexError) as exc:
                error = repr(exc)[:200]
            with self.lock:
                self.results.append(Result(started, time.monotonic(), status, instance, error))

    def done(self, since: float = 0.0, instance: str | None = None) -> list[Result]:
        with self.lock:
            return [r for r in self.results if r.started >= since and r.status == 200
                    and (instance is None or r.instance == instance)]

    def wait_until(self, condition, what: str):
        wait_for(lambda: condition() or self.stop.is_set(), max(1.0, self.deadline - time.monotonic()),
                 interval=0.1, what=what)
        assert not self.stop.is_set() and time.monotonic() < self.deadline, f"load ended before {what}"


def test_the_balancer_refuses_a_request_without_its_key(cluster):
    response = requests.post(f"{cluster.url}/predictions/jai", json={"prompt": "서울"}, timeout=30)
    assert response.status_code == 401 and response.json()["type"] == "Unauthorized"
    wrong = requests.post(f"{cluster.url}/predictions/jai", json={"prompt": "서울"}, timeout=30,
                          headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401
    key_file = json.loads((cluster.folder / "key_file.json").read_text())  # jai_client's format
    assert key_file["inference"]["key"] == cluster.key
    ok = requests.post(f"{cluster.url}/predictions/jai", json={"prompt": "서울", "max_tokens": 3},
                       headers=cluster.headers(), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert ok.headers["X-JAI-Instance"] in ("jai1", "jai2")


def test_sixteen_clients_are_spread_over_both_instances(cluster):
    with Load(cluster) as load:
        load.wait_until(lambda: len(load.done()) >= 96, "96 answered requests")
    assert all(r.status == 200 for r in load.results), [r.error for r in load.results if r.status != 200][:3]
    served = {name: len([r for r in load.results if r.instance == name]) for name in ("jai1", "jai2")}
    assert min(served.values()) >= 0.25 * len(load.results), served  # leastconn: about half each


def test_a_killed_instance_fails_only_its_running_requests_and_comes_back(cluster):
    folder = cluster.folder / "instance-1"
    workers = [w["pid"] for w in requests.get(
        f"http://127.0.0.1:{cluster.layout()['instances'][0]['management']}/models/jai", timeout=30).json()[0]["workers"]]
    frontend = int((folder / "tmp" / ".model_server.pid").read_text())
    with Load(cluster) as load:
        load.wait_until(lambda: len(load.done(instance="jai1")) >= 10 and len(load.done(instance="jai2")) >= 10,
                        "traffic on both instances")
        for pid in (frontend, *workers):  # the whole instance dies at once, as with a lost machine
            os.kill(pid, signal.SIGKILL)
        # from when its port refuses connections, no request can reach it any more
        wait_for(lambda: refused(cluster.instance_url(1)), 30, what="instance 1's port to refuse connections")
        killed_at = time.monotonic()
        load.wait_until(lambda: len(load.done(since=killed_at)) >= 48, "48 requests after the kill")
        wait_for(lambda: cluster.servers().get("1") == "DOWN", 30, what="HAProxy to mark instance 1 down")
        restarting_at = time.monotonic()
        cluster.multi("start-instance", "1")  # same ports; returns once HAProxy sees it healthy
        back_at = time.monotonic()
        load.wait_until(lambda: len(load.done(since=back_at, instance="jai1")) >= 10, "traffic on instance 1 again")
    failed = [r for r in load.results if r.status != 200]
    # only requests already running when the instance died failed, at most one per client
    assert all(r.started < killed_at for r in failed), [(r.started - killed_at, r.error) for r in failed]
    assert len(failed) <= load.clients
    after = [r for r in load.results if r.started > killed_at]
    assert after and all(r.status == 200 for r in after)
    assert {r.instance for r in after if r.ended < restarting_at} == {"jai2"}  # the survivor took everything
    assert len(load.done(since=back_at, instance="jai2")) > 0  # and both share the load again


def refused(url: str) -> bool:
    try:
        requests.get(f"{url}/ping", timeout=5)
    except requests.ConnectionError:
        return True
    return False


def test_a_rolling_restart_of_an_instance_loses_no_request(cluster):
    with Load(cluster) as load:
        load.wait_until(lambda: len(load.done(instance="jai2")) >= 10, "traffic on instance 2")
        # a long request on instance 2 itself, running when its drain begins
        response, lines = long_stream(cluster.instance_url(2))
        restart = threading.Thread(target=lambda: setattr(restart, "out", cluster.multi("restart-instance", "2")))
        restart_at = time.monotonic()
        restart.start()
        last = finish(lines)
        assert last["usage"]["completion_tokens"] == LONG  # it ran to its end during the drain
        restart.join(timeout=300)
        back_at = time.monotonic()
        load.wait_until(lambda: len(load.done(since=back_at, instance="jai2")) >= 10, "traffic on instance 2 again")
    assert "drained" in restart.out and "instance 2 back in rotation" in restart.out, restart.out
    assert all(r.status == 200 for r in load.results), [r.error for r in load.results if r.status != 200][:5]
    during = [r for r in load.results if restart_at < r.started and r.ended < back_at]
    assert during and {r.instance for r in during} <= {"jai1", "jai2"}
    assert len(load.results) >= 16 * 2
