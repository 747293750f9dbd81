"""A new checkpoint goes live on a running torchserve and back (scripts/update.py, `make update` /
`make rollback`; docs/updates.md): 16 streaming clients run throughout, on both routes, and none fails;
every answer names its version and equals that version's solo answer; requests sent once the update is
live get the new version. Two tiny random checkpoints of the same shape, the shipped model-config.yaml.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import seed_checkpoint
from jaiserve import file_sha256
from ts_launcher import ROOT, archive, running_torchserve

pytestmark = pytest.mark.e2e

SHAPE = dict(vocab_size=512, block_size=64, n_layer=2, n_head=6, n_embd=48)  # n_head: model-config.yaml's
PROMPTS = ["서울 프론트엔드", "부산 데이터", "대전 ML 엔지니어", "제주 원격", "판교 백엔드", "신입 채용", "경력 3년", "연봉 협의"]
MAX_TOKENS = 16
CLIENTS = 16


@pytest.fixture(scope="module")
def versions(tmp_path_factory, korean_tokenizer):
    root = tmp_path_factory.mktemp("updates")
    checkpoints = {}
    for seed in (0, 1):
        folder = root / f"trained{seed}"
        folder.mkdir()
        seed_checkpoint(folder / "ckpt.pt", seed=seed, **SHAPE)
        korean_tokenizer.save(str(folder / "tokenizer.json"))
        checkpoints[file_sha256(folder / "ckpt.pt")[:12]] = folder
    archive(root, root / "trained0" / "ckpt.pt", root / "trained0" / "tokenizer.json")
    with running_torchserve(root) as server:
        yield server, list(checkpoints), checkpoints


def update_py(server, *args):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "update.py"), *args, "--model-store",
                             str(server.root / "model_store")], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TMPDIR=str(server.root)))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def native(server, prompt):
    """A streamed greedy request: (version, generated text)."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with server.predict(body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        lines = [json.loads(raw) for raw in response.iter_lines() if raw]
    last = lines[-1]
    assert last["finish_reason"] in ("stop", "length"), last
    return last["model_version"], "".join(line["text"] for line in lines)


def openai(server, prompt):
    """The same through the OpenAI route (streamed events): (version from system_fingerprint, text)."""
    body = {"model": "jai", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with requests.post(f"{server.inference}/predictions/jai/1.0/v1/completions", json=body,
                       headers=server.headers(), stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        events = [raw.decode().removeprefix("data: ") for raw in response.iter_lines() if raw]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    fingerprints = {c["system_fingerprint"] for c in chunks}
    assert len(fingerprints) == 1 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    return fingerprints.pop().removeprefix("jai-"), "".join(c["choices"][0]["text"] for c in chunks)


def served_version(server):
    return server.describe(customized=True)["customizedMetadata"]["model_version"]


def test_an_update_and_a_rollback_under_16_streaming_clients_fail_nothing(versions):
    server, (old, new), folders = versions
    assert served_version(server) == old
    solo = {old: {p: native(server, p) for p in PROMPTS}}
    assert {v for v, _ in solo[old].values()} == {old}
    assert "is live on 1 worker(s)" in update_py(server, "update", "--checkpoint", str(folders[new] / "ckpt.pt"),
                                                  "--tokenizer", str(folders[new] / "tokenizer.json"))
    assert served_version(server) == new
    solo[new] = {p: native(server, p) for p in PROMPTS}
    assert {v for v, _ in solo[new].values()} == {new}
    assert solo[new] != solo[old]  # two different models: the test can tell them apart
    # the client CLI runs the same script (on the server's host)
    rollback = subprocess.run([sys.executable, "-m", "jai_client", "rollback", "--repo", str(ROOT), "--model-store",
                               str(server.root / "model_store")], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, TMPDIR=str(server.root)))
    assert rollback.returncode == 0 and f"{old} is live on 1 worker(s)" in rollback.stdout, rollback.stderr
    assert served_version(server) == old

    stop = threading.Event()
    marks = {}  # phase -> time.monotonic() it began

    def client(index):
        answers = []  # (sent at, version, text, prompt)
        ask = openai if index % 4 == 3 else native
        while not stop.is_set():
            prompt = PROMPTS[(index + len(answers)) % len(PROMPTS)]
            sent = time.monotonic()
            version, text = ask(server, prompt)  # any failure fails the test
            answers.append((sent, version, text, prompt))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        running = [pool.submit(client, i) for i in range(CLIENTS)]
        time.sleep(1.0)
        update_py(server, "update", "--checkpoint", str(folders[new] / "ckpt.pt"), "--tokenizer",
                  str(folders[new] / "tokenizer.json"))
        marks["new live"] = time.monotonic()
        time.sleep(1.5)
        marks["rollback sent"] = time.monotonic()
        update_py(server, "rollback")
        marks["old live"] = time.monotonic()
        time.sleep(1.0)
        stop.set()
        answers = [a for f in running for a in f.result()]
    seen = {version for _, version, _, _ in answers}
    assert seen == {old, new}
    for sent, version, text, prompt in answers:
        assert text == solo[version][prompt][1], (version, prompt)
    # sent while the new version was live (after update.py returned, before the rollback began): the new one
    between = [v for sent, v, _, _ in answers if marks["new live"] < sent < marks["rollback sent"]]
    assert between and set(between) == {new}
    after = [v for sent, v, _, _ in answers if sent > marks["old live"]]
    assert after and set(after) == {old}
    text = requests.get(f"{server.metrics}/metrics", timeout=30).text
    labelled = set(re.findall(r'^jai_requests_finished_total\{[^}]*ModelVersion="(\w+)"', text, re.M))
    assert {old, new} <= labelled
    print(f"{len(answers)} answers, {sum(v == new for _, v, _, _ in answers)} by {new}")
