"""End to end: HTTP against a real torchserve serving the demo model (fixture in conftest.py)."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer
from jaiserve.api import CHAT_TEMPLATE
from readme_example import curl_example

pytestmark = pytest.mark.e2e

# the seed's fields, finish_reason and usage, and the checkpoint that answered (docs/updates.md)
FIELDS = {"prompt", "generated", "full_text", "finish_reason", "usage", "model_version"}


def test_generate_answers_the_seed_fields(ts_server):
    response = ts_server.predict({"prompt": "판교 백엔드", "max_tokens": 12, "temperature": 0}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == FIELDS and body["prompt"] == "판교 백엔드"
    assert body["full_text"] == body["prompt"] + body["generated"]
    assert body["usage"]["completion_tokens"] <= 12 and body["usage"]["prompt_tokens"] > 0


def test_the_readmes_curl_gets_the_readmes_answer_byte_for_byte(ts_server):
    """README.md's first example, sent as its curl sends it, to the shipped demo model as `make serve` serves it."""
    body, answer = curl_example()
    response = ts_server.predict(body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.text == answer


def test_chat_answers_in_korean_and_stops_at_the_answer_marker(ts_server):
    question = "서울에서 React 개발자 채용 있어?"
    response = ts_server.predict({"prompt": question, "mode": "chat", "temperature": 0}, timeout=60)
    body = response.json()
    assert response.status_code == 200 and set(body) == FIELDS
    assert body["prompt"] == CHAT_TEMPLATE.format(prompt=question)  # as the seed's /chat echoed it
    assert body["finish_reason"] == "stop" and "[/ANSWER]" not in body["generated"]
    assert "서울" in body["generated"] or "React" in body["generated"]
    assert re.search("[가-힣]{2,}", body["generated"]) and "\ufffd" not in body["generated"]


def test_a_stream_arrives_line_by_line_and_joins_to_the_plain_answer(ts_server):
    body = {"prompt": "판교에서 백엔드 개발자 채용하는 곳 알려줘", "mode": "chat", "temperature": 0.5, "top_k": 3, "seed": 5}
    sent = time.perf_counter()
    with ts_server.predict({**body, "stream": True}, stream=True, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        arrivals, lines = [], []
        for line in response.iter_lines():
            arrivals.append(time.perf_counter() - sent)
            lines.append(json.loads(line))
    last = lines[-1]
    assert len(lines) > 10 and arrivals[0] < 0.75 * arrivals[-1]  # the first line well before the last
    assert set(FIELDS) <= set(last) and last["finish_reason"] == "stop"
    assert not any("\ufffd" in line["text"] for line in lines)  # no syllable split across lines
    assert "".join(line["text"] for line in lines) == last["generated"]
    assert sum(len(line["token_ids"]) for line in lines) == last["usage"]["completion_tokens"]
    plain = ts_server.predict(body, timeout=60).json()  # the same seed, not streamed
    assert plain["generated"] == last["generated"]


def test_concurrent_greedy_requests_each_get_their_own_answer(ts_server, demo_build):
    prompts = ["서울 프론트엔드", "부산 데이터 엔지니어", "대전 ML", "제주 원격 iOS",
               "판교 Go 백엔드", "[QUESTION]\n연봉", "신입 채용", "경력 5년 Java"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(
            lambda p: ts_server.predict({"prompt": p, "max_tokens": 40, "temperature": 0}, timeout=120).json(),
            prompts,
        ))
    tokenizer = load_tokenizer(demo_build.tokenizer)
    engine = Engine(load_model(demo_build.checkpoint), tokenizer)
    for prompt, answer in zip(prompts, answers):
        [alone] = engine.generate([engine.encode(prompt)], [SamplingParams(max_tokens=40, temperature=0)])
        assert answer["generated"] == alone.text
        assert answer["finish_reason"] == alone.finish_reason


BAD_BODIES = [
    ("{oops", "body: is not valid JSON"),
    ('"just a string"', "body: must be a JSON object, got str"),
    ('{"max_tokens": 5}', "prompt: is required"),
    ('{"prompt": ""}', "prompt: must not be empty"),
    ('{"prompt": ["a"]}', "prompt: must be a string, got list"),
    ('{"prompt": "a", "max_tokens": true}', "max_tokens: must be an integer, got True"),
    ('{"prompt": "a", "max_tokens": 999999}', "max_tokens: must be <= 1024, got 999999"),
    ('{"prompt": "a", "temperature": NaN}', "temperature: must be a finite number, got nan"),
    ('{"prompt": "a", "temperature": -1}', "temperature: must be >= 0, got -1"),
    ('{"prompt": "a", "top_k": 0}', "top_k: must be >= 1, got 0"),
    ('{"prompt": "a", "top_p": 0}', "top_p: must be in (0, 1], got 0"),
    ('{"prompt": "a", "mode": "poem"}', "mode: must be one of generate, chat, got 'poem'"),
    ('{"prompt": "' + "a" * 40000 + '"}', "prompt: is 40000 characters, longer than the limit of 32768"),
    ('{"prompt": "' + "".join(chr(0xAC00 + i * 7 % 11172) for i in range(3000)) + '"}', "prompt: is "),
]


def test_bad_input_gets_a_400_while_a_request_in_flight_succeeds(ts_server):
    pid = ts_server.ready_workers()[0]["pid"]
    result = {}

    def long_request():
        result["response"] = ts_server.predict(
            {"prompt": "서울", "max_tokens": 200, "temperature": 0.8, "seed": 1, "stream": True}, timeout=120
        )

    runner = threading.Thread(target=long_request)
    runner.start()
    for raw, message in BAD_BODIES:
        response = requests.post(
            f"{ts_server.inference}/predictions/jai", data=raw.encode(), timeout=30,
            headers={**ts_server.headers(), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, raw
        error = response.json()
        assert error["code"] == 400 and error["type"] == "InvalidRequest"
        assert error["message"].startswith(message), error["message"]
    runner.join()
    lines = [json.loads(line) for line in result["response"].text.splitlines()]
    assert result["response"].status_code == 200 and lines[-1]["usage"]["completion_tokens"] > 0
    assert ts_server.ready_workers()[0]["pid"] == pid


def test_a_request_without_a_token_is_refused(ts_server):
    response = requests.post(f"{ts_server.inference}/predictions/jai", json={"prompt": "a"}, timeout=30)
    assert response.status_code == 401 and "Token Authorization failed" in response.text
    wrong = requests.post(f"{ts_server.inference}/predictions/jai", json={"prompt": "a"}, timeout=30,
                          headers={"Authorization": "Bearer not-the-key"})
    assert wrong.status_code == 401


def test_describe_shows_the_handler_description(ts_server, demo_build):
    response = requests.get(f"{ts_server.management}/models/jai?customized=true",
                            headers=ts_server.headers("management"), timeout=30)
    described = response.json()[0]["customizedMetadata"]
    assert described["device"] == "cpu" and described["dtype"] == "float32"
    model = load_model(demo_build.checkpoint)
    assert described["parameters"] == model.num_parameters()
    assert described["vocab_size"] == model.config.vocab_size and described["block_size"] == 256
    assert len(described["checkpoint_sha256"]) == 64


def test_scaling_workers_through_the_management_api(ts_server):
    def scale(n):
        response = requests.put(
            f"{ts_server.management}/models/jai?min_worker={n}&max_worker={n}&synchronous=true",
            headers=ts_server.headers("management"), timeout=180,
        )
        assert response.status_code == 200, response.text

    scale(2)
    assert len(ts_server.ready_workers()) == 2
    assert ts_server.predict({"prompt": "서울", "max_tokens": 3}, timeout=60).status_code == 200
    scale(1)
    workers = ts_server.describe()["workers"]
    assert len(workers) == 1 and workers[0]["status"] == "READY"


def test_prometheus_metrics_count_requests_for_jai(ts_server):
    def served():
        text = requests.get(f"{ts_server.metrics}/metrics", timeout=30).text
        counts = re.findall(r'^ts_inference_requests_total\{[^}]*model_name="jai"[^}]*\} (\S+)', text, re.M)
        return sum(float(c) for c in counts)

    before = served()
    for _ in range(3):
        assert ts_server.predict({"prompt": "부산", "max_tokens": 2}, timeout=60).status_code == 200
    assert served() == before + 3
