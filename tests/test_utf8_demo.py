"""UTF-8 safe sampling on the demo model: 200 sampled answers at temperature 1.0 never contain U+FFFD,
in-process and through a real torchserve, streamed or not; without the mask some of them do."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer
from jaiserve.api import CHAT_STOP, CHAT_TEMPLATE
from scripts.make_demo_model import PLACES, QUESTIONS, ROLES

ANSWERS = 200
MAX_TOKENS = 64
GENERATE = ("채용", "서울", "연봉", "판교 백엔드", "신입 개발자", "경력 5년", "부산 데이터", "원격 근무")


def demo_requests(n=ANSWERS):
    """(mode, text, params): 3 in 4 chat questions over the places and roles, 1 in 4 plain prompts
    (the issue's `generate "채용"`), each sampled at temperature 1.0, top_k 50, its own seed."""
    roles = list(ROLES)
    out = []
    for i in range(n):
        params = dict(max_tokens=MAX_TOKENS, temperature=1.0, top_k=50, seed=i)
        if i % 4 == 3:
            out.append(("generate", GENERATE[i // 4 % len(GENERATE)], SamplingParams(**params)))
            continue
        place, role = PLACES[i % len(PLACES)], roles[i // len(PLACES) % len(roles)]
        question = QUESTIONS[i % len(QUESTIONS)].format(where=place.where, place=place.name, role=role)
        out.append(("chat", question, SamplingParams(**params, stop=CHAT_STOP)))
    return out


def prompt_text(mode, text):
    return CHAT_TEMPLATE.format(prompt=text) if mode == "chat" else text


def run(engine, requests):
    """Every request's streamed pieces and final text, through engine.step() as the handler does."""
    for i, (mode, text, params) in enumerate(requests):
        engine.add_request(i, engine.encode(prompt_text(mode, text)), params)
    pieces = {i: [] for i in range(len(requests))}
    while engine.has_work():
        for out in engine.step():
            pieces[out.request_id].append(out.text)
    return [pieces[i] for i in range(len(requests))]


@pytest.fixture(scope="module")
def demo_answers(demo_build):
    """The 200 answers with the mask (the default) and without it."""
    model = load_model(demo_build.checkpoint)
    tokenizer = load_tokenizer(demo_build.tokenizer, model.config.vocab_size)
    requests = demo_requests()
    return requests, {
        safe: run(Engine(model, tokenizer, max_batch=64, utf8_safe_sampling=safe), requests)
        for safe in (True, False)
    }


def test_200_sampled_demo_answers_never_contain_a_broken_character(demo_answers):
    requests, answers = demo_answers
    for (mode, text, _), pieces in zip(requests, answers[True]):
        assert not any("\ufffd" in p for p in pieces), (mode, text, pieces)  # streamed
        assert "\ufffd" not in "".join(pieces), (mode, text)  # or not
    broken = [r for r, pieces in zip(requests, answers[False]) if "\ufffd" in "".join(pieces)]
    assert len(broken) >= ANSWERS // 50, "without the mask some answers should break (the seed's sampling)"


@pytest.mark.e2e
def test_sampled_answers_through_torchserve_are_clean_streamed_or_not(ts_server, demo_answers):
    """The requests whose answers break without the mask, sent together (one batch), half streamed."""
    requests, answers = demo_answers
    broken = [r for r, pieces in zip(requests, answers[False]) if "\ufffd" in "".join(pieces)][:32]
    assert len(broken) >= 4

    def ask(job):
        n, (mode, text, params) = job
        body = {"prompt": text, "mode": mode, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_k": params.top_k, "seed": params.seed, "stream": n % 2 == 0}
        response = ts_server.predict(body, timeout=120)
        assert response.status_code == 200, response.text
        if not body["stream"]:
            return [response.json()["generated"]], response.json()["generated"]
        lines = [json.loads(line) for line in response.text.splitlines()]
        return [line["text"] for line in lines], lines[-1]["generated"]

    with ThreadPoolExecutor(len(broken)) as pool:
        replies = list(pool.map(ask, enumerate(broken)))
    for (mode, text, _), (pieces, generated) in zip(broken, replies):
        assert "".join(pieces) == generated
        assert not any("\ufffd" in p for p in pieces), (mode, text, pieces)
