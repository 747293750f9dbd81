"""The OpenAI-compatible API end to end: the real `openai` SDK against a real torchserve serving the demo
model, directly (base_url .../predictions/jai/1.0/v1) and through the shipped nginx site (base_url .../v1;
the front_door fixture, tests/conftest.py)."""

import json
import re
import time

import openai
import pytest
import requests

pytestmark = pytest.mark.e2e

QUESTION = "판교에서 백엔드 개발자 채용하는 곳 알려줘"
GREEDY = {"max_tokens": 24, "temperature": 0}


def sdk(base_url, server):
    return openai.OpenAI(base_url=base_url, api_key=server.key(), max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(ts_server):
    return sdk(f"{ts_server.inference}/predictions/jai/1.0/v1", ts_server)


def native(server, **body):
    response = server.predict(body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


# ----- the SDK, straight to torchserve -----


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["jai"]
    assert client.models.retrieve("jai").owned_by == "jaiserve"
    with pytest.raises(openai.NotFoundError, match="'gpt-4o' does not exist") as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_completion_equals_the_native_answer_plain_and_streamed(client, ts_server):
    expected = native(ts_server, prompt="서울 프론트엔드", **GREEDY)
    answer = client.completions.create(model="jai", prompt="서울 프론트엔드", **GREEDY)
    [choice] = answer.choices
    assert answer.object == "text_completion" and answer.model == "jai"
    assert choice.text == expected["generated"] and choice.finish_reason == expected["finish_reason"]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])
    chunks = list(client.completions.create(model="jai", prompt="서울 프론트엔드", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["generated"]
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert chunks[-2].choices[0].finish_reason == expected["finish_reason"]


def test_chat_equals_the_native_chat_answer_plain_and_streamed(client, ts_server):
    expected = native(ts_server, prompt=QUESTION, mode="chat", **GREEDY)
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model="jai", messages=messages, **GREEDY)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected["generated"]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])
    stream = client.chat.completions.create(model="jai", messages=messages, stream=True, **GREEDY)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == expected["generated"] and not any("\ufffd" in p for p in pieces)
    assert re.search("[가-힣]{2,}", expected["generated"])


def test_n_seed_and_stop(client):
    body = dict(model="jai", prompt="부산 데이터 엔지니어", max_tokens=16, temperature=1.0, seed=11)
    three = client.completions.create(n=3, **body)
    texts = [c.text for c in sorted(three.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) > 1  # seed, seed + 1, seed + 2
    assert [c.text for c in client.completions.create(n=3, **body).choices] == texts  # seeded: repeatable
    assert client.completions.create(**{**body, "seed": 12}).choices[0].text == texts[1]
    plain = client.completions.create(model="jai", prompt="부산 데이터 엔지니어", **GREEDY).choices[0].text
    word = plain.split()[2]  # stop before the third word
    [stopped] = client.completions.create(model="jai", prompt="부산 데이터 엔지니어", stop=word, **GREEDY).choices
    assert stopped.text == plain[: plain.index(word)] and stopped.finish_reason == "stop"


def test_bad_values_raise_bad_request_naming_the_field(client, ts_server):
    with pytest.raises(openai.BadRequestError, match="temperature: must be >= 0") as caught:
        client.completions.create(model="jai", prompt="서울", temperature=-1)
    assert caught.value.param == "temperature" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="logprobs") as caught:
        client.chat.completions.create(model="jai", messages=[{"role": "user", "content": "서울"}], logprobs=True)
    assert caught.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError, match="max_tokens: must be <= 1024"):
        client.completions.create(model="jai", prompt="서울", max_tokens=5000)
    unknown = requests.post(f"{ts_server.inference}/predictions/jai/1.0/v1/embeddings", json={"input": "a"},
                            headers=ts_server.headers(), timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"
    # TorchServe does not tell the handler the method: a GET of completions is an empty body
    get = requests.get(f"{ts_server.inference}/predictions/jai/1.0/v1/completions", headers=ts_server.headers(),
                       timeout=30)
    assert get.status_code == 400 and get.json()["error"]["param"] == "body"
    wrong_version = requests.get(f"{ts_server.inference}/predictions/jai/2.0/v1/models", headers=ts_server.headers(),
                                 timeout=30)
    assert wrong_version.status_code == 404  # TorchServe's own: the version must be the archive's


def test_a_stream_read_line_by_line_arrives_spread_over_time(ts_server):
    body = {"model": "jai", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0.5, "top_k": 3,
            "seed": 5, "max_tokens": 48}
    url = f"{ts_server.inference}/predictions/jai/1.0/v1/chat/completions"
    sent = time.perf_counter()
    with requests.post(url, json={**body, "stream": True}, headers=ts_server.headers(), stream=True,
                       timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream; charset=utf-8"
        arrivals, lines = [], []
        for line in response.iter_lines():  # bytes: str.splitlines() would also split at U+0085 and friends
            arrivals.append(time.perf_counter() - sent)
            lines.append(line.decode("utf-8"))
    data = [line for line in lines if line]  # events are separated by blank lines
    assert all(line.startswith("data: ") for line in data) and data[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in data[:-1]]
    assert len(events) > 10 and arrivals[0] < 0.75 * arrivals[-1]  # the first event well before the last
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    plain = requests.post(url, json=body, headers=ts_server.headers(), timeout=120).json()
    assert streamed == plain["choices"][0]["message"]["content"]


# ----- the same SDK calls through the shipped nginx site -----


def test_the_sdk_through_nginx_with_a_host_only_base_url(front_door, client, ts_server):
    proxied = sdk(f"{front_door}/v1", ts_server)
    assert [m.id for m in proxied.models.list()] == ["jai"]
    direct = client.completions.create(model="jai", prompt="대전 ML", **GREEDY).choices[0].text
    assert proxied.completions.create(model="jai", prompt="대전 ML", **GREEDY).choices[0].text == direct
    messages = [{"role": "user", "content": QUESTION}]
    plain = proxied.chat.completions.create(model="jai", messages=messages, **GREEDY).choices[0].message.content
    streamed = [c.choices[0].delta.content or "" for c in
                proxied.chat.completions.create(model="jai", messages=messages, stream=True, **GREEDY)]
    assert "".join(streamed) == plain and len([p for p in streamed if p]) > 1
    with pytest.raises(openai.BadRequestError, match="top_p"):
        proxied.chat.completions.create(model="jai", messages=messages, top_p=0)
    unknown = requests.get(f"{front_door}/metrics", headers=ts_server.headers(), timeout=30)
    assert unknown.status_code == 404 and unknown.json()["type"] == "NotFound"  # only the routes it names
