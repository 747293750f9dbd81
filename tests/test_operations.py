"""Operations against real servers: generation metrics, request logs, serve.sh, the daemon units, a real
Prometheus scraping torchserve with the shipped config and dashboard queries, and failure behaviour
(a killed worker, a full job queue, token renewal)."""

import json
import os
import plistlib
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from ts_launcher import BIN, ROOT, alive, free_ports, absolute_javaagent, archive, running_torchserve

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"


def wait_for(condition, timeout=60.0, interval=0.2, what="condition"):
    """Poll ``condition()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def scrape(server) -> str:
    return requests.get(f"{server.metrics}/metrics", timeout=30).text


def sample(text: str, name: str, **labels) -> float:
    """The sum of the Prometheus text samples ``name{...}`` whose labels include ``labels``."""
    total = 0.0
    for found, value in re.findall(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def jai_counts(server) -> dict:
    text = scrape(server)
    return {
        "generated": sample(text, "jai_generated_tokens_total", ModelName="jai"),
        "prompt": sample(text, "jai_prompt_tokens_total", ModelName="jai"),
        "length": sample(text, "jai_requests_finished_total", ModelName="jai", FinishReason="length"),
        "stop": sample(text, "jai_requests_finished_total", ModelName="jai", FinishReason="stop"),
        "ttft": sample(text, "jai_time_to_first_token_seconds_count", ModelName="jai"),
        "itl": sample(text, "jai_inter_token_latency_seconds_count", ModelName="jai"),
        "active": sample(text, "jai_active_requests", ModelName="jai"),
    }


# ----- generation metrics and the request log (the shared server of tests/conftest.py) -----


def test_generation_metrics_count_tokens_requests_and_latencies(ts_server):
    before = jai_counts(ts_server)
    bodies = [
        {"prompt": "서울 백엔드", "max_tokens": 9, "temperature": 0},
        {"prompt": "부산 데이터", "max_tokens": 7, "temperature": 0, "stream": True},
        {"prompt": "판교 채용", "max_tokens": 5, "temperature": 0.8, "seed": 3},
    ]
    usages, reasons = [], []
    for body in bodies:
        response = ts_server.predict(body, timeout=60)
        assert response.status_code == 200
        last = json.loads(response.text.splitlines()[-1])
        usages.append(last["usage"])
        reasons.append(last["finish_reason"])
    expected = {
        "generated": before["generated"] + sum(u["completion_tokens"] for u in usages),
        "prompt": before["prompt"] + sum(u["prompt_tokens"] for u in usages),
        "length": before["length"] + reasons.count("length"),
        "stop": before["stop"] + reasons.count("stop"),
        "ttft": before["ttft"] + 3,
        "itl": before["itl"] + sum(u["completion_tokens"] >= 2 for u in usages),
        "active": 0,  # the last request finished: the gauge went back to 0
    }
    # the worker's metric lines reach the frontend through its stdout, just after the response
    after = wait_for(lambda: (c := jai_counts(ts_server)) == expected and c, 30, what=f"metrics {expected}")
    assert after["generated"] > before["generated"] and after["ttft"] == before["ttft"] + 3
    text = scrape(ts_server)
    assert "# TYPE jai_time_to_first_token_seconds histogram" in text
    assert "# TYPE jai_inter_token_latency_seconds histogram" in text
    assert re.search(r'^jai_time_to_first_token_seconds_bucket\{[^}]*le="0\.005"', text, re.M)  # seconds buckets
    assert "# TYPE jai_generated_tokens_total counter" in text and "# TYPE jai_active_requests gauge" in text


def test_request_log_has_one_line_per_request_without_the_prompt(ts_server):
    secret = "비밀 메모 ops-7391 연락처"
    before = (ts_server.root / "logs" / "model_log.log").read_text()
    response = ts_server.predict({"prompt": secret, "max_tokens": 13, "temperature": 0}, timeout=60)
    usage = response.json()["usage"]

    def new_lines():
        text = (ts_server.root / "logs" / "model_log.log").read_text()[len(before):]
        return [line for line in text.splitlines() if re.search(r" request \S+ prompt_tokens=", line)]

    [line] = wait_for(new_lines, 30, what="the request's log line")
    match = re.search(
        r"request [0-9a-f-]{36} prompt_tokens=(\d+) generated_tokens=(\d+) finish_reason=(stop|length) "
        r"ttft_ms=(\d+\.\d) total_ms=(\d+\.\d)$",
        line,
    )
    assert match, line
    assert int(match[1]) == usage["prompt_tokens"] and int(match[2]) == usage["completion_tokens"]
    assert 0 < float(match[4]) <= float(match[5])
    assert "ops-7391" not in (ts_server.root / "logs" / "model_log.log").read_text()


# ----- failure behaviour on the shared server -----


def test_a_killed_worker_is_replaced_and_requests_succeed_again(ts_server):
    [worker] = ts_server.ready_workers()
    starts = sample(scrape(ts_server), "jai_worker_starts_total", ModelName="jai")
    os.kill(worker["pid"], signal.SIGKILL)
    replaced = wait_for(
        lambda: [w for w in ts_server.ready_workers() if w["pid"] != worker["pid"]], 120, 0.5, "a new READY worker"
    )
    assert len(replaced) == 1
    response = ts_server.predict({"prompt": "대전 ML", "max_tokens": 4}, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    # the new worker counted itself: the dashboard's "worker starts"
    assert sample(scrape(ts_server), "jai_worker_starts_total", ModelName="jai") == starts + 1


# ----- a second server: one request at a time, a two-request job queue, prompts logged -----

SMALL_CONFIG = """\
continuousBatching: true
minWorkers: 1
maxWorkers: 1
batchSize: 1
maxBatchDelay: 1
responseTimeout: 120
startupTimeout: 120
jobQueueSize: 2
handler:
  n_head: 4
  threads: 1
  log_prompt_chars: 50
  defaults: {max_tokens: 16, temperature: 0}
