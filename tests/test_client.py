"""jai_client (library and ``python -m jai_client``) against a real torchserve serving the demo model."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import jai_client
from jai_client import Completion, JAIClient, JAIError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "서울에서 React 개발자 채용 있어?"
GREEDY = dict(temperature=0, max_tokens=40)


@pytest.fixture
def client(ts_server) -> JAIClient:
    return JAIClient(ts_server.inference, ts_server.management, key_file=ts_server.root / "key_file.json")


@pytest.fixture
def closed_url():
    """A loopback port that is bound but never listens: connecting is refused, and nobody can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def cli(*args: str, server=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(*args, server=server), cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180
    )


def cli_command(*args: str, server=None) -> list[str]:
    where = (
        []
        if server is None
        else [
            "--url",
            server.inference,
            "--management-url",
            server.management,
            "--token-file",
            str(server.root / "key_file.json"),
        ]
    )
    return [sys.executable, "-m", "jai_client", *where, *args]


def cli_env() -> dict[str, str]:
    """The test's environment without JAI_* settings, so only the flags choose the server."""
    return {k: v for k, v in os.environ.items() if not k.startswith("JAI_")}


# ----- library -----


def test_generate_returns_the_servers_response_fields(client, ts_server):
    result = client.generate("판교 백엔드", max_tokens=12, temperature=0)
    raw = ts_server.predict({"prompt": "판교 백엔드", "max_tokens": 12, "temperature": 0}, timeout=60).json()
    assert result == Completion(**raw)
    assert result.prompt == "판교 백엔드" and result.full_text == result.prompt + result.generated
    assert 0 < result.usage["completion_tokens"] <= 12


def test_chat_answers_the_question_in_korean_and_stops_at_the_answer_end(client):
    result = client.chat(QUESTION, temperature=0, max_tokens=120)
    assert result.finish_reason == "stop", result
    assert result.prompt == f"[QUESTION]\n{QUESTION}\n[/QUESTION]\n\n[ANSWER]\n"
    assert "React" in result.generated and "[/ANSWER]" not in result.generated
    assert any("가" <= ch <= "힣" for ch in result.generated)


