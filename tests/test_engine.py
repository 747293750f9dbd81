"""The engine against the seed's no-cache reference, and its scheduling behaviour."""

import pytest
import torch
from torch.nn import functional as F

from conftest import FULL, TINY
from jaiserve import Engine, SamplingParams, load_model
from jaiserve.model import BMM_DECODE_MIN_ROWS, PackedPrompts, decode_attention


def reference_greedy(reference, prompt, max_tokens):
    out = reference.generate(torch.tensor([prompt]), max_tokens, temperature=1.0, top_k=1)
    return out[0, len(prompt) :].tolist()


def prompt_of(length, offset=3, vocab=TINY["vocab_size"]):
    return [(offset + 7 * i) % vocab for i in range(length)]


BS = TINY["block_size"]


@pytest.mark.parametrize(
    "prompt_len, max_tokens",
    [
        (1, 2 * BS + 10),  # cache, then the window path, past 2 x block_size
        (5, 40),
        (BS - 1, 10),  # fills the cache exactly, then leaves it
        (BS, 5),  # the first token already needs the window
        (BS + 7, 2 * BS),  # prompt longer than block_size
    ],
)
@pytest.mark.parametrize("greedy", [dict(top_k=1), dict(temperature=0)])
def test_greedy_matches_seed_reference(tiny_model, tiny_reference, prompt_len, max_tokens, greedy):
    prompt = prompt_of(prompt_len)
    engine = Engine(tiny_model, max_batch=4)
    [result] = engine.generate([prompt], [SamplingParams(max_tokens=max_tokens, **greedy)])
    assert result.token_ids == reference_greedy(tiny_reference, prompt, max_tokens)
    assert result.finish_reason == "length"


@pytest.mark.parametrize(
    "prompt_len, max_tokens",
    [(1, 24), (250, 12), (500, 13)],  # cache; crossing block_size; prompt + max_tokens > 2 x 256
)
def test_greedy_matches_seed_reference_full_shape(full_ckpt, prompt_len, max_tokens):
    path, reference = full_ckpt
    model = load_model(path)
    assert model.config.vocab_size == FULL["vocab_size"] and model.config.n_layer == FULL["n_layer"]
    prompt = prompt_of(prompt_len, vocab=FULL["vocab_size"])
    [result] = Engine(model, max_batch=2).generate([prompt], [SamplingParams(max_tokens, top_k=1)])
    assert result.token_ids == reference_greedy(reference, prompt, max_tokens)


BATCH_REQUESTS = [
    (prompt_of(3, 1), SamplingParams(max_tokens=50, temperature=0)),
    (prompt_of(12, 2), SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=11)),
    (prompt_of(1, 3), SamplingParams(max_tokens=60, temperature=1.2, top_k=None, seed=12)),
    (prompt_of(30, 4), SamplingParams(max_tokens=9, temperature=0.7, top_p=0.8, seed=13)),
    (prompt_of(BS + 4, 5), SamplingParams(max_tokens=15, top_k=1)),
    (prompt_of(7, 6), SamplingParams(max_tokens=33, temperature=0.8, top_k=5, top_p=0.9, seed=14)),
    (prompt_of(20, 7), SamplingParams(max_tokens=1, temperature=0.5, seed=15)),
    (prompt_of(16, 8), SamplingParams(max_tokens=45, top_k=1)),
]


def test_request_is_the_same_alone_and_in_a_staggered_batch(tiny_model):
    alone = [
        Engine(tiny_model, max_batch=8).generate([prompt], [params])[0].token_ids
        for prompt, params in BATCH_REQUESTS
    ]
    engine = Engine(tiny_model, max_batch=8)
    tokens = {i: [] for i in range(len(BATCH_REQUESTS))}
    finished, step = set(), 0
    while len(finished) < len(BATCH_REQUESTS):
        if step < len(BATCH_REQUESTS):  # one new request joins at each step
            engine.add_request(step, *BATCH_REQUESTS[step])
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
        step += 1
        assert engine.running <= 8
    assert [tokens[i] for i in range(len(BATCH_REQUESTS))] == alone
    assert not engine.has_work() and engine.rows == []


