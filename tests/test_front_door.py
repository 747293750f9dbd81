"""The front door (deploy/nginx/jai.conf in a real nginx) and the keys, end to end against a real torchserve:
the seed's client and URLs, the seed's /health, 401s on every address, the static pages, and keys that
survive a restart until `scripts/serve.sh rotate-key` replaces them (docs/front-door.md)."""

import json
import os
import subprocess
import time

import openai
import pytest
import requests

from ts_launcher import ROOT, archive, running_front_door, write_config

pytestmark = pytest.mark.e2e

QUESTION = "서울에서 프론트엔드 개발자 채용 있어?"  # the seed client's example
GREEDY = {"max_tokens": 24, "temperature": 0}
SEED_FIELDS = {"prompt", "generated", "full_text"}


def seed_client(base_url, key):
    """The seed's Python client (design document 5.2: BASE_URL, chat() and generate()), reproduced call for
    call, with the one change docs/front-door.md asks for: both requests.post calls carry the key."""
    headers = {"Authorization": f"Bearer {key}"}  # the change
    seen = []  # the response bodies, for the test

    def chat(prompt: str, max_tokens: int = 256) -> str:
        response = requests.post(f"{base_url}/chat", json={"prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0.8}, headers=headers)
        response.raise_for_status()
        seen.append(response.json())
        return response.json()["generated"]

    def generate(prompt: str, max_tokens: int = 256) -> str:
        response = requests.post(f"{base_url}/generate", json={"prompt": prompt, "max_tokens": max_tokens},
                                 headers=headers)
        response.raise_for_status()
        seen.append(response.json())
        return response.json()["full_text"]

    return chat, generate, seen


def test_the_seeds_client_with_the_key_gets_the_seeds_fields(front_door, ts_server):
    chat, generate, seen = seed_client(front_door, ts_server.key())
    answer = chat(QUESTION, max_tokens=32)
    full = generate("서울 프론트엔드 채용", max_tokens=16)
    chatted, generated = seen
    assert SEED_FIELDS <= set(chatted) and SEED_FIELDS <= set(generated)
    assert answer == chatted["generated"] and answer.strip()
    assert chatted["prompt"] == f"[QUESTION]\n{QUESTION}\n[/QUESTION]\n\n[ANSWER]\n"  # the seed's /chat wrapping
    assert chatted["full_text"] == chatted["prompt"] + answer
    assert full == generated["full_text"] == "서울 프론트엔드 채용" + generated["generated"]
    assert generated["usage"]["completion_tokens"] == 16 and generated["finish_reason"] == "length"


def test_the_seed_routes_equal_the_native_api_and_stream_unbuffered(front_door, ts_server):
    native_chat = ts_server.predict({"prompt": QUESTION, "mode": "chat", **GREEDY}, timeout=120).json()
    chat = requests.post(f"{front_door}/chat", json={"prompt": QUESTION, **GREEDY}, headers=ts_server.headers(),
                         timeout=120)
    assert chat.status_code == 200 and chat.json() == native_chat
    native = ts_server.predict({"prompt": "판교 백엔드", **GREEDY}, timeout=120).json()
    for path in ("/generate", "/predictions/jai"):
        answer = requests.post(f"{front_door}{path}", json={"prompt": "판교 백엔드", **GREEDY},
                               headers=ts_server.headers(), timeout=120)
        assert answer.status_code == 200 and answer.json() == native, path
    # /chat is chat mode: a contradicting mode is refused, naming the field
    mixed = requests.post(f"{front_door}/chat", json={"prompt": "a", "mode": "generate"}, headers=ts_server.headers(),
                          timeout=30)
    assert mixed.status_code == 400 and mixed.json()["message"].startswith("mode: ")
    # streamed NDJSON passes nginx line by line, not at the end
    body = {"prompt": QUESTION, "stream": True, "max_tokens": 48, "temperature": 0}
    sent = time.perf_counter()
    arrivals, lines = [], []
    with requests.post(f"{front_door}/chat", json=body, headers=ts_server.headers(), stream=True,
                       timeout=120) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        for line in response.iter_lines():
            arrivals.append(time.perf_counter() - sent)
            lines.append(json.loads(line))
    assert len(lines) > 5 and arrivals[0] < 0.75 * arrivals[-1]
    assert "".join(line["text"] for line in lines) == lines[-1]["generated"]


def test_health_is_the_seeds_body_from_a_worker(front_door, ts_server):
    health = requests.get(f"{front_door}/health", headers=ts_server.headers(), timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "healthy", "model_loaded": True, "device": "cpu"}


def test_a_missing_or_wrong_key_is_401_on_every_address(front_door, ts_server):
    wrong = {"Authorization": "Bearer not-the-key"}
    for url in (f"{front_door}/generate", f"{front_door}/chat", f"{ts_server.inference}/predictions/jai"):
        for headers in ({}, wrong):
            refused = requests.post(url, json={"prompt": "a"}, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", url
            assert refused.json()["code"] == 401 and refused.json()["type"] == "InvalidKeyException"
            assert "key_file.json" in refused.json()["message"]
    for url in (f"{front_door}/health", f"{ts_server.inference}/ping"):
        assert requests.get(url, timeout=30).status_code == 401
    # OpenAI's routes: OpenAI's body, so the SDK raises AuthenticationError
    for base_url in (f"{front_door}/v1", f"{ts_server.inference}/predictions/jai/1.0/v1"):
        client = openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="jai", messages=[{"role": "user", "content": "a"}])
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
        assert caught.value.response.headers["WWW-Authenticate"] == "Bearer"
    # the management API keeps its own key: the inference key is refused there
    describe = f"{ts_server.management}/models/jai"
    assert requests.get(describe, headers=ts_server.headers(), timeout=30).status_code == 401
    assert requests.get(describe, headers=ts_server.headers("management"), timeout=30).status_code == 200
    # the token API wants the API key
    refused = requests.post(f"{ts_server.management}/token?type=inference", headers=ts_server.headers("management"),
                            timeout=30)
    assert refused.status_code == 401


def test_the_static_pages_need_no_key(front_door):
    pages = {"/": ("text/html", "/v1/chat/completions"), "/docs": ("text/html", "swagger-ui-bundle.js"),
             "/redoc": ("text/html", "redoc.standalone.js"), "/openapi.yaml": ("application/yaml", "openapi: 3.1"),
             "/assets/swagger-ui.css": ("text/css", ".swagger-ui"),
             "/assets/swagger-ui-bundle.js": ("application/javascript", "SwaggerUIBundle"),
             "/assets/redoc.standalone.js": ("application/javascript", "Redoc")}
    for path, (kind, needle) in pages.items():
        page = requests.get(front_door + path, timeout=30)
        assert page.status_code == 200 and page.headers["content-type"].startswith(kind), path
        assert needle in page.text, path
    for path in ("/config.properties", "/key_file.json", "/web/chat.html", "/assets/", "/docs/openapi.yaml"):
        assert requests.get(front_door + path, timeout=30).status_code == 404, path


def test_the_front_door_answers_502_json_when_torchserve_is_not_there(tmp_path):
    with running_front_door(tmp_path, "127.0.0.1:9") as url:  # the discard port: nothing listens
        native = requests.post(f"{url}/generate", json={"prompt": "a"}, timeout=30)
        assert native.status_code == 502 and native.json()["type"] == "BadGateway"
        with pytest.raises(openai.InternalServerError) as caught:
            openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0).models.list()
        assert caught.value.status_code == 502 and caught.value.code == "upstream_unavailable"


def serve(root, command):
    """scripts/serve.sh in ``root`` (its own TMPDIR: pid file and worker sockets), as `make start/stop` runs it."""
    env = dict(os.environ, JAI_DIR=str(root), TMPDIR=str(root), LOG_LOCATION=str(root / "logs"),
               METRICS_LOCATION=str(root / "logs"), JAI_DRAIN_TIMEOUT="10")
    return subprocess.run([str(ROOT / "scripts" / "serve.sh"), command], env=env, capture_output=True, text=True,
                          timeout=300)


def models(server, key):
    client = openai.OpenAI(base_url=f"{server.inference}/predictions/jai/1.0/v1", api_key=key, max_retries=0,
                           timeout=60)
    return [m.id for m in client.models.list()]


def test_keys_survive_a_restart_and_a_rotated_out_key_is_refused(tmp_path, demo_build):
    """`scripts/serve.sh start`, `rotate-key`, `stop` and `start` again (what `make serve`, `make rotate-key`
    and `make stop` run) on a server of its own: the shared one's key must not change under other tests.
    Then a start with token_expiration_min set: the expiry key_file.json states is honoured."""
    archive(tmp_path, demo_build.checkpoint, demo_build.tokenizer)
    server = write_config(tmp_path)
    try:
        started = serve(tmp_path, "start")
        assert started.returncode == 0, started.stdout + started.stderr
        first = json.loads((tmp_path / "key_file.json").read_text())
        assert first["inference"]["expiration time"] == first["management"]["expiration time"] == "never"
        old = server.key()
        assert models(server, old) == ["jai"]
        rotated = serve(tmp_path, "rotate-key")
        assert rotated.returncode == 0 and "the old one is refused" in rotated.stdout, rotated.stderr
        new = server.key()
        assert new != old and models(server, new) == ["jai"]
        with pytest.raises(openai.AuthenticationError):
            models(server, old)
        assert server.key("management") == first["management"]["key"]  # only the inference key changed
        stopped = serve(tmp_path, "stop")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert json.loads((tmp_path / "key_file.json").read_text())["inference"]["key"] == new
        started = serve(tmp_path, "start")  # reads the keys back
        assert started.returncode == 0, started.stdout + started.stderr
        assert models(server, new) == ["jai"]
        with pytest.raises(openai.AuthenticationError):
            models(server, old)
        assert "keys read back from" in server.log("logs/ts_log.log", lines=400)
        # an operator's expiry: with token_expiration_min set, the time key_file.json states stands
        assert serve(tmp_path, "stop").returncode == 0
        keys = json.loads((tmp_path / "key_file.json").read_text())
        keys["inference"]["expiration time"] = "2020-01-01T00:00:00Z"
        (tmp_path / "key_file.json").write_text(json.dumps(keys))
        with open(tmp_path / "config.properties", "a") as config:
            config.write("token_expiration_min=60\n")
        started = serve(tmp_path, "start")  # its readiness check uses the management key: "never" -> 60 min
        assert started.returncode == 0, started.stdout + started.stderr
        with pytest.raises(openai.AuthenticationError):
            models(server, new)  # expired in 2020
    finally:
        serve(tmp_path, "stop")


def test_without_nginx_make_serve_says_so_and_torchserve_serves_alone(monkeypatch, capsys, tmp_path):
    from scripts import front_door

    monkeypatch.setattr(front_door, "nginx_binary", lambda: None)
    (tmp_path / "config.properties").write_text("inference_address=http://127.0.0.1:18080\n")
    assert front_door.start(tmp_path / "logs" / "nginx", "127.0.0.1:18000", tmp_path / "config.properties") == 0
    message = capsys.readouterr().err
    assert "nginx is not installed" in message and "http://127.0.0.1:18080" in message
    assert not (tmp_path / "logs").exists()  # nothing started, nothing written
