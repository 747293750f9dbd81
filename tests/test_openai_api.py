"""The HTTP contract's two views (jaiserve.api native, jaiserve.openai_api; jaiserve.routes picks one)
without a server: parsing, refusals, and responses built from real engine steps on the tiny model."""

import json

import pytest

from jaiserve import Engine, SamplingParams, StepOutput
from jaiserve.api import CHAT_TEMPLATE, Defaults, InvalidRequest, NativeRoute, ServedModel
from jaiserve.openai_api import DONE, OpenAIRoute, chat_prompt
from jaiserve.routes import route

DEFAULTS = Defaults(max_tokens=7, temperature=0.8, top_k=50, top_p=1.0)
MODEL = ServedModel(name="jai", created=1700000000, context_tokens=32, count_tokens=len)


def parse(path, body, model=MODEL, defaults=DEFAULTS):
    return route(path).parse(body, "req-1", defaults, model)


def refused(path, body):
    with pytest.raises(InvalidRequest) as caught:
        parse(path, body)
    return caught.value, json.loads(route(path).refusal(caught.value))


def run(exchange, engine):
    """Drive the exchange's engine requests to the end as the handler does; return (chunks, final)."""
    for i, request in enumerate(exchange.requests):
        engine.add_request(i, engine.encode(request.prompt), request.params)
    chunks = []
    while not exchange.finished:
        for out in engine.step():
            exchange.add(out.request_id, out)
        if not exchange.finished and (chunk := exchange.chunk()):
            chunks.append(chunk)
    return chunks, exchange.final()


def events(text):
    """Server-sent events -> their data payloads (JSON decoded, [DONE] kept as a string)."""
    assert text.endswith("\n\n")
    payloads = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


@pytest.fixture
def engine(tiny_model, korean_tokenizer):
    return Engine(tiny_model, korean_tokenizer, max_batch=8)


# ----- routing -----


def test_url_path_picks_the_view():
    assert isinstance(route(""), NativeRoute) and isinstance(route(None), NativeRoute)
    assert isinstance(route("v1/completions"), OpenAIRoute) and isinstance(route("/v1/models/"), OpenAIRoute)
    exc, body = refused("v1/embeddings", {"model": "jai"})
    assert exc.status == 404 and body["error"]["type"] == "invalid_request_error"
    assert "/v1/embeddings" in body["error"]["message"] and body["error"]["param"] is None
    exc, body = refused("explain", {"prompt": "a"})  # not v1: the native shape
    assert exc.status == 404 and body["code"] == 404 and body["type"] == "NotFound"


def test_models_are_listed_and_retrieved_without_the_engine():
    listing = parse("v1/models", b"")
    assert listing.finished and not listing.requests
    assert json.loads(listing.final()) == {
        "object": "list", "data": [{"id": "jai", "object": "model", "created": 1700000000, "owned_by": "jaiserve"}]
    }
    assert json.loads(parse("v1/models/jai", b"").final())["id"] == "jai"
    exc, body = refused("v1/models/gpt-4", b"")
    assert exc.status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


# ----- parsing -----


def test_completions_fan_out_prompt_major_with_seed_plus_choice():
    exchange = parse("v1/completions", {"model": "jai", "prompt": ["서울", "부산"], "n": 3, "seed": 10,
                                        "max_tokens": 4, "stop": "\n", "top_k": 5, "temperature": None})
    prompts = [r.prompt for r in exchange.requests]
    assert prompts == ["서울"] * 3 + ["부산"] * 3
    assert [r.params.seed for r in exchange.requests] == [10, 11, 12] * 2
    params = exchange.requests[0].params
    assert (params.max_tokens, params.top_k, params.stop, params.temperature) == (4, 5, ("\n",), 0.8)
    assert exchange.content_type == "application/json"
    defaults = parse("v1/completions", {"model": "jai", "prompt": "a"}).requests[0].params
    assert defaults == SamplingParams(max_tokens=7, temperature=0.8, top_k=50, top_p=1.0)


def test_chat_with_one_user_message_is_the_native_chat_prompt():
    exchange = parse("v1/chat/completions", {"model": "jai", "messages": [{"role": "user", "content": "판교?"}],
                                             "stop": ["끝"]})
    native = parse("", {"prompt": "판교?", "mode": "chat"})
    assert exchange.requests[0].prompt == native.requests[0].prompt == CHAT_TEMPLATE.format(prompt="판교?")
    assert exchange.requests[0].params.stop == ("끝", "[/ANSWER]")