def test_max_batch_bounds_running_requests_and_queue_drains(tiny_model):
    engine = Engine(tiny_model, max_batch=3)
    for i in range(7):
        engine.add_request(i, prompt_of(4, i), SamplingParams(max_tokens=5, temperature=0))
    finished_at = {}
    step = 0
    while engine.has_work():
        outputs = engine.step()
        assert len(outputs) <= 3 and engine.running <= 3
        finished_at.update({o.request_id: step for o in outputs if o.finished})
        step += 1
    assert sorted(finished_at) == list(range(7))
    assert finished_at[0] < finished_at[6]  # first come, first served


def test_prefill_budget_spreads_admission_over_steps(tiny_model):
    engine = Engine(tiny_model, max_batch=8, max_prefill_tokens=25)
    for i in range(4):
        engine.add_request(i, prompt_of(10, i), SamplingParams(max_tokens=3, temperature=0))
    first = engine.step()
    assert [o.request_id for o in first] == [0, 1]  # 10 + 10 fit the budget, the third waits
    assert len(engine.waiting) == 2


def test_a_decode_only_step_admits_nothing_and_re_reads_no_window(tiny_model):
    engine = Engine(tiny_model, max_batch=8)
    assert engine.step(prefill=False) == []  # nothing decodes yet: the prompts wait for a full step
    engine.add_request("long", prompt_of(BS, 1), SamplingParams(max_tokens=5, temperature=0))
    engine.add_request("short", prompt_of(4, 2), SamplingParams(max_tokens=5, temperature=0))
    assert {o.request_id for o in engine.step()} == {"long", "short"}  # prefilled: "long" fills its row
    engine.add_request("new", prompt_of(3, 3), SamplingParams(max_tokens=5, temperature=0))
    assert [o.request_id for o in engine.step(prefill=False)] == ["short"]  # "long" waits for a re-read
    assert [r.id for r in engine.waiting] == ["new"] and [r.id for r in engine.full] == ["long"]
    assert {o.request_id for o in engine.step()} == {"short", "new", "long"}


def test_abort_frees_the_row_and_keeps_others_exact(tiny_model):
    params = SamplingParams(max_tokens=30, temperature=0)
    expected = Engine(tiny_model).generate([prompt_of(6, 9)], [params])[0].token_ids
    engine = Engine(tiny_model, max_batch=4)
    engine.add_request("a", prompt_of(5, 1), params)
    engine.add_request("b", prompt_of(6, 9), params)
    got = []
    for step in range(30):
        if step == 3:
            assert engine.abort("a")
            assert [r.id for r in engine.rows] == ["b"]
        got += [t for o in engine.step() if o.request_id == "b" for t in o.token_ids]
    assert got == expected
    assert not engine.abort("a")


def test_usage_counts(tiny_engine):
    [result] = tiny_engine.generate([prompt_of(9)], [SamplingParams(max_tokens=4, temperature=0)])
    assert result.prompt_tokens == 9 and len(result.token_ids) == 4


def test_bfloat16_engine_runs_and_mostly_agrees_with_float32(tiny_ckpt):
    path, _ = tiny_ckpt
    prompt, params = prompt_of(6), SamplingParams(max_tokens=16, temperature=0)
    full = Engine(load_model(path, n_head=2)).generate([prompt], [params])[0].token_ids
    engine = Engine(load_model(path, n_head=2, dtype=torch.bfloat16))
    assert engine.cache.k.dtype == torch.bfloat16
    half = engine.generate([prompt], [params])[0].token_ids
    assert len(half) == 16 and half[:2] == full[:2]  # rounding may change later greedy choices


