"""Past the window: ``window_stride`` S re-prefills the last block_size - S + 1 tokens once per S tokens.

The reference is written here without a cache: before each token, crop the context the way the
strided engine does (only when it outgrows block_size positions), and run the seed's full forward.
"""

import pytest
import torch

from conftest import TINY
from jaiserve import Engine, SamplingParams

BS = TINY["block_size"]


def prompt_of(length, offset=3):
    return [(offset + 7 * i) % TINY["vocab_size"] for i in range(length)]


@torch.no_grad()
def strided_reference_greedy(reference, prompt, max_tokens, stride):
    keep = BS - stride + 1
    context = list(prompt)
    start = 0 if len(context) <= BS else len(context) - keep
    for _ in range(max_tokens):
        if len(context) - start > BS:  # no position left for the newest token: crop again
            start = len(context) - keep
        logits = reference(torch.tensor([context[start:]]))[0, -1]
        context.append(int(logits.argmax()))
    return context[len(prompt) :]


@pytest.mark.parametrize("stride", [2, 5, BS // 2, BS - 1])
@pytest.mark.parametrize("prompt_len", [1, BS - 1, BS, BS + 7])
def test_strided_greedy_matches_the_strided_reference(tiny_model, tiny_reference, stride, prompt_len):
    prompt = prompt_of(prompt_len)
    engine = Engine(tiny_model, max_batch=2, window_stride=stride)
    [result] = engine.generate([prompt], [SamplingParams(max_tokens=2 * BS + 9, temperature=0)])
    assert result.token_ids == strided_reference_greedy(tiny_reference, prompt, 2 * BS + 9, stride)


def test_stride_one_is_the_seed_crop(tiny_model, tiny_reference):
    prompt = prompt_of(5)
    [result] = Engine(tiny_model, window_stride=1).generate([prompt], [SamplingParams(max_tokens=BS + 20, top_k=1)])
    seed = tiny_reference.generate(torch.tensor([prompt]), BS + 20, temperature=1.0, top_k=1)[0, 5:].tolist()
    assert result.token_ids == seed == strided_reference_greedy(tiny_reference, prompt, BS + 20, 1)


@pytest.mark.parametrize("stride", [1, 4, 16])
def test_one_re_prefill_per_stride_tokens(tiny_model, stride, monkeypatch):
    engine = Engine(tiny_model, window_stride=stride)
    prefills, real = [], engine._prefill

    def counting(reqs):
        prefills.append(len(reqs))
        return real(reqs)

    monkeypatch.setattr(engine, "_prefill", counting)
    engine.generate([[1]], [SamplingParams(max_tokens=BS + 3 * stride, temperature=0)])
    # the prompt, then BS - 1 decodes fill the row (BS tokens in all), then one re-prefill per S tokens
    assert len(prefills) == 1 + 3


def test_windowed_requests_share_the_prefill_budget_and_batch_mates_keep_every_step(tiny_model):
    """Two requests past the window at stride 1 need BS prefill tokens each, every step; a budget of
    BS + 10 fits one: they alternate, while the short requests decode at every step, and every request
    still produces exactly its tokens alone."""
    requests = [(prompt_of(4, 3), 20), (prompt_of(6, 4), 20), (prompt_of(BS + 1, 1), 12), (prompt_of(BS + 3, 2), 12)]
    params = [SamplingParams(max_tokens=n, temperature=0) for _, n in requests]
    alone = [Engine(tiny_model, window_stride=1).generate([p], [q])[0].token_ids
             for (p, _), q in zip(requests, params)]
    engine = Engine(tiny_model, max_batch=4, max_prefill_tokens=BS + 10, window_stride=1)
    for i, ((prompt, _), p) in enumerate(zip(requests, params)):
        engine.add_request(i, prompt, p)
    tokens = {i: [] for i in range(4)}
    first = engine.step()  # 4 + 6 + BS prompt tokens fit; the second window waits (first come, first served)
    assert sorted(o.request_id for o in first) == [0, 1, 2]
    for out in first:
        tokens[out.request_id] += out.token_ids
    while engine.has_work():
        outputs = engine.step()
        ids = [o.request_id for o in outputs]
        if len(tokens[0]) < 20:  # while the short ones run, each gets a token at every step
            assert 0 in ids and 1 in ids
            assert len({2, 3} & set(ids)) == 1  # one window's prefill fits the budget
        for out in outputs:
            tokens[out.request_id] += out.token_ids
    assert [tokens[i] for i in range(4)] == alone


def test_a_new_prompt_is_admitted_before_re_prefills(tiny_model):
    engine = Engine(tiny_model, max_batch=4, max_prefill_tokens=BS, window_stride=1)
    for i in range(2):
        engine.add_request(i, prompt_of(BS + 2, i), SamplingParams(max_tokens=40, temperature=0))
    for _ in range(3):
        engine.step()
    engine.add_request("late", prompt_of(3, 9), SamplingParams(max_tokens=2, temperature=0))
    # both windows wait for a re-prefill and each takes the whole budget; a new prompt goes first, so
    # the late one is admitted at the very next step, and the windows still get one re-prefill a step
    assert "late" in [o.request_id for o in engine.step()]
    assert {0, 1} & {o.request_id for o in engine.step()}


def test_strided_request_is_the_same_alone_and_in_a_staggered_batch(tiny_model):
    cases = [
        (prompt_of(BS + 5, 1), SamplingParams(max_tokens=50, temperature=0)),
        (prompt_of(3, 2), SamplingParams(max_tokens=70, temperature=0.9, top_k=20, seed=3)),
        (prompt_of(BS - 2, 3), SamplingParams(max_tokens=40, temperature=0)),
        (prompt_of(9, 4), SamplingParams(max_tokens=12, temperature=1.1, top_k=None, seed=4)),
        (prompt_of(2 * BS, 5), SamplingParams(max_tokens=30, temperature=0.7, seed=5)),
    ]
    alone = [Engine(tiny_model, window_stride=6).generate([p], [q])[0].token_ids for p, q in cases]
    engine = Engine(tiny_model, max_batch=5, max_prefill_tokens=BS, window_stride=6)
    tokens = {i: [] for i in range(len(cases))}
    step = 0
    while step < len(cases) or engine.has_work():
        if step < len(cases):
            engine.add_request(step, *cases[step])
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        step += 1
    assert [tokens[i] for i in range(len(cases))] == alone


@pytest.mark.parametrize("stride", [0, BS, True, 2.5, None])
def test_window_stride_out_of_range_is_refused(tiny_model, stride):
    with pytest.raises(ValueError, match=rf"window_stride must be an integer in \[1, {BS - 1}\]"):
        Engine(tiny_model, window_stride=stride)
