"""The TorchServe handler driven with a small fake context, no server (like pytorch/serve's unit tests)."""

import json
import shutil
import threading
from typing import NamedTuple

import pytest
from ts.context import Context, RequestProcessor

import jai_handler
from jaiserve import Engine, SamplingParams, file_sha256, load_model, load_tokenizer
from jaiserve.api import CHAT_TEMPLATE

YAML = {
    "continuousBatching": True,
    "batchSize": 4,
    "handler": {
        "n_head": 2,
        "threads": 1,
        "step_budget_ms": 0,  # one engine step per handle() call, unless a test sets a budget
        "defaults": {"max_tokens": 12, "temperature": 0.8, "top_k": 50},
    },
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def make_handler(model_dir, **yaml_changes):
    context = Context("jai", str(model_dir), {}, 4, None, "0.12.0", model_yaml_config={**YAML, **yaml_changes})
    handler = jai_handler.JAIHandler()
    handler.initialize(context)
    return handler, context


def call(handler, context, batch, monkeypatch=None):
    """One handle() call. ``batch`` is [(request_id, body or None for a running request)].

    Each reply has the intermediate responses sent during the call (``chunks``), then the returned one.
    """
    context.request_ids = {i: rid for i, (rid, _) in enumerate(batch)}
    context.request_processor = [RequestProcessor(headers(b)) for _, b in batch]
    context.stopping_criteria = None
    batch = [(rid, b.body if isinstance(b, At) else b) for rid, b in batch]
    data = [body if isinstance(body, Form) else {"body": body} if body not in (None, DESCRIBE) else {}
            for _, body in batch]
    sent = []

    def record(ret, req_id_map, message, code, ctx):
        assert message == jai_handler.INTERMEDIATE and code == 200 and set(ret) == set(req_id_map)
        sent.append({req_id_map[idx]: ret[idx] for idx in ret})

    original, jai_handler.send_intermediate_predict_response = jai_handler.send_intermediate_predict_response, record
    try:
        responses = handler.handle(data, context)
    finally:
        jai_handler.send_intermediate_predict_response = original
    assert len(responses) == len(batch)
    replies = {}
    for i, (rid, _) in enumerate(batch):
        done = context.stopping_criteria[i](responses[i]) if context.stopping_criteria else None
        replies[rid] = dict(
            body=responses[i],
            chunks=[message[rid] for message in sent if rid in message],
            status=context.get_response_status(i)[0],
            content_type=context.get_response_content_type(i),
            done=done,
        )
    return replies


def drive(handler, context, new, max_steps=100):
    """Send ``new`` requests, then keep stepping the running ones; collect each request's replies."""
    log = {rid: [] for rid, _ in new}
    batch = list(new)
    for _ in range(max_steps):
        if not batch:
            return log
        replies = call(handler, context, batch)
        for rid, reply in replies.items():
            log[rid].append(reply)
        batch = [(rid, None) for rid, r in replies.items() if r["done"] is False]
    raise AssertionError("requests did not finish")


@pytest.fixture(scope="module")
def handler(model_dir):
    return make_handler(model_dir)


def test_describe_handle_reports_the_model(handler, tiny_ckpt):
    handler_obj, _ = handler
    described = json.loads(handler_obj.describe_handle())
    assert described["device"] == "cpu" and described["dtype"] == "float32"
    assert described["vocab_size"] == 512 and described["block_size"] == 32
    assert described["parameters"] == load_model(tiny_ckpt[0], n_head=2).num_parameters()
    assert len(described["checkpoint_sha256"]) == 64 and described["max_batch"] == 4
    assert described["linear_kernels"] == "onednn"  # model-config.yaml's default cpu_linear


def test_generate_and_chat_answer_the_seed_fields(handler, model_dir):
    h, context = handler
    log = drive(h, context, [
        ("g", json.dumps({"prompt": "서울 채용", "max_tokens": 6, "temperature": 0}).encode()),
        ("c", {"prompt": "판교 백엔드?", "mode": "chat", "max_tokens": 5, "top_k": 1}),
    ])
    engine = Engine(load_model(model_dir / "ckpt.pt", n_head=2), load_tokenizer(model_dir / "tokenizer.json"))
    for rid, prompt in (("g", "서울 채용"), ("c", CHAT_TEMPLATE.format(prompt="판교 백엔드?"))):
        replies = log[rid]
        assert all(r["status"] == 200 and r["content_type"] == "application/json" for r in replies)
        assert [r["body"] for r in replies[:-1]] == [""] * (len(replies) - 1)  # nothing until done
        assert replies[-1]["done"] is True
        body = json.loads(replies[-1]["body"])
        assert set(body) == {"prompt", "generated", "full_text", "finish_reason", "usage", "model_version"}
        assert body["model_version"] == file_sha256(model_dir / "ckpt.pt")[:12]  # the checkpoint that answered
        assert body["prompt"] == prompt and body["full_text"] == prompt + body["generated"]
        expected = engine.generate(
            [engine.encode(prompt)],
            [SamplingParams(max_tokens=len(replies), temperature=0, stop=("[/ANSWER]",) * (rid == "c"))],
        )[0]
        assert body["generated"] == expected.text
        assert body["usage"] == {"prompt_tokens": len(engine.encode(prompt)), "completion_tokens": len(replies)}
        assert body["finish_reason"] == "length"


def test_stream_lines_join_to_the_generated_text(handler):
    h, context = handler
    log = drive(h, context, [("s", {"prompt": "부산 데이터", "stream": True, "max_tokens": 10, "seed": 3})])
    replies = log["s"]
    assert all(r["content_type"] == "application/x-ndjson" for r in replies)
    lines = [json.loads(line) for r in replies for line in r["body"].splitlines()]
    assert len(lines) > 2 and "finish_reason" in lines[-1]
    assert "".join(line["text"] for line in lines) == lines[-1]["generated"]
    assert sum(len(line["token_ids"]) for line in lines) == lines[-1]["usage"]["completion_tokens"] == 10
    again = drive(h, context, [("s2", {"prompt": "부산 데이터", "max_tokens": 10, "seed": 3})])
    assert json.loads(again["s2"][-1]["body"])["generated"] == lines[-1]["generated"]


class At(NamedTuple):
    """A body sent to /predictions/jai/1.0/<path>: TorchServe hands the handler ``path`` as url_path."""

    path: str
    body: object


class Form(dict):
    """What TorchServe passes for a form-encoded body: its fields, no "body"."""


DESCRIBE = "GET /models/jai?customized=true"  # a batch entry TorchServe marks with its describe header


def headers(entry) -> dict:
    """The request headers TorchServe gives the handler for a batch entry of ``call``."""
    if entry is DESCRIBE:
        return {"describe": "True"}
    return {"url_path": entry.path} if isinstance(entry, At) else {}


BAD = [
    (Form({'{"prompt": "a"}': ""}), "body: must be JSON sent with 'Content-Type: application/json'"),
    (b"{not json", "body: is not valid JSON"),
    (b"[1, 2]", "body: must be a JSON object, got list"),
    ("a string", "body: must be a JSON object, got str"),
    (b"", "body: is empty"),
    (b"\xff\xfe", "body: is not UTF-8 text"),
    ({}, "prompt: is required"),
    ({"prompt": ""}, "prompt: must not be empty"),
    ({"prompt": 5}, "prompt: must be a string, got int"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens: must be an integer, got True"),
    ({"prompt": "a", "max_tokens": 5000}, "max_tokens: must be <= 1024, got 5000"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature: must be a finite number, got nan"),
    ({"prompt": "a", "top_k": 0}, "top_k: must be >= 1, got 0"),
    ({"prompt": "a", "top_p": 2}, "top_p: must be in (0, 1], got 2"),
    ({"prompt": "a", "mode": "poem"}, "mode: must be one of generate, chat, got 'poem'"),
    ({"prompt": "a", "stream": "yes"}, "stream: must be true or false, got 'yes'"),
    ({"prompt": "a", "stop": 3}, "stop: must be a string or a list of strings, got 3"),
    ({"prompt": "a", "max_token": 3}, "max_token: is not a known field"),
    ({"prompt": "가" * 2100}, "prompt: is 4200 tokens, longer than the limit of 2048"),  # 2 tokens each
    ({"prompt": "a" * 40000}, "prompt: is 40000 characters, longer than the limit of 32768"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_input_is_a_400_for_that_request_alone(handler, body, message):
    h, context = handler
    replies = call(h, context, [("bad", body), ("good", {"prompt": "대전", "max_tokens": 1})])
    bad = replies["bad"]
    assert bad["status"] == 400 and bad["content_type"] == "application/json" and bad["done"] is None
    error = json.loads(bad["body"])
    assert error["code"] == 400 and error["type"] == "InvalidRequest"
    assert error["message"].startswith(message), error["message"]
    good = replies["good"]
    assert good["status"] == 200 and json.loads(good["body"])["usage"]["completion_tokens"] == 1
    assert good["done"] is None  # finished in its first step: a complete (not chunked) response


def test_disconnected_request_frees_its_slot(handler):
    h, context = handler
    call(h, context, [("gone", {"prompt": "제주", "max_tokens": 50}), ("stays", {"prompt": "원격", "max_tokens": 3})])
    assert h.engine.running == 2
    call(h, context, [("stays", None)])  # "gone" is no longer in TorchServe's batch
    assert h.engine.running == 1 and "gone" not in h.running
    drive(h, context, [])
    call(h, context, [("stays", None)])
    assert h.engine.running == 0 and not h.running


def test_an_empty_batch_frees_every_request_its_clients_left(handler):
    """The patch agent's fix 6: when hung-up clients emptied TorchServe's batch, it sends one empty batch."""
    h, context = handler
    call(h, context, [("left", {"prompt": "제주", "max_tokens": 50, "stream": True}),
                      ("also", {"prompt": "원격", "max_tokens": 50})])
    assert h.engine.running == 2
    assert call(h, context, []) == {}  # no reply to give, and no step for nobody
    assert h.engine.running == 0 and not h.running and not h.calls and not h.engine.has_work()


def test_engine_failure_is_a_500_and_the_next_request_works(model_dir, monkeypatch):
    h, context = make_handler(model_dir)
    monkeypatch.setattr(h.engine, "step", lambda: 1 / 0)
    replies = call(h, context, [("x", {"prompt": "서울"})])
    assert replies["x"]["status"] == 500 and json.loads(replies["x"]["body"])["code"] == 500
    monkeypatch.undo()
    assert not h.engine.has_work() and not h.running
    log = drive(h, context, [("y", {"prompt": "서울", "max_tokens": 2})])
    assert json.loads(log["y"][-1]["body"])["usage"]["completion_tokens"] == 2


def test_default_batcher_leaves_no_criteria_of_a_failed_batch_behind(model_dir, monkeypatch):
    """TorchServe keeps one context for every call: the stream criteria a failed batch set must not
    answer the next batch (one with more requests would index past them)."""
    h, context = make_handler(model_dir, continuousBatching=False)
    monkeypatch.setattr(h.engine, "step", lambda: 1 / 0)
    assert call(h, context, [("x", {"prompt": "서울"})])["x"]["status"] == 500
    monkeypatch.undo()
    assert context.stopping_criteria is not None  # what the failure answered with
    context.request_ids = {0: "y", 1: "z"}  # the next call, without call()'s reset of the criteria
    context.request_processor = [RequestProcessor({}), RequestProcessor({})]
    bodies = h.handle([{"body": {"prompt": p, "max_tokens": 2}} for p in ("서울", "부산")], context)
    assert [json.loads(b)["usage"]["completion_tokens"] for b in bodies] == [2, 2]
    assert context.stopping_criteria is None


def test_default_batcher_runs_the_batch_to_completion_and_streams(model_dir):
    h, context = make_handler(model_dir, continuousBatching=False)
    replies = call(h, context, [
        ("s", {"prompt": "서울", "stream": True, "max_tokens": 8, "seed": 1}),
        ("j", {"prompt": "판교", "max_tokens": 4, "temperature": 0}),
        ("b", {"prompt": ""}),
    ])
    assert replies["b"]["status"] == 400 and not replies["b"]["chunks"]
    assert json.loads(replies["j"]["body"])["usage"]["completion_tokens"] == 4 and not replies["j"]["chunks"]
    streamed = [json.loads(line) for c in replies["s"]["chunks"] for line in c.splitlines()]
    final = json.loads(replies["s"]["body"])
    assert len(streamed) >= 2 and context.stopping_criteria is None
    assert "".join(s["text"] for s in streamed) + final["text"] == final["generated"]


def multi_step_handler(model_dir):
    return make_handler(model_dir, handler={**YAML["handler"], "step_budget_ms": 60_000})


def test_a_call_streams_several_steps_and_returns_when_a_request_finishes(model_dir):
    h, context = multi_step_handler(model_dir)
    replies = call(h, context, [
        ("long", {"prompt": "서울", "stream": True, "max_tokens": 30, "temperature": 0}),
        ("short", {"prompt": "판교", "max_tokens": 6, "temperature": 0}),
    ])
    short, long = replies["short"], replies["long"]
    # "short" finished on the call's 6th step: the call returns then, with its complete (never chunked) body
    assert short["done"] is None and not short["chunks"]
    assert json.loads(short["body"])["usage"]["completion_tokens"] == 6
    # "long" streamed the lines of steps 1-5 as intermediate responses and continues
    assert long["done"] is False and 1 <= len(long["chunks"]) <= 5
    lines = [json.loads(line) for body in long["chunks"] + [long["body"]] for line in body.splitlines()]
    assert sum(len(line["token_ids"]) for line in lines) <= 6
    log = drive(h, context, [("long", None)])
    rest = [json.loads(line) for r in log["long"] for body in r["chunks"] + [r["body"]] for line in body.splitlines()]
    assert len(log["long"]) == 1 and log["long"][-1]["done"] is True  # once chunked, the stream is ended
    final = rest[-1]
    assert final["usage"]["completion_tokens"] == 30
    assert "".join(line["text"] for line in lines + rest) == final["generated"]
    expected = h.engine.generate([h.engine.encode("서울")], [SamplingParams(max_tokens=30, temperature=0)])[0]
    assert final["generated"] == expected.text


def test_the_step_budget_bounds_a_call(model_dir, monkeypatch):
    h, context = make_handler(model_dir, handler={**YAML["handler"], "step_budget_ms": 5})
    clock = iter(range(0, 10_000, 2))  # each perf_counter() call: +2 ms
    monkeypatch.setattr(jai_handler.time, "perf_counter", lambda: next(clock) / 1000)
    replies = call(h, context, [("r", {"prompt": "부산", "stream": True, "max_tokens": 50, "temperature": 0})])
    assert replies["r"]["done"] is False and h.running["r"].generated < 50  # back to TorchServe early
    monkeypatch.undo()
    drive(h, context, [("r", None)])
    assert not h.running


def test_unknown_handler_setting_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown key"):
        make_handler(model_dir, handler={"n_heads": 2})


def test_describe_request_returns_the_description(handler):
    h, context = handler
    context.request_ids = {0: "describe-1"}
    context.request_processor = [RequestProcessor({"describe": "True"})]
    [described] = h.handle([{}], context)
    assert json.loads(described)["block_size"] == 32 and not h.running


def test_a_describe_beside_running_requests_is_answered_and_they_go_on(handler):
    """Continuous batching: our frontend patch lets a describe join the running batch (it used to wait
    for every running request to end); it gets a complete answer, the streams their next lines."""
    h, context = handler
    long = {"prompt": "서울", "stream": True, "max_tokens": 12, "temperature": 0}
    first = call(h, context, [("a", long), ("b", long)])
    assert first["a"]["done"] is False and first["b"]["done"] is False
    generated = {rid: h.running[rid].generated for rid in "ab"}
    replies = call(h, context, [("a", None), ("d", DESCRIBE), ("b", None)])
    described = replies["d"]
    assert described["status"] == 200 and described["done"] is None and described["chunks"] == []
    assert described["content_type"] == "application/json"
    assert json.loads(described["body"])["running_requests"] == 2
    for rid in "ab":  # this call stepped them as if the describe were not there
        assert replies[rid]["done"] is False and h.running[rid].generated == generated[rid] + 1
    finished = drive(h, context, [("a", None), ("b", None)])
    assert all(json.loads(log[-1]["body"].splitlines()[-1])["finish_reason"] == "length" for log in finished.values())
    assert not h.running and not h.calls


# ----- the OpenAI view (url_path v1/...) through the same handler and engine -----


def sse(text):
    return [b.removeprefix("data: ") for b in text.split("\n\n") if b]


def test_openai_models_and_unknown_paths_are_answered_at_once(handler):
    h, context = handler
    replies = call(h, context, [
        ("m", At("v1/models", b"")),
        ("x", At("v1/embeddings", {"model": "jai", "input": "a"})),
        ("p", At("explain", {"prompt": "a"})),
        ("g", {"prompt": "대전", "max_tokens": 1}),
    ])
    assert replies["m"]["status"] == 200 and replies["m"]["done"] is None
    assert json.loads(replies["m"]["body"])["data"][0]["id"] == "jai"
    assert replies["x"]["status"] == 404 and json.loads(replies["x"]["body"])["error"]["param"] is None
    assert replies["p"]["status"] == 404 and json.loads(replies["p"]["body"])["type"] == "NotFound"
    assert replies["g"]["status"] == 200 and not h.calls and not h.running


def test_the_seed_paths_generate_chat_and_health(handler):
    """What the front door on :8000 passes on: /generate, /chat (chat mode) and /health (the seed's body)."""
    h, context = handler
    body = {"prompt": "판교 백엔드", "max_tokens": 6, "temperature": 0}
    log = drive(h, context, [
        ("native", {**body, "mode": "chat"}), ("chat", At("chat", body)), ("gen", At("generate", body)),
        ("plain", body), ("health", At("health", b"")), ("mixed", At("chat", {**body, "mode": "generate"})),
    ])
    replies = {name: entries[-1] for name, entries in log.items()}
    answers = {name: json.loads(replies[name]["body"]) for name in ("native", "chat", "gen", "plain")}
    assert answers["chat"] == answers["native"] and answers["chat"]["prompt"].startswith("[QUESTION]\n판교 백엔드")
    assert answers["gen"] == answers["plain"] and answers["gen"]["prompt"] == "판교 백엔드"
    assert {"prompt", "generated", "full_text"} <= set(answers["chat"])
    assert json.loads(replies["health"]["body"]) == {"status": "healthy", "model_loaded": True, "device": "cpu"}
    assert replies["mixed"]["status"] == 400
    assert json.loads(replies["mixed"]["body"])["message"] == "mode: is 'chat' on /chat (leave it out), got 'generate'"


def test_openai_n_fans_out_into_the_same_batch_and_joins_in_one_answer(handler):
    h, context = handler
    body = {"model": "jai", "prompt": "서울 채용", "n": 3, "max_tokens": 5, "seed": 7, "temperature": 1.0}
    call(h, context, [("n3", At("v1/completions", body))])
    assert sorted(h.running) == ["n3/0", "n3/1", "n3/2"] and h.engine.running == 3
    log = drive(h, context, [("n3", None)])
    answer = json.loads(log["n3"][-1]["body"])
    assert log["n3"][-1]["content_type"] == "application/json" and not h.running and not h.calls
    engine = h.engine
    for j, choice in enumerate(answer["choices"]):
        params = SamplingParams(max_tokens=5, temperature=1.0, seed=7 + j)
        [alone] = engine.generate([engine.encode("서울 채용")], [params])
        assert choice["index"] == j and choice["text"] == alone.text
    assert answer["usage"] == {"prompt_tokens": len(engine.encode("서울 채용")), "completion_tokens": 15,
                               "total_tokens": len(engine.encode("서울 채용")) + 15}


def test_openai_chat_streams_server_sent_events_with_the_default_batcher(model_dir):
    h, context = make_handler(model_dir, continuousBatching=False)
    body = {"model": "jai", "messages": [{"role": "user", "content": "판교 백엔드?"}], "max_tokens": 6,
            "temperature": 0}
    replies = call(h, context, [
        ("s", At("v1/chat/completions", {**body, "stream": True})),
        ("p", At("v1/chat/completions", body)),
        ("native", {"prompt": "판교 백엔드?", "mode": "chat", "max_tokens": 6, "temperature": 0}),
    ])
    stream = replies["s"]
    assert stream["content_type"] == "text/event-stream; charset=utf-8" and stream["body"].endswith("data: [DONE]\n\n")
    events = [json.loads(e) for c in stream["chunks"] + [stream["body"]] for e in sse(c) if e != "[DONE]"]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    plain = json.loads(replies["p"]["body"])
    native = json.loads(replies["native"]["body"])
    assert text == plain["choices"][0]["message"]["content"] == native["generated"]
    assert plain["usage"]["completion_tokens"] == native["usage"]["completion_tokens"] == 6


def test_openai_refusals_name_the_parameter_and_withdraw_the_whole_call(handler):
    h, context = handler
    replies = call(h, context, [
        ("limit", At("v1/completions", {"model": "jai", "prompt": "a", "max_tokens": 5000})),
        ("long", At("v1/completions", {"model": "jai", "prompt": ["서울", "가" * 2100], "max_tokens": 2})),
        ("tools", At("v1/chat/completions", {"model": "jai", "messages": [{"role": "user", "content": "a"}],
                                             "tools": [{"type": "function"}]})),
        ("good", {"prompt": "대전", "max_tokens": 1}),
    ])
    errors = {rid: json.loads(replies[rid]["body"])["error"] for rid in ("limit", "long", "tools")}
    assert all(replies[rid]["status"] == 400 for rid in errors)
    assert errors["limit"]["param"] == "max_tokens" and "must be <= 1024" in errors["limit"]["message"]
    assert errors["long"]["param"] == "prompt" and "tokens, longer than the limit" in errors["long"]["message"]
    assert errors["tools"]["param"] == "tools"
    assert replies["good"]["status"] == 200 and not h.running and not h.engine.has_work()


def test_a_disconnected_fan_out_frees_every_slot(handler):
    h, context = handler
    call(h, context, [("gone", At("v1/completions", {"model": "jai", "prompt": "제주", "n": 2, "max_tokens": 50}))])
    assert h.engine.running == 2
    replies = call(h, context, [("next", {"prompt": "원격", "max_tokens": 1})])  # "gone" is no longer in the batch
    assert replies["next"]["status"] == 200 and h.engine.running == 0 and not h.running and not h.calls


def test_an_engine_failure_ends_an_openai_stream_with_an_error_event(model_dir, monkeypatch):
    h, context = make_handler(model_dir)
    body = {"model": "jai", "messages": [{"role": "user", "content": "서울"}], "max_tokens": 20, "stream": True}
    first = call(h, context, [("s", At("v1/chat/completions", body))])["s"]
    assert first["done"] is False
    monkeypatch.setattr(h.engine, "step", lambda: 1 / 0)
    replies = call(h, context, [("s", None), ("new", At("v1/completions", {"model": "jai", "prompt": "a"}))])
    event, done = sse(replies["s"]["body"])
    assert replies["s"]["done"] is True and json.loads(event)["error"]["type"] == "server_error"
    assert done == "[DONE]"  # the SDKs raise their API error on the event
    assert replies["new"]["status"] == 500 and replies["new"]["done"] is None
    assert json.loads(replies["new"]["body"])["error"]["type"] == "server_error"
    assert not h.calls and not h.running and not h.engine.has_work()


def counting_steps(h, monkeypatch, fail_on=None):
    """Wrap the engine's step: record the thread of every step; the ``fail_on``-th one raises."""
    threads, real = [], h.engine.step

    def step(**kwargs):
        threads.append(threading.current_thread().name)
        if len(threads) == fail_on:
            raise RuntimeError("step failed")
        return real(**kwargs)

    monkeypatch.setattr(h.engine, "step", step)
    return threads


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_step_runs_ahead_on_the_engine_thread_and_no_token_is_lost(model_dir, monkeypatch, ahead):
    h, context = make_handler(model_dir, handler={**YAML["handler"], "step_ahead": ahead})
    threads = counting_steps(h, monkeypatch)
    log = drive(h, context, [("r", {"prompt": "서울", "stream": True, "max_tokens": 8, "temperature": 0})])
    lines = [json.loads(line) for r in log["r"] for body in r["chunks"] + [r["body"]] for line in body.splitlines()]
    # budget 0: each call hands out one step's token, whether that step ran in the call or ahead of it
    assert len(log["r"]) == 8 and sum(len(line.get("token_ids", ())) for line in lines) == 8
    assert set(threads) == {"jai-engine_0"} and len(threads) == 8  # torch's threads belong to one thread
    expected = h.engine.generate([h.engine.encode("서울")], [SamplingParams(max_tokens=8, temperature=0)])[0]
    assert lines[-1]["generated"] == expected.text
    assert json.loads(h.describe_handle())["step_ahead"] is ahead and h.ahead is None


def test_a_step_ahead_between_calls_leaves_the_tokens_for_the_next_call(model_dir, monkeypatch):
    h, context = make_handler(model_dir)
    threads = counting_steps(h, monkeypatch)
    call(h, context, [("r", {"prompt": "서울", "max_tokens": 5, "temperature": 0})])
    assert h.ahead is not None and h.ahead.result() and len(threads) == 2  # step 2 ran after the call returned
    assert h.running["r"].generated == 1  # but its token is handed out by the next call only
    call(h, context, [("r", None)])
    assert h.running["r"].generated == 2 and h.ahead.result() and len(threads) == 3


def test_a_step_ahead_that_fails_is_a_500_for_the_next_batch_and_the_worker_goes_on(model_dir, monkeypatch):
    h, context = make_handler(model_dir)
    counting_steps(h, monkeypatch, fail_on=2)  # the step run ahead after the first call
    first = call(h, context, [("s", {"prompt": "서울", "stream": True, "max_tokens": 9})])["s"]
    assert first["done"] is False
    replies = call(h, context, [("s", None), ("new", {"prompt": "부산"})])
    assert replies["s"]["status"] == 500 and replies["s"]["done"] is True  # its stream ends with the error
    assert replies["new"]["status"] == 500 and replies["new"]["done"] is None
    assert not h.calls and not h.running and not h.engine.has_work() and h.ahead is None
    log = drive(h, context, [("y", {"prompt": "서울", "max_tokens": 2})])
    assert json.loads(log["y"][-1]["body"])["usage"]["completion_tokens"] == 2


def watch_updates(handler, tmp_path):
    """The handler follows tmp_path/server, the folder scripts/update.py writes (jaiserve/updates.py)."""
    from jaiserve.updates import UpdateState

    handler.updates = UpdateState(tmp_path / "server", pid=1)
    (tmp_path / "server").mkdir()


def checkpoint_folder(model_dir, folder, seed):
    """A retrained tiny model: a checkpoint of its own seed, the same tokenizer."""
    from conftest import TINY, seed_checkpoint

    folder.mkdir()
    seed_checkpoint(folder / "ckpt.pt", seed=seed, **TINY)
    shutil.copy(model_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


def name_update(handler, tmp_path, folder):
    """What scripts/update.py does: name ``folder``; the handler starts loading it. Returns the load."""
    (tmp_path / "server" / "model").write_text(f"{folder}\n")
    handler._follow_updates()
    return handler.loading[1]


def test_a_new_version_takes_new_requests_while_running_ones_finish_on_theirs(model_dir, tmp_path):
    """jaiserve/updates.py without a server: the folder scripts/update.py names is loaded on the loader
    thread; from the next call new requests go to it, a running one ends on its version, which retires."""
    h, context = make_handler(model_dir)
    watch_updates(h, tmp_path)
    old = h.current.name
    call(h, context, [("before", {"prompt": "제주", "max_tokens": 12, "temperature": 0})])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.pt").write_bytes(b"not a checkpoint")
    name_update(h, tmp_path, bad).exception(timeout=60)  # done (it failed)
    call(h, context, [("before", None)])
    assert h.current.name == old and (tmp_path / "server" / "version.1").read_text().startswith(f"failed {bad}: ")
    new = checkpoint_folder(model_dir, tmp_path / "new", seed=5)
    name_update(h, tmp_path, new).result(timeout=60)
    replies = call(h, context, [("before", None), ("after", {"prompt": "제주", "max_tokens": 1, "temperature": 0})])
    assert h.current.name == file_sha256(new / "ckpt.pt")[:12] != old
    assert (tmp_path / "server" / "version.1").read_text() == f"{h.current.name} {new}\n"
    assert json.loads(replies["after"]["body"])["model_version"] == h.current.name
    assert set(h.versions) == {old, h.current.name}  # the old one still runs "before"
    log = drive(h, context, [("before", None)])
    assert json.loads(log["before"][-1]["body"])["model_version"] == old
    call(h, context, [])
    assert set(h.versions) == {h.current.name}  # retired once its last request ended


def test_only_the_engine_thread_and_short_lived_loaders_run_torch_in_the_worker(model_dir, tmp_path, monkeypatch):
    """GNU OpenMP gives each thread that runs a parallel operator a team of its own; with two long-lived
    teams every parallel region of a step wakes a sleeping thread (jai_handler.py, the engine thread). So
    the model loads on the engine thread, an update on a thread that ends after its load, and the
    worker's main thread (TorchServe's) runs no torch operator of the model."""
    from test_operations import wait_for

    loaded_on = []
    real_load = jai_handler.load_model
    monkeypatch.setattr(jai_handler, "load_model",
                        lambda *a, **k: loaded_on.append(threading.current_thread().name) or real_load(*a, **k))
    h, context = make_handler(model_dir)
    assert loaded_on == ["jai-engine_0"]
    ran_on = set()
    for module in h.engine.model.modules():  # every forward of the model, prefill and decode
        module.register_forward_pre_hook(lambda *_: ran_on.add(threading.current_thread().name))
    call(h, context, [("a", {"prompt": "제주", "max_tokens": 6, "temperature": 0})])
    drive(h, context, [("a", None)])
    assert ran_on == {"jai-engine_0"}
    watch_updates(h, tmp_path)
    name_update(h, tmp_path, checkpoint_folder(model_dir, tmp_path / "new", seed=6)).result(timeout=60)
    assert loaded_on[1].startswith("jai-loader")
    # the loader thread ends after its load, and its OpenMP team with it
    wait_for(lambda: all(t.name != loaded_on[1] for t in threading.enumerate()), 10, what="the loader thread to end")