def test_chat_history_is_kept_newest_first_while_it_fits_and_system_is_prefixed():
    messages = [
        {"role": "system", "content": "짧게"},
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1\n"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
        {"role": "user", "content": "q3"}, {"role": "user", "content": "more"},
    ]
    turn = "[QUESTION]\n{}\n[/QUESTION]\n\n[ANSWER]\n{}\n[/ANSWER]\n\n"
    head, last = "짧게\n\n", CHAT_TEMPLATE.format(prompt="q3\nmore")
    everything = head + turn.format("q1", "a1") + turn.format("q2", "a2") + last
    roomy = ServedModel(context_tokens=len(everything), count_tokens=len)
    assert chat_prompt(messages, DEFAULTS, roomy) == everything
    tight = ServedModel(context_tokens=len(everything) - 1, count_tokens=len)  # q1's turn no longer fits
    assert chat_prompt(messages, DEFAULTS, tight) == head + turn.format("q2", "a2") + last
    tiny = ServedModel(context_tokens=1, count_tokens=len)  # nothing fits: the question and system stay
    assert chat_prompt(messages, DEFAULTS, tiny) == head + last


NEUTRAL = {"logprobs": None, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "user": "u1"}
NEUTRAL_CHAT = {**NEUTRAL, "logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                "top_logprobs": None, "store": False, "stream_options": None}


def test_neutral_values_of_unsupported_parameters_are_accepted():
    parse("v1/completions", {"model": "jai", "prompt": "a", "best_of": 1, "suffix": None, **NEUTRAL})
    parse("v1/chat/completions", {"model": "jai", "messages": [{"role": "user", "content": "a"}], **NEUTRAL_CHAT})


CHAT = {"model": "jai", "messages": [{"role": "user", "content": "서울"}]}
REFUSED = [  # (path, body, param, start of the message)
    ("v1/completions", b"", "body", "body: is empty; send a JSON object like {\"model\": \"jai\", \"prompt\""),
    ("v1/completions", b"{no", "body", "body: is not valid JSON"),
    ("v1/completions", {"prompt": "a"}, "model", "model: is required"),
    ("v1/completions", {"model": "jai"}, "prompt", "prompt: is required"),
    ("v1/completions", {"model": "jai", "prompt": [1, 2]}, "prompt", "prompt: must be a string or a list of strings"),
    ("v1/completions", {"model": "jai", "prompt": []}, "prompt", "prompt: must not be an empty list"),
    ("v1/completions", {"model": "jai", "prompt": ["a", ""]}, "prompt[1]", "prompt[1]: must not be empty"),
    ("v1/completions", {"model": "jai", "prompt": "a", "logprobs": 2}, "logprobs", "logprobs: is not supported"),
    ("v1/completions", {"model": "jai", "prompt": "a", "best_of": 3}, "best_of", "best_of: is not supported"),
    ("v1/completions", {"model": "jai", "prompt": "a", "suffix": "x"}, "suffix", "suffix: is not supported"),
    ("v1/completions", {"model": "jai", "prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty", "frequency"),
    ("v1/completions", {"model": "jai", "prompt": "a", "max_token": 3}, "max_token", "max_token: is not a known"),
    ("v1/completions", {"model": "jai", "prompt": "a", "n": 0}, "n", "n: must be >= 1, got 0"),
    ("v1/completions", {"model": "jai", "prompt": "a", "n": True}, "n", "n: must be an integer"),
    ("v1/completions", {"model": "jai", "prompt": ["a", "b"], "n": 5}, "n", "n: asks for 10 choices (5 x 2 prompts)"),
    ("v1/completions", {"model": "jai", "prompt": "a", "echo": "yes"}, "echo", "echo: must be true or false"),
    ("v1/completions", {"model": "jai", "prompt": "a", "temperature": -1}, "temperature", "temperature: must be >= 0"),
    ("v1/completions", {"model": "jai", "prompt": "a", "max_tokens": True}, "max_tokens", "max_tokens: must be an int"),
    ("v1/completions", {"model": "jai", "prompt": "a", "top_p": 0}, "top_p", "top_p: must be in (0, 1]"),
    ("v1/completions", {"model": "jai", "prompt": "a", "seed": "x"}, "seed", "seed: must be an integer"),
    ("v1/completions", {"model": "jai", "prompt": "a", "stop": 5}, "stop", "stop: must be a string or a list"),
    ("v1/completions", {"model": "jai", "prompt": "a", "user": 5}, "user", "user: must be a string"),
    ("v1/completions", {"model": "jai", "prompt": "a", "stream_options": {"include_usage": True}}, "stream_options",
     "stream_options: is only allowed when stream is true"),
    ("v1/completions", {"model": "jai", "prompt": "a", "stream": True, "stream_options": {"x": 1}},
     "stream_options.x", "stream_options.x: is not supported"),
    ("v1/completions", {"model": "jai", "prompt": "a" * 40000}, "prompt", "prompt: is 40000 characters"),
    ("v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools", "tools: is not supported"),
    ("v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, "response_format",
     "response_format: is not supported"),
    ("v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs", "logprobs: is not supported"),
    ("v1/chat/completions", {**CHAT, "echo": True}, "echo", "echo: is not a known parameter"),
    ("v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens: must be >= 1"),
    ("v1/chat/completions", {"model": "jai"}, "messages", "messages: must be a non-empty list"),
    ("v1/chat/completions", {"model": "jai", "messages": []}, "messages", "messages: must be a non-empty list"),
    ("v1/chat/completions", {"model": "jai", "messages": ["hi"]}, "messages[0]", "messages[0]: must be an object"),
    ("v1/chat/completions", {"model": "jai", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
     "messages[0].role: must be one of system, developer, user, assistant"),
    ("v1/chat/completions", {"model": "jai", "messages": [{"role": "user", "content": "x", "name": "kim"}]},
     "messages[0].name", "messages[0].name: is not supported"),
    ("v1/chat/completions", {"model": "jai", "messages": [{"role": "user", "content": None}]},
     "messages[0].content", "messages[0].content: must be a string or a list of text parts"),
    ("v1/chat/completions", {"model": "jai", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "messages[0].content[0]: only text parts are supported, got 'image_url'"),
    ("v1/chat/completions", {"model": "jai", "messages": [{"role": "assistant", "content": "x"}]},
     "messages[0].role", "messages[0].role: an assistant message must follow a user message"),
    ("v1/chat/completions", {"model": "jai", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages", "messages: must end with a user message"),
    ("v1/chat/completions", {"model": "jai", "messages": [{"role": "user", "content": " "}]},
     "messages", "messages: the last user message must not be empty"),
]


@pytest.mark.parametrize("path, body, param, message", REFUSED)
def test_bad_requests_are_refused_in_openais_shape_naming_the_parameter(path, body, param, message):
    exc, answer = refused(path, body)
    assert exc.status == 400
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"].startswith(message), error["message"]


def test_an_unknown_model_is_a_404():
    exc, body = refused("v1/completions", {"model": "gpt-4o", "prompt": "a"})
    assert exc.status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["message"] == "model: 'gpt-4o' does not exist (this server serves 'jai')"


# ----- responses from engine steps -----


def test_completion_matches_the_native_answer_and_its_usage(engine):
    body = {"prompt": "서울 채용", "max_tokens": 6, "temperature": 0}
    _, native = run(parse("", body), engine)
    _, final = run(parse("v1/completions", {"model": "jai", **body}), engine)
    native, answer = json.loads(native), json.loads(final)
    assert answer["object"] == "text_completion" and answer["id"] == "cmpl-req-1" and answer["model"] == "jai"
    assert answer["choices"] == [{"index": 0, "text": native["generated"], "logprobs": None,
                                  "finish_reason": native["finish_reason"]}]
    usage = native["usage"]
    assert answer["usage"] == {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    _, echoed = run(parse("v1/completions", {"model": "jai", "echo": True, **body}), engine)
    assert json.loads(echoed)["choices"][0]["text"] == native["full_text"]


def test_n_choices_count_the_prompt_once_and_a_seed_gives_distinct_choices(engine):
    exchange = parse("v1/completions", {"model": "jai", "prompt": ["부산", "대전 ML"], "n": 2, "max_tokens": 5,
                                        "seed": 3, "temperature": 1.0, "top_k": None})
    _, final = run(exchange, engine)
    answer = json.loads(final)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    prompt_tokens = len(engine.encode("부산")) + len(engine.encode("대전 ML"))
    assert answer["usage"]["prompt_tokens"] == prompt_tokens
    assert answer["usage"]["completion_tokens"] == sum(c.completion_tokens for c in exchange.choices) == 20
    texts = [c["text"] for c in answer["choices"]]
    assert texts[0] != texts[1]  # seed 3 and seed 4
    alone = json.loads(run(parse("v1/completions", {"model": "jai", "prompt": "대전 ML", "max_tokens": 5, "seed": 4,
                                                    "temperature": 1.0, "top_k": None}), engine)[1])
    assert alone["choices"][0]["text"] == texts[3]  # choice 1 of prompt 1 = that prompt alone with seed + 1


def test_chat_stream_opens_with_the_role_and_joins_to_the_plain_answer(engine):
    body = {**CHAT, "max_tokens": 8, "seed": 2, "n": 2}
    chunks, final = run(parse("v1/chat/completions", {**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}), engine)
    received = [e for c in chunks for e in events(c)] + events(final)
    assert received[-1] == "[DONE]"
    *pieces, usage_chunk, _ = received
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 16
    assert all(p["object"] == "chat.completion.chunk" and p["usage"] is None for p in pieces)
    plain = json.loads(run(parse("v1/chat/completions", body), engine)[1])
    assert plain["object"] == "chat.completion" and plain["usage"] == usage_chunk["usage"]
    for index in (0, 1):
        mine = [p["choices"][0] for p in pieces if p["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(m["finish_reason"] is None for m in mine[:-1]) and mine[-1]["finish_reason"] == "length"
        text = "".join(m["delta"].get("content", "") for m in mine)
        assert text == plain["choices"][index]["message"]["content"]
        assert plain["choices"][index]["message"]["role"] == "assistant"


def test_completion_stream_without_usage_option_has_no_usage_field(engine):
    exchange = parse("v1/completions", {"model": "jai", "prompt": "제주", "max_tokens": 5, "stream": True,
                                        "echo": True})
    assert exchange.content_type == "text/event-stream; charset=utf-8"
    chunks, final = run(exchange, engine)
    received = [e for c in chunks for e in events(c)] + events(final)
    assert received[-1] == "[DONE]" and final.endswith(DONE)
    pieces = received[:-1]
    assert all("usage" not in p and p["object"] == "text_completion" for p in pieces)
    assert pieces[0]["choices"][0]["text"].startswith("제주")  # echo: the prompt opens the stream
    assert pieces[-1]["choices"][0]["finish_reason"] == "length"


def test_chunks_hold_back_split_characters():
    """A step that completed no character sends nothing; a stream never carries U+FFFD."""
    exchange = parse("v1/chat/completions", {**CHAT, "stream": True})
    exchange.add(0, StepOutput(0, [5], ""))  # half a syllable: only the role chunk
    [opening] = events(exchange.chunk())
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert exchange.chunk() == ""
    exchange.add(0, StepOutput(0, [6], "서"))
    assert events(exchange.chunk())[0]["choices"][0]["delta"] == {"content": "서"}
    exchange.add(0, StepOutput(0, [7], "울", "stop", 3, 3))
    assert exchange.finished
    last, done = events(exchange.final())
    assert last["choices"][0] == {"index": 0, "delta": {"content": "울"}, "logprobs": None, "finish_reason": "stop"}
    assert done == "[DONE]"


def test_failures_take_each_views_shape():
    chat = parse("v1/chat/completions", {**CHAT, "stream": True})
    assert json.loads(chat.failure(500, "generation failed", streaming=False))["error"]["type"] == "server_error"
    streamed, done = events(chat.failure(500, "generation failed", streaming=True))
    assert done == "[DONE]"
    assert streamed["error"]["message"] == "generation failed"
    native = parse("", {"prompt": "a", "stream": True})
    line = native.failure(500, "generation failed", streaming=True)
    assert line.endswith("\n") and json.loads(line) == {
        "code": 500, "type": "InternalServerError", "message": "generation failed", "finish_reason": "error"
    }
    assert json.loads(native.failure(500, "generation failed", streaming=False)) == {
        "code": 500, "type": "InternalServerError", "message": "generation failed"
    }