def test_device_resolution():
    from jaiserve import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_decode_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    B, nh, L, hs = 5, 3, 17, 8
    q = torch.randn(B, 3 * nh * hs)[:, : nh * hs].view(B, nh, hs)  # a strided view, as c_attn's output gives
    cache = torch.randn(2, B, nh, 32, hs)  # the cache's layout: k and v are views of its first L positions
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]
    lengths = torch.tensor([17, 1, 9, 16, 4])
    mask = torch.zeros(B, L).masked_fill_(torch.arange(L)[None, :] >= lengths[:, None], float("-inf"))
    for mask in (mask[:, None, None, :], None):  # None: every row sees every key
        expected = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask).reshape(B, nh * hs)
        torch.testing.assert_close(decode_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)


def test_packed_prompts_attend_like_a_block_diagonal_mask():
    """Prefill attention per prompt (grouped by length, each group padded to its longest) equals one
    attention over the packed sequence with a block-diagonal causal mask, which costs the square of the
    whole step's tokens."""
    torch.manual_seed(0)
    nh, hs, lengths = 3, 8, [5, 1, 12, 3, 7, 2, 30]  # length groups {5, 7} {3} {1} {12} {2} {30}
    N, C = sum(lengths), nh * hs
    qkv = torch.randn(1, N, 3 * C)
    q, k, v = (t.view(1, N, nh, hs).transpose(1, 2) for t in qkv.split(C, dim=2))
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.cat([torch.arange(n) for n in lengths])
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, N, C)
    torch.testing.assert_close(PackedPrompts(lengths, "cpu").attend(qkv, nh), expected, rtol=1e-5, atol=1e-6)
    assert PackedPrompts([7], "cpu").single  # one prompt: plain causal attention, nothing gathered


def test_prompts_of_mixed_lengths_prefilled_together_decode_like_the_seed(tiny_model, tiny_reference):
    prompts = [prompt_of(n, offset=i) for i, n in enumerate((1, 9, 3, 17, 2))]
    engine = Engine(tiny_model, max_batch=len(prompts), max_prefill_tokens=sum(map(len, prompts)))
    results = engine.generate(prompts, [SamplingParams(max_tokens=8, top_k=1)] * len(prompts))
    assert [r.token_ids for r in results] == [reference_greedy(tiny_reference, p, 8) for p in prompts]


def test_a_wide_batch_decodes_like_the_seed(tiny_model, tiny_reference):
    """Steps of BMM_DECODE_MIN_ROWS rows or more attend with decode_attention: still the seed's tokens."""
    n = BMM_DECODE_MIN_ROWS + 4
    prompts = [prompt_of(1 + 3 * i % 20, offset=i) for i in range(n)]
    results = Engine(tiny_model, max_batch=n).generate(prompts, [SamplingParams(max_tokens=12, top_k=1)] * n)
    assert [r.token_ids for r in results] == [reference_greedy(tiny_reference, p, 12) for p in prompts]


def test_small_decode_steps_run_on_one_thread_and_decode_alike(tiny_model, tiny_reference):
    """one_thread_rows: a decode-only step of at most that many rows sets torch to one thread, a prefill or a
    larger step back to the engine's; the tokens are the seed's either way."""
    before = torch.get_num_threads()
    try:
        engine = Engine(tiny_model, max_batch=4, threads=2, one_thread_rows=1)
        tokens, threads = {"a": [], "b": []}, []

        def step():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            threads.append(torch.get_num_threads())

        engine.add_request("a", prompt_of(5), SamplingParams(max_tokens=6, top_k=1))
        step()  # a's prefill
        step()  # a decodes alone
        engine.add_request("b", prompt_of(4, offset=9), SamplingParams(max_tokens=3, top_k=1))
        step()  # a decodes beside b's prefill
        step()  # a and b decode: two rows
        while engine.has_work():
            step()  # b ends after its third token, a decodes alone again
        assert threads == [2, 1, 2, 2, 2, 1]
        assert tokens["a"] == reference_greedy(tiny_reference, prompt_of(5), 6)
        assert tokens["b"] == reference_greedy(tiny_reference, prompt_of(4, offset=9), 3)
    finally:
        torch.set_num_threads(before)
