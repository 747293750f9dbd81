"""UTF-8 safe sampling (handler/jaiserve/utf8.py): the tables against Python's own UTF-8 codec, the
mask on a Korean byte-level tokenizer, and the engine with the mask on and off."""

import codecs
import itertools

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from ts.context import Context

import jai_handler
from conftest import TINY
from jaiserve import Engine, SamplingParams
from jaiserve.utf8 import (
    AFTER_E0,
    AFTER_ED,
    AFTER_F0,
    AFTER_F4,
    BOUNDARY,
    CONT_1,
    CONT_2,
    CONT_3,
    N_STATES,
    Utf8Mask,
    byte_level_alphabet,
    token_bytes,
)

# bytes that put a decoder in each state (a lead byte waiting for its continuation bytes)
ENTER = {BOUNDARY: b"", CONT_1: b"\xc3", CONT_2: b"\xec", CONT_3: b"\xf1",
         AFTER_E0: b"\xe0", AFTER_ED: b"\xed", AFTER_F0: b"\xf0", AFTER_F4: b"\xf4"}

SAMPLED = SamplingParams(max_tokens=100, temperature=1.0, top_k=None)
GREEDY = SamplingParams(max_tokens=100, temperature=0)


def _char_prefixes() -> set[bytes]:
    """Every proper prefix of every encoded scalar value: the tails a valid text may still end in."""
    chars = itertools.chain(range(0xD800), range(0xE000, 0x110000))
    return {chr(c).encode()[:n] for c in chars for n in range(len(chr(c).encode()))}


@pytest.fixture(scope="module")
def valid_prefix():
    """Oracle from Python's codec: can ``data`` still be continued into valid UTF-8?"""
    tails = _char_prefixes()

    def check(data: bytes) -> bool:
        for cut in range(min(3, len(data)) + 1):
            head, tail = data[: len(data) - cut], data[len(data) - cut :]
            if tail in tails and _complete(head):
                return True
        return False

    return check


def allowed(mask: Utf8Mask, state: int, last: bool = False) -> torch.Tensor:
    return ~mask.blocked[state + N_STATES * last]


def test_every_byte_pair_from_every_state_matches_the_codec(valid_prefix):
    """All 1- and 2-byte tokens: allowed exactly when the bytes so far stay well-formed UTF-8
    (overlong forms, surrogates and code points past U+10FFFF are broken, as in Python and Rust)."""
    pieces = [bytes([b]) for b in range(256)] + [bytes(p) for p in itertools.product(range(256), repeat=2)]
    mask = Utf8Mask(pieces, "cpu")
    for state, enter in ENTER.items():
        expected = torch.tensor([valid_prefix(enter + p) for p in pieces])
        assert torch.equal(allowed(mask, state), expected), state
        ends = torch.tensor([valid_prefix(enter + p) and _complete(enter + p) for p in pieces])
        if not ends.any():  # 3 continuation bytes due and no 3-byte token: the ordinary row, never none
            ends = expected
        assert torch.equal(allowed(mask, state, last=True), ends), state


def _complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize(
    "state, piece, expected",
    [
        (CONT_2, b"\xb1\x84", BOUNDARY),  # supplies both continuation bytes of 채
        (CONT_2, b"\xb1", CONT_1),  # a pure continuation byte: one of the two
        (CONT_2, b"\xb1\x84\xec", CONT_2),  # completes 채 and starts the next syllable
        (BOUNDARY, b"\xec\x9a\xa9 \xea\xb0", CONT_1),  # several characters, the last one open
        (AFTER_F0, b"\x9f\x98\x80", BOUNDARY),  # U+1F600
        (CONT_2, b"A", BOUNDARY),  # broken: the decoder shows U+FFFD and goes on from "A"
        (CONT_2, b"\xec", CONT_2),  # broken: the new lead byte starts over
        (BOUNDARY, b"\x80", BOUNDARY),  # a stray continuation byte: broken, then at a boundary
    ],
)
def test_advance_follows_the_decoder(state, piece, expected):
    mask = Utf8Mask([piece] + [bytes([b]) for b in range(256)], "cpu")  # no state left without a token
    assert mask.advance(state, 0) == expected
    broken = codecs.getincrementaldecoder("utf-8")("replace").decode(ENTER[state] + piece, final=False)
    assert ("\ufffd" in broken) == bool(mask.blocked[state, 0])  # blocked exactly where it breaks


