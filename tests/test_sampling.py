"""Sampling parameters: validation at the edge, and the seed's temperature/top-k order."""

import math

import pytest
import torch

from jaiserve import Engine, Limits, ParameterError, SamplingParams
from jaiserve.sampling import sample


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k must be >= 1, got 0"),
        (dict(top_k=True), "top_k must be an integer or null, got True"),
        (dict(top_k=2.5), "top_k must be an integer or null, got 2.5"),
        (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
        (dict(max_tokens="5"), "max_tokens must be an integer, got '5'"),
        (dict(max_tokens=True), "max_tokens must be an integer, got True"),
        (dict(temperature=-0.1), "temperature must be >= 0, got -0.1"),
        (dict(temperature=math.nan), "temperature must be a finite number, got nan"),
        (dict(temperature=math.inf), "temperature must be a finite number, got inf"),
        (dict(temperature="hot"), "temperature must be a finite number, got 'hot'"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(seed=-1), "seed must be in [0, 2**63), got -1"),
        (dict(seed=1.0), "seed must be an integer or null, got 1.0"),
        (dict(stop=[1]), "stop must be a string or a list of strings, got [1]"),
        (dict(stop=[""]), "stop must not contain an empty string"),
    ],
)
def test_bad_parameters_raise_with_field_and_value(kwargs, message):
    with pytest.raises(ParameterError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message
    assert err.value.field == next(iter(kwargs))


def test_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="[/ANSWER]").stop == ("[/ANSWER]",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_configured_limits_are_enforced_by_the_engine(tiny_model):
    engine = Engine(tiny_model, limits=Limits(max_tokens=100, max_prompt_tokens=10))
    with pytest.raises(ParameterError, match="max_tokens must be <= 100, got 101"):
        engine.add_request(0, [1], SamplingParams(max_tokens=101))
    ok = SamplingParams(max_tokens=100)
    with pytest.raises(ParameterError, match="prompt is 11 tokens, longer than the limit of 10"):
        engine.add_request(0, [1] * 11, ok)
    with pytest.raises(ParameterError, match="prompt must encode to at least one token"):
        engine.add_request(0, [], ok)
    with pytest.raises(ParameterError, match=r"prompt has token ids outside \[0, 512\)"):
        engine.add_request(0, [512], ok)
    assert not engine.has_work()


def test_top_k_only_samples_among_the_k_largest():
    logits = torch.randn(1, 1000)
    allowed = set(torch.topk(logits, 5).indices[0].tolist())
    params = [SamplingParams(temperature=2.0, top_k=5)]
    seen = {int(sample(logits, params, [None])[0]) for _ in range(300)}
    assert seen <= allowed and len(seen) > 1


def test_top_k_keeps_ties_like_the_seed():
    logits = torch.full((1, 50), -10.0)
    logits[0, :4] = 3.0  # four-way tie at the top: the seed's top_k=2 keeps all four
    params = [SamplingParams(temperature=1.0, top_k=2)]
    seen = {int(sample(logits, params, [None])[0]) for _ in range(300)}
    assert seen == {0, 1, 2, 3}


def test_a_tie_past_k_widens_only_its_row_and_seeded_draws_repeat_in_any_batch():
    """Coarse logits (bfloat16 Linear layers) tie often: the tied row keeps every token equal to its k-th
    largest, like the seed, and its seeded draw is the same alone and next to other rows."""
    torch.manual_seed(0)
    tied = torch.full((1, 500), -10.0)
    tied[0, 100:130] = 2.0  # 30 tokens tie for the top: top_k=5 keeps all 30
    other = torch.randn(3, 500)
    params = SamplingParams(temperature=1.0, top_k=5, seed=3)
    seen = {int(sample(tied, [params], [torch.Generator().manual_seed(s)])[0]) for s in range(400)}
    assert seen == set(range(100, 130))
    alone = [int(sample(tied, [params], [torch.Generator().manual_seed(s)])[0]) for s in range(20)]
    batched = []
    for s in range(20):
        generators = [None, torch.Generator().manual_seed(s), None, None]
        batched.append(int(sample(torch.cat([other[:1], tied, other[1:]]), [SamplingParams(top_k=5)] + [params] +
                                  [SamplingParams(top_k=5, temperature=0.5)] * 2, generators)[1]))
    assert batched == alone


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = [SamplingParams(temperature=1.0, top_k=None, top_p=0.7)]
    seen = {int(sample(probs.log(), params, [None])[0]) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7, so the second token is needed; the third is not


def test_greedy_rows_take_the_argmax_and_seeds_repeat():
    logits = torch.randn(3, 300)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(top_k=1, temperature=3.0),
    ]
    first = sample(logits, params, [None, torch.Generator().manual_seed(5), None])
    again = sample(logits, params, [None, torch.Generator().manual_seed(5), None])
    assert first[0] == logits[0].argmax() and first[2] == logits[2].argmax()
    assert torch.equal(first, again)


def test_batched_draw_is_torch_multinomial_for_each_seeded_row():
    """The batched exponential race draws, for a seeded row, exactly what torch.multinomial draws from
    the same generator over the row's own entries, and leaves the generator in the same state."""
    from jaiserve.sampling import _draw

    torch.manual_seed(0)
    for trial in range(50):
        rows, width = int(torch.randint(1, 6, ())), int(torch.randint(2, 80, ()))
        probs = torch.softmax(3 * torch.randn(rows, width), dim=-1)
        widths = [int(torch.randint(1, width + 1, ())) for _ in range(rows)]
        for j, w in enumerate(widths):
            probs[j, w:] = 0  # past a row's own width (top_k rows in a batch with a larger k)
        ours = [torch.Generator().manual_seed(100 * trial + j) for j in range(rows)]
        theirs = [torch.Generator().manual_seed(100 * trial + j) for j in range(rows)]
        generators = [g if j % 3 else None for j, g in enumerate(ours)]  # some rows unseeded
        drawn = _draw(probs, generators, widths).tolist()
        for j, g in enumerate(generators):
            if g is not None:
                assert drawn[j] == int(torch.multinomial(probs[j, : widths[j]], 1, generator=theirs[j]))
                assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=theirs[j]))
            else:
                assert drawn[j] < widths[j]  # an unseeded row never lands past its width