@pytest.mark.parametrize("mode", ["chat", "generate"])
def test_stream_pieces_join_to_the_final_result(client, mode):
    stream = client.stream(QUESTION, mode=mode, **GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == stream.result.generated
    complete = client.chat(QUESTION, **GREEDY) if mode == "chat" else client.generate(QUESTION, **GREEDY)
    assert stream.result == complete


def test_health(client):
    assert client.health() == {"status": "Healthy"}


def test_scale_to_two_workers_and_back(client):
    try:
        assert "Workers scaled to 2" in client.scale(2)["status"]
        workers = client.describe()["workers"]
        assert [w["status"] for w in workers] == ["READY", "READY"]
        assert client.generate("서울", max_tokens=3).usage["completion_tokens"] > 0
    finally:
        client.scale(1)  # other tests share this server
    assert [w["status"] for w in client.describe()["workers"]] == ["READY"]


def test_describe_customized_has_the_handler_description(client):
    assert client.describe(customized=True)["customizedMetadata"]["vocab_size"] == 1024


def test_seed_helpers_keep_their_signatures_and_returns(ts_server, monkeypatch):
    monkeypatch.setattr(jai_client.client, "_default", None)  # restored after the test
    monkeypatch.setenv("JAI_URL", ts_server.inference)
    monkeypatch.setenv("JAI_KEY_FILE", str(ts_server.root / "key_file.json"))
    answer = jai_client.chat(QUESTION, max_tokens=20)  # sampled at 0.8, as the seed's helper did
    assert isinstance(answer, str) and answer and "[QUESTION]" not in answer
    text = jai_client.generate("판교 백엔드", 8)
    assert isinstance(text, str) and text.startswith("판교 백엔드") and len(text) > len("판교 백엔드")


def test_a_refused_request_raises_jaierror_with_the_servers_message(client):
    with pytest.raises(JAIError) as refused:
        client.generate("서울", top_k=0)
    assert refused.value.status == 400 and refused.value.message == "top_k: must be >= 1, got 0"
    assert str(refused.value) == "400 top_k: must be >= 1, got 0"
    with pytest.raises(JAIError, match="top_k: must be >= 1"):
        client.stream("서울", mode="chat", top_k=0)  # raised when sent, before any iteration


def test_a_rotated_key_file_is_read_again(ts_server, tmp_path):
    key_file = tmp_path / "key_file.json"
    key_file.write_text('{"inference": {"key": "expired"}, "management": {"key": "expired"}}')
    client = JAIClient(ts_server.inference, ts_server.management, key_file=key_file)
    with pytest.raises(JAIError) as refused:
        client.health()
    assert refused.value.status == 401 and "Token Authorization failed" in refused.value.message
    key_file.write_text((ts_server.root / "key_file.json").read_text())  # as TorchServe rewrites it
    assert client.health() == {"status": "Healthy"}  # the cached expired key is refused, then replaced


def test_a_missing_key_file_is_named_only_when_a_token_is_needed(ts_server, tmp_path, closed_url):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(JAIError, match=re.escape(f"no inference token: {missing} not found")):
        JAIClient(ts_server.inference, key_file=missing).health()
    with pytest.raises(JAIError, match="cannot reach"):  # a server that is down is reported as down
        JAIClient(closed_url, key_file=missing).health()


def test_a_server_that_is_down_raises_jaierror(closed_url):
    client = JAIClient(closed_url, closed_url, token="t", management_token="t")
    for call in (client.health, lambda: client.generate("서울"), lambda: client.scale(1)):
        with pytest.raises(JAIError) as down:
            call()
        assert down.value.status is None
        assert down.value.message.startswith(f"cannot reach {closed_url}: Connection refused")


# ----- command line -----


def test_cli_chat_streams_the_answer_as_it_is_generated(client, ts_server):
    expected = client.chat(QUESTION, temperature=0, max_tokens=120).generated
    command = cli_command("chat", QUESTION, "--temperature", "0", "--max-tokens", "120", server=ts_server)
    with subprocess.Popen(command, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        first = os.read(proc.stdout.fileno(), 1 << 16)  # returns with the first flushed piece
        running = proc.poll() is None
        rest, err = proc.communicate(timeout=120)
    out = (first + rest).decode()
    assert proc.returncode == 0, err.decode()
    assert running and 0 < len(first) < len(out.encode()), "the answer came all at once"
    assert out == expected  # the answer ends with a newline: none added


def test_cli_generate_no_stream_prints_the_full_text(client, ts_server):
    done = cli("generate", "판교 백엔드", "--temperature", "0", "--max-tokens", "12", "--no-stream", server=ts_server)
    assert done.returncode == 0, done.stderr
    full_text = client.generate("판교 백엔드", temperature=0, max_tokens=12).full_text
    assert done.stdout == full_text + ("" if full_text.endswith("\n") else "\n")


def test_cli_health_and_scale(ts_server):
    health = cli("health", server=ts_server)
    assert (health.returncode, health.stdout) == (0, "Healthy\n")
    scale = cli("scale", "1", server=ts_server)  # already 1: exercises the call without moving workers
    assert (scale.returncode, scale.stdout) == (0, "Workers scaled to 1 for model: jai\n")


def test_cli_server_error_is_one_line_and_exit_1(ts_server):
    done = cli("chat", "서울", "--top-k", "0", server=ts_server)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "error: 400 top_k: must be >= 1, got 0\n")


def test_cli_server_down_is_one_clear_line_and_exit_1(closed_url):
    done = cli("--url", closed_url, "chat", "서울")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"error: cannot reach {closed_url}: Connection refused (is torchserve running? try: make serve)\n"
    )


def test_cli_usage_errors_exit_2():
    assert cli("scale", "two").returncode == 2
    assert cli("chat").returncode == 2
    assert cli("chat", "서울", "--max-tokens", "many").returncode == 2