def test_alphabet_is_the_tokenizers_byte_level_alphabet(korean_tokenizer):
    alphabet = byte_level_alphabet()
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet()) and sorted(alphabet.values()) == list(range(256))
    pieces = token_bytes(korean_tokenizer, TINY["vocab_size"])
    for token_id, piece in enumerate(pieces):
        if piece is not None:  # the bytes we derive decode exactly as the tokenizer decodes the token
            assert piece.decode("utf-8", "replace") == korean_tokenizer.decode([token_id]), token_id
    assert pieces[korean_tokenizer.token_to_id("<|endoftext|>")] is None
    assert pieces[korean_tokenizer.token_to_id("[ANSWER]")] == b"[ANSWER]"
    assert pieces[TINY["vocab_size"] - 1] == b""  # an id the tokenizer does not have


@pytest.fixture(scope="module")
def korean_mask(korean_tokenizer):
    return Utf8Mask.for_tokenizer(korean_tokenizer, TINY["vocab_size"], "cpu")


def _split_syllable(tokenizer):
    """A syllable the tokenizer splits after its lead byte, and its token ids."""
    for word in ("채용", "연봉", "재택", "경력", "우대"):
        ids = tokenizer.encode(word).ids
        if len(tokenizer.decode(ids[:1]).rstrip("\ufffd")) < len(tokenizer.decode(ids[:1])):
            return word, ids
    raise AssertionError("the Korean tokenizer splits none of the syllables")


def test_waiting_for_two_continuation_bytes_allows_only_tokens_that_supply_them(
    korean_tokenizer, korean_mask, valid_prefix
):
    pieces = token_bytes(korean_tokenizer, TINY["vocab_size"])
    state = korean_mask.advance(BOUNDARY, korean_tokenizer.token_to_id("ì"))  # 0xEC: 채, 재, 정, ...
    assert state == CONT_2
    ok = allowed(korean_mask, state)
    supplying = 0
    for token_id, piece in enumerate(pieces):
        if piece:  # continuation bytes first (one, or both and then anything well-formed)
            assert bool(ok[token_id]) == valid_prefix(b"\xec" + piece), (token_id, piece)
            if ok[token_id]:
                assert all(0x80 <= b <= 0xBF for b in piece[:2]), piece
                supplying += 1
        else:  # a special token may end the request; an id unknown to the tokenizer decodes to nothing
            assert bool(ok[token_id]) == (piece == b""), token_id
    assert supplying > 64  # the 64 single continuation bytes, and merged pieces such as 채's "±Ħ"
    for token in ("<|endoftext|>", "[ANSWER]", "A", "ì"):
        assert not ok[korean_tokenizer.token_to_id(token)], token


def test_after_a_complete_character_every_lead_byte_is_allowed_again(korean_tokenizer, korean_mask):
    word, ids = _split_syllable(korean_tokenizer)
    state = BOUNDARY
    for token_id in ids:
        assert not korean_mask.blocked[state, token_id]
        state = korean_mask.advance(state, token_id)
    assert state == BOUNDARY and korean_tokenizer.decode(ids) == word
    ok = allowed(korean_mask, state)
    leads = [bytes([b]) for b in [*range(0xC2, 0xF5), *range(0x21, 0x7F)]]
    alphabet = {b: c for c, b in byte_level_alphabet().items()}
    for lead in leads:
        assert ok[korean_tokenizer.token_to_id(alphabet[lead[0]])], lead
    for cont in range(0x80, 0xC0):
        assert not ok[korean_tokenizer.token_to_id(alphabet[cont])], cont
    assert ok[korean_tokenizer.token_to_id("<|endoftext|>")] and ok[korean_tokenizer.token_to_id("[ANSWER]")]


def test_the_last_token_must_finish_its_character(korean_tokenizer, korean_mask):
    lead = korean_tokenizer.token_to_id("ì")
    assert allowed(korean_mask, BOUNDARY)[lead] and not allowed(korean_mask, BOUNDARY, last=True)[lead]
    last = SamplingParams(max_tokens=5, temperature=1.0)
    assert korean_mask.row(CONT_2, last, generated=4) == CONT_2 + N_STATES
    assert korean_mask.row(CONT_2, last, generated=3) == CONT_2
    # the last token from CONT_2 supplies exactly the two bytes (the table has such tokens)
    assert allowed(korean_mask, CONT_2, last=True).any()


