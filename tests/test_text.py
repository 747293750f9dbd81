"""Text out of the engine: clean incremental decoding of Korean, stop strings, end-of-text."""

import pytest
import torch

from conftest import KOREAN_TEXT, TINY
from jaiserve import Engine, GPT, GPTConfig, IncrementalDetokenizer, SamplingParams


def test_pieces_join_to_decode_and_never_split_a_character(korean_tokenizer):
    text = " ".join(KOREAN_TEXT) + " 새로운 문장: 한국어 채용 공고 스트리밍!"
    ids = korean_tokenizer.encode(text).ids
    assert any("\ufffd" in korean_tokenizer.decode([i]) for i in ids), "test needs split syllables"
    detokenizer = IncrementalDetokenizer(korean_tokenizer)
    pieces = [detokenizer.add([i]) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == korean_tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(text.split())  # it really streams


@pytest.fixture(scope="module")
def text_engine_model(korean_tokenizer):
    torch.manual_seed(3)
    config = GPTConfig(**dict(TINY, vocab_size=korean_tokenizer.get_vocab_size()))
    return GPT(config).eval()


def run(engine, prompt_ids, params):
    engine.add_request("r", prompt_ids, params)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    return outputs


def test_stop_string_cuts_the_text_and_is_never_streamed(text_engine_model, korean_tokenizer):
    engine = Engine(text_engine_model, korean_tokenizer, eos_token_id=-1)
    prompt = korean_tokenizer.encode("서울 채용").ids
    free = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0))
    full = "".join(o.text for o in free)
    assert full == korean_tokenizer.decode([t for o in free for t in o.token_ids])
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    stopped = run(engine, prompt, SamplingParams(max_tokens=40, temperature=0, stop=[stop, "zzz"]))
    assert "".join(o.text for o in stopped) == cut
    assert stopped[-1].finish_reason == "stop" and len(stopped) < len(free)
    assert not any(stop in o.text for o in stopped)


def test_end_of_text_token_stops_generation(text_engine_model, korean_tokenizer):
    prompt = korean_tokenizer.encode("판교").ids
    free = run(Engine(text_engine_model, korean_tokenizer), prompt, SamplingParams(20, temperature=0))
    eos = free[5].token_ids[0]  # pretend the sixth token is the end-of-text token
    stopped = run(
        Engine(text_engine_model, korean_tokenizer, eos_token_id=eos),
        prompt,
        SamplingParams(20, temperature=0),
    )
    assert len(stopped) == 6 and stopped[-1].finish_reason == "stop"


def test_single_token_stop_string_stops_even_if_decode_skips_it(text_engine_model, korean_tokenizer):
    engine = Engine(text_engine_model, korean_tokenizer, eos_token_id=-1)
    prompt = korean_tokenizer.encode("[QUESTION]").ids
    free = run(engine, prompt, SamplingParams(30, temperature=0))
    marker = korean_tokenizer.id_to_token(free[3].token_ids[0])
    stopped = run(engine, prompt, SamplingParams(30, temperature=0, stop=marker))
    assert len(stopped) <= 4 and stopped[-1].finish_reason == "stop"


def test_eos_is_found_in_the_tokenizer(korean_tokenizer, text_engine_model):
    engine = Engine(text_engine_model, korean_tokenizer)
    assert engine.eos_token_id == korean_tokenizer.token_to_id("<|endoftext|>")