"""


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, demo_build):
    root = tmp_path_factory.mktemp("small_queue")
    (root / "small-config.yaml").write_text(SMALL_CONFIG)
    archive(root, demo_build.checkpoint, demo_build.tokenizer, config_file=root / "small-config.yaml")
    with running_torchserve(root) as server:
        yield server


def test_a_full_job_queue_answers_503_and_loses_no_accepted_request(small_server):
    before = jai_counts(small_server)
    n, results = 12, {}

    def call(i):  # temperature 2 over the whole vocabulary: long answers, rarely an early end-of-text
        results[i] = small_server.predict(
            {"prompt": f"서울 {i}", "max_tokens": 400, "temperature": 2.0, "top_k": None, "seed": i}, timeout=120
        )

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [r for r in results.values() if r.status_code == 503]
    accepted = [r for r in results.values() if r.status_code != 503]
    # one request generating, two queued: the rest are refused at once (how many depends on timing)
    assert refused and len(accepted) >= 3, [r.status_code for r in results.values()]
    for response in refused:
        body = response.json()
        assert body["code"] == 503 and body["type"] == "ServiceUnavailableException"
        assert 'Model "jai" has no worker to serve inference request' in body["message"]
    for response in accepted:  # every request TorchServe took was answered in full
        assert response.status_code == 200
        body = response.json()
        assert body["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] >= 1
    # the frontend reads the worker's metric lines asynchronously: wait for the gauge line as well
    finished = wait_for(
        lambda: (c := jai_counts(small_server))["length"] + c["stop"] - before["length"] - before["stop"]
        == len(accepted) and c["active"] == 0 and c, 30, what="the finished-request counter and active gauge")
    assert finished["active"] == 0


def test_log_prompt_chars_logs_the_first_characters_only(small_server):
    prompt = "서울 강남 프론트엔드 개발자 React TypeScript 경력 3년 이상 연봉 6000 재택 주 2회 가능한 곳 찾아요 ops-tail-4412"
    assert len(prompt) > 50
    response = small_server.predict({"prompt": prompt, "max_tokens": 3}, timeout=60)
    assert response.status_code == 200
    log = wait_for(
        lambda: (t := (small_server.root / "logs" / "model_log.log").read_text()) and f"prompt={prompt[:50]!r}" in t
        and t, 30, what="the logged prompt prefix")
    assert prompt[:51] not in log and "ops-tail-4412" not in log


def test_the_inference_token_is_renewed_with_the_api_key(small_server):
    old = small_server.key("inference")
    keys = json.loads((small_server.root / "key_file.json").read_text())
    assert set(keys) == {"management", "inference", "API"} and "expiration time" in keys["inference"]
    response = requests.post(f"{small_server.management}/token?type=inference", timeout=30,
                             headers={"Authorization": f"Bearer {keys['API']['key']}"})
    assert response.status_code == 200, response.text
    new = wait_for(lambda: (k := small_server.key("inference")) != old and k, 10, what="a rewritten key_file.json")
    assert small_server.predict({"prompt": "제주", "max_tokens": 2}, timeout=60).status_code == 200  # new key
    stale = requests.post(f"{small_server.inference}/predictions/jai", json={"prompt": "제주", "max_tokens": 2},
                          headers={"Authorization": f"Bearer {old}"}, timeout=60)
    assert stale.status_code == 401 and "Token Authorization failed" in stale.text
    assert requests.post(f"{small_server.management}/token?type=inference", timeout=30,
                         headers={"Authorization": f"Bearer {new}"}).status_code == 401  # needs the API key


# ----- scripts/serve.sh for real, in a scratch folder on free ports -----


def scratch_deployment(root: Path) -> Path:
    """``root`` as a deployment folder: the repo's config.properties with every port moved to a free one
    (and the patch agent named by its absolute path), metrics.yaml beside it; the caller archives into
    root/model_store."""
    ports = dict(zip(("8080", "8081", "8082", "7070", "7071"), free_ports(5)))
    config = (ROOT / "config.properties").read_text()
    config = re.sub(r"127\.0\.0\.1:(808[012])", lambda m: f"127.0.0.1:{ports[m[1]]}", config)
    config = re.sub(r"^(grpc_\w+_port)=(\d+)$", lambda m: f"{m[1]}={ports[m[2]]}", config, flags=re.M)
    settings = "\n".join(line for line in config.splitlines() if not line.startswith("#"))
    assert not re.search(r"[:=](808[012]|707[01])\b", settings)  # nothing left on a port a user's server has
    (root / "config.properties").write_text(absolute_javaagent(config))
    shutil.copy(ROOT / "metrics.yaml", root / "metrics.yaml")
    return root


def test_serve_script_starts_reports_and_stops_a_server(tmp_path, demo_build):
    root = scratch_deployment(tmp_path)
    archive(root, demo_build.checkpoint, demo_build.tokenizer)
    env = dict(os.environ, JAI_DIR=str(root), TMPDIR=str(root), JAI_START_TIMEOUT="150")

    def serve(command):
        return subprocess.run([str(ROOT / "scripts" / "serve.sh"), command], env=env, capture_output=True,
                              text=True, timeout=200)

    assert serve("status").returncode == 3
    try:
        started = serve("start")
        assert started.returncode == 0, started.stdout + started.stderr
        inference = re.search(r"^inference_address=(\S+)$", (root / "config.properties").read_text(), re.M)[1]
        assert f"jai is serving on {inference}" in started.stdout
        status = serve("status")
        pid = int(re.search(r"running \(pid (\d+)\)", status.stdout)[1])
        assert status.returncode == 0 and pid == int((root / ".model_server.pid").read_text())
        assert serve("start").stdout.startswith(f"serve.sh: already running (pid {pid})")
        token = json.loads((root / "key_file.json").read_text())["inference"]["key"]
        response = requests.post(f"{inference}/predictions/jai", json={"prompt": "서울", "max_tokens": 3},
                                 headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert response.status_code == 200
        stopped = serve("stop")
        assert stopped.returncode == 0 and "serve.sh: stopped" in stopped.stdout
        assert serve("status").stdout.strip() == "serve.sh: stopped"
        assert not alive(pid)  # stop waited for the frontend to exit (a zombie counts as gone)
        # the keys stay for the next start (`torchserve --stop` would delete the file; serve.sh does not)
        assert (root / "logs" / "model_log.log").exists() and (root / "key_file.json").exists()
    finally:
        if serve("status").returncode == 0:
            serve("stop")


# ----- daemon units -----

UNIT = DEPLOY / "systemd" / "jai-serve.service"
TORCHSERVE_ARGS = ["--foreground", "--ncs", "--ts-config", "config.properties"]


def unit_settings() -> dict:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_the_systemd_unit_runs_torchserve_in_the_foreground_and_restarts_it(tmp_path):
    unit = unit_settings()
    home = unit["WorkingDirectory"]
    assert unit["ExecStart"].split() == [f"{home}/.venv/bin/torchserve", *TORCHSERVE_ARGS]
    assert unit["Type"] == "simple" and unit["Restart"] == "always" and int(unit["RestartSec"]) > 0
    assert unit["User"] not in ("", "root") and unit["EnvironmentFile"].lstrip("-").startswith("/etc/")
    assert unit["ReadWritePaths"] == home and unit["PrivateTmp"] == "yes"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # only this check needs systemd; the rest above ran
    # verified as installed at this checkout (the ExecStart binary must exist for systemd-analyze)
    rendered = tmp_path / "jai-serve.service"
    rendered.write_text(UNIT.read_text().replace(f"{home}/.venv/bin", str(BIN)).replace(home, str(ROOT)))
    result = subprocess.run([analyze, "verify", str(rendered)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr


def test_the_launchd_job_runs_the_same_command():
    with open(DEPLOY / "launchd" / "com.jai.server.plist", "rb") as file:
        job = plistlib.load(file)
    home = job["WorkingDirectory"]
    assert job["Label"] == "com.jai.server" and job["KeepAlive"] is True and job["RunAtLoad"] is True
    assert job["ProgramArguments"] == [f"{home}/.venv/bin/torchserve", *TORCHSERVE_ARGS]
    assert f"{home}/.venv/bin" in job["EnvironmentVariables"]["PATH"].split(":")


# ----- monitoring: a real Prometheus with the shipped config, queried through its HTTP API -----


@pytest.fixture
def prometheus(ts_server, tmp_path):
    """Prometheus (Debian's `prometheus` package) scraping ts_server every second with
    deploy/prometheus/prometheus.yml and its alert rules; always stopped."""
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus not installed (apt-get install prometheus; .ci/run installs it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [ts_server.metrics.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "w") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready():
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                return requests.get(f"{url}/-/ready", timeout=5).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(ready, 60, what="prometheus to be ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(url, expr):
    response = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_the_generation_metrics_and_the_dashboard_queries_work(ts_server, prometheus):
    wait_for(lambda: [r for r in query(prometheus, 'up{job="jai"}') if r["value"][1] == "1"], 60,
             what="a first successful scrape")

    def generate_and_wait_for_the_scrape(seed):
        assert ts_server.predict({"prompt": "서울", "max_tokens": 6, "seed": seed}, timeout=60).status_code == 200
        served = wait_for(lambda: sample(scrape(ts_server), "jai_generated_tokens_total", ModelName="jai"), 30)
        wait_for(lambda: [r for r in query(prometheus, 'sum(jai_generated_tokens_total{ModelName="jai"})')
                          if float(r["value"][1]) >= served], 60, what=f"{served} generated tokens in prometheus")

    generate_and_wait_for_the_scrape(0)  # on a fresh server the series starts here: a rate needs an increase
    generate_and_wait_for_the_scrape(1)
    wait_for(lambda: query(prometheus, 'sum(rate(jai_generated_tokens_total{ModelName="jai"}[1m])) > 0'), 30,
             what="a tokens/s rate")
    assert query(prometheus, 'jai_time_to_first_token_seconds_bucket{ModelName="jai",le="+Inf"}')
    assert query(prometheus, 'sum by (FinishReason) (jai_requests_finished_total{ModelName="jai"})')

    dashboard = json.loads((DEPLOY / "grafana" / "jai-dashboard.json").read_text())
    targets = [(p["title"], t["expr"]) for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    titles = {title for title, _ in targets}
    for needed in ("Tokens per second", "Time to first token", "Queue wait (mean)", "Errors per second", "Workers"):
        assert needed in titles
    answered = {}
    for title, expr in targets:  # every panel query is valid PromQL against the scraped series
        answered[expr] = query(prometheus, expr.replace("$__rate_interval", "1m"))
    for title, expr in targets:
        if title in ("Tokens per second", "Time to first token", "Inter-token latency", "Workers"):
            assert answered[expr], f"{title}: {expr} returned nothing"

    rules = requests.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
    assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * 5