def test_mask_leaves_greedy_rows_alone(korean_mask):
    logits = torch.randn(3, TINY["vocab_size"])
    rows = [korean_mask.row(CONT_2, GREEDY, 0), korean_mask.row(CONT_2, SAMPLED, 0),
            korean_mask.row(BOUNDARY, SamplingParams(top_k=1), 0)]
    masked = korean_mask.mask(logits.clone(), rows)  # in place
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    blocked = korean_mask.blocked[CONT_2]
    assert torch.isinf(masked[1][blocked]).all() and torch.equal(masked[1][~blocked], logits[1][~blocked])
    only_greedy = korean_mask.mask(logits, [rows[0], rows[2]])
    assert only_greedy is logits  # nothing to do: not even a copy


def test_no_mask_for_a_tokenizer_that_is_not_byte_level():
    word_level = Tokenizer(models.WordLevel({"채용": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert Utf8Mask.for_tokenizer(word_level, 2, "cpu") is None


# ----- the engine -----


@pytest.fixture(scope="module")
def korean_model(korean_tokenizer):
    """A random tiny model: sampled at temperature 1 over the whole vocabulary it breaks characters
    often, which is what the mask has to prevent. Its vocabulary is larger than the tokenizer's."""
    from jaiserve import GPT, GPTConfig

    torch.manual_seed(5)
    return GPT(GPTConfig(**TINY)).eval()


def _requests(tokenizer):
    prompts = [tokenizer.encode(p).ids for p in ("채용", "서울 백엔드", "연봉 협의", "판교의")]
    params = [SamplingParams(max_tokens=24, temperature=1.0, top_k=None, seed=s) for s in range(6)]
    params += [SamplingParams(max_tokens=17, temperature=0.9, top_k=40, top_p=0.9, seed=s) for s in range(6)]
    return [(prompts[i % len(prompts)], p) for i, p in enumerate(params)]


def _texts(engine, requests):
    results = engine.generate([p for p, _ in requests], [params for _, params in requests])
    return [r.text for r in results], [r.token_ids for r in results]


def test_sampled_text_never_breaks_a_character_and_the_switch_turns_it_off(korean_model, korean_tokenizer):
    requests = _requests(korean_tokenizer)
    safe, safe_ids = _texts(Engine(korean_model, korean_tokenizer, max_batch=16), requests)
    assert not any("\ufffd" in t for t in safe)
    assert all(korean_tokenizer.decode(ids) == text for ids, text in zip(safe_ids, safe))
    off = Engine(korean_model, korean_tokenizer, max_batch=16, utf8_safe_sampling=False)
    assert off.utf8 is None
    broken, _ = _texts(off, requests)
    assert sum("\ufffd" in t for t in broken) >= len(requests) // 2  # what the mask prevents


def test_seeded_sampling_stays_batch_invariant_with_the_mask(korean_model, korean_tokenizer):
    requests = _requests(korean_tokenizer)
    single = Engine(korean_model, korean_tokenizer, max_batch=1)
    alone = [_texts(single, [r])[1][0] for r in requests]
    engine = Engine(korean_model, korean_tokenizer, max_batch=16)
    tokens = {i: [] for i in range(len(requests))}
    step = 0
    while step < len(requests) or engine.has_work():
        if step < len(requests):  # one joins per step: batch mates and their states keep changing
            engine.add_request(step, *requests[step])
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step += 1
    assert [tokens[i] for i in range(len(requests))] == alone


def test_greedy_is_the_same_with_the_mask_on_or_off(korean_model, korean_tokenizer):
    prompts = [korean_tokenizer.encode(p).ids for p in ("채용", "서울 백엔드")]
    params = [SamplingParams(max_tokens=40, temperature=0), SamplingParams(max_tokens=40, top_k=1)]
    on = Engine(korean_model, korean_tokenizer).generate(prompts, params)
    off = Engine(korean_model, korean_tokenizer, utf8_safe_sampling=False).generate(prompts, params)
    assert [r.token_ids for r in on] == [r.token_ids for r in off]
    assert any("\ufffd" in r.text for r in on)  # the seed's greedy tokens, broken characters and all


# ----- the setting -----


@pytest.mark.parametrize("setting, active", [(None, True), (True, True), (False, False)])
def test_handler_setting_switches_the_mask(tmp_path, tiny_ckpt, korean_tokenizer, setting, active):
    import shutil

    shutil.copy(tiny_ckpt[0], tmp_path / "ckpt.pt")
    korean_tokenizer.save(str(tmp_path / "tokenizer.json"))
    block = {"n_head": 2, "threads": 1}
    if setting is not None:
        block["utf8_safe_sampling"] = setting
    context = Context("jai", str(tmp_path), {}, 1, None, "0.12.0", model_yaml_config={"handler": block})
    handler = jai_handler.JAIHandler()
    handler.initialize(context)
    assert (handler.engine.utf8 is not None) == active
