"""Continuous batching end to end (the shipped default): requests join at the next step, a hung-up
client leaves at the next handle() call, a one-step answer is a plain response, and generated tokens
are counted as they are produced. The frontend bugs it needs fixed are tested in test_torchserve_patch.py.
"""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests


from conftest import save_endless_tokenizer, seed_checkpoint
from test_operations import jai_counts, wait_for
from ts_launcher import archive, running_torchserve

pytestmark = pytest.mark.e2e

LONG = {"prompt": "서울", "temperature": 1.0, "top_k": None, "stream": True}


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """torchserve with the shipped configuration serving a small random model whose tokenizer has no
    end-of-text token: every request runs to max_tokens, so "long" requests are long for sure."""
    root = tmp_path_factory.mktemp("endless")
    seed_checkpoint(root / "ckpt.pt", vocab_size=512, block_size=256, n_layer=2, n_head=6, n_embd=48)
    save_endless_tokenizer(root / "tokenizer.json")
    archive(root, root / "ckpt.pt", root / "tokenizer.json")  # the shipped model-config.yaml (n_head 6)
    with running_torchserve(root) as server:
        yield server


def test_the_shipped_configuration_batches_continuously(ts_server):
    assert ts_server.describe(customized=True)["customizedMetadata"]["continuous_batching"] is True


def test_a_short_request_sent_while_six_long_ones_run_finishes_first(endless):
    ts_server = endless
    finished = {}
    started = threading.Barrier(7)

    def long_one(seed):
        with ts_server.predict({**LONG, "max_tokens": 200, "seed": seed}, stream=True, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            started.wait(timeout=60)
            last = json.loads(first)
            for raw in lines:
                if raw:
                    last = json.loads(raw)
        finished[seed] = (time.perf_counter(), last)

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(long_one, seed) for seed in range(6)]
        started.wait(timeout=60)  # all six are generating
        short = ts_server.predict({"prompt": "판교", "max_tokens": 4, "temperature": 0}, timeout=60)
        short_done = time.perf_counter()
        for future in futures:
            future.result()
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
    assert all(last["finish_reason"] == "length" for _, last in finished.values())
    assert short_done < min(at for at, _ in finished.values())


def test_a_client_that_hangs_up_frees_its_slot_and_the_others_finish(endless):
    ts_server, seeds = endless, (11, 12)
    before = jai_counts(ts_server)
    aborted_before = _aborted(ts_server)
    with ThreadPoolExecutor(2) as pool:
        others = [pool.submit(ts_server.stream_lines, {**LONG, "max_tokens": 200, "seed": s}) for s in seeds]
        partial = ts_server.stream_lines({**LONG, "max_tokens": 240, "seed": 13}, until=2)
        assert len(partial) == 2
        wait_for(lambda: _aborted(ts_server) == aborted_before + 1, what="the aborted counter")
        results = [f.result() for f in others]
    assert all(lines[-1]["finish_reason"] == "length" for lines in results)
    assert all(lines[-1]["usage"]["completion_tokens"] == 200 for lines in results)
    logged = wait_for(lambda: re.findall(r"generated_tokens=(\d+) finish_reason=aborted", ts_server.log(lines=400)),
                      what="the request's log line")
    assert int(logged[-1]) < 240  # it left the engine long before max_tokens
    wait_for(lambda: jai_counts(ts_server)["active"] == 0, what="the active-requests gauge to drop")
    assert jai_counts(ts_server)["generated"] >= before["generated"] + 400 + 2


def _aborted(server) -> float:
    text = requests.get(f"{server.metrics}/metrics", timeout=30).text
    return sum(
        float(v) for labels, v in re.findall(r"^jai_requests_finished_total\{([^}]*)\} (\S+)$", text, re.M)
        if 'FinishReason="aborted"' in labels
    )


def test_a_request_that_finishes_on_its_first_step_gets_a_plain_response(ts_server):
    response = ts_server.predict({"prompt": "대전", "max_tokens": 1, "temperature": 0}, timeout=60)
    assert response.status_code == 200 and response.headers.get("transfer-encoding") != "chunked"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.json()["usage"]["completion_tokens"] == 1
    streamed = ts_server.predict({"prompt": "대전", "max_tokens": 1, "temperature": 0, "stream": True}, timeout=60)
    [line] = [json.loads(raw) for raw in streamed.text.splitlines()]
    assert line["generated"] == response.json()["generated"] and line["finish_reason"] == "length"


def test_generated_tokens_are_counted_while_a_request_runs(endless):
    ts_server, seed = endless, 21
    before = jai_counts(ts_server)["generated"]
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(jai_counts(ts_server)["generated"] - before)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        lines = ts_server.stream_lines({**LONG, "max_tokens": 240, "seed": seed})
    finally:
        done.set()
        watcher.join()
    total = lines[-1]["usage"]["completion_tokens"]
    assert total == 240
    assert any(0 < n < total for n in seen), sorted(seen)  # counted step by step, not at the end
