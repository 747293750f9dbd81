"""``dtype: int8``: int8 weights (one scale per output channel) and per-row int8 activations, so an
int8 request's tokens are the same alone and in any batch."""

import itertools
import json
import shutil

import pytest
import torch
from ts.context import Context, RequestProcessor

import jai_handler
from jaiserve import Engine, SamplingParams, load_model, load_tokenizer
from jaiserve.checkpoint import quantize_int8
from jaiserve.int8 import Int8Linear
from scripts.make_demo_model import HELD_OUT_QUESTIONS, PLACES, chat_prompt, held_out_pairs


@pytest.fixture(scope="module")
def int8_model(tiny_ckpt):
    return load_model(tiny_ckpt[0], n_head=2, dtype="int8")


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    """The float32 model int8 starts from: torch's own nn.Linear layers, not the oneDNN-packed ones."""
    return load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten")


def test_every_linear_is_quantized_and_the_rest_stays_float32(int8_model, tiny_model):
    linears = [name for name, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = {name: m for name, m in int8_model.named_modules() if name in linears}
    assert "head" in linears and len(linears) == 1 + 4 * tiny_model.config.n_layer
    assert all(type(m) is Int8Linear for m in quantized.values())
    assert not any(isinstance(m, torch.nn.Linear) for m in int8_model.modules())
    assert {p.dtype for p in int8_model.parameters()} == {torch.float32}  # embeddings, LayerNorms, biases


@pytest.mark.parametrize("bias", [True, False])
def test_the_activation_grid_is_the_one_linear_dynamic_picks_for_minus_one_to_one(bias):
    """Int8Linear gives fbgemm its activation grid; quantized::linear_dynamic derives one from the
    input's min and max. With every row scaled into [-1, 1] and a row spanning exactly [-1, 1] added,
    it must derive the same grid: the outputs are equal bit for bit (the head has no bias)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 20, bias=bias)
    x = torch.randn(6, 48) * torch.tensor([1e-3, 0.1, 1, 3, 50, 1e4])[:, None]
    x[2] = 0.0  # an all-zero row
    layer = Int8Linear(linear)
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    span = torch.zeros(1, 48)
    span[0, :2] = torch.tensor([1.0, -1.0])
    y = torch.ops.quantized.linear_dynamic(torch.cat([x / scale, span]), layer._packed, reduce_range=True)[:-1]
    expected = y * scale if linear.bias is None else torch.addcmul(layer.bias, y, scale)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)


def test_int8_linear_is_close_to_float32_with_a_scale_per_output_channel():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight[0] *= 100  # one large output channel must not coarsen the others
    x = torch.randn(5, 3, 64)
    with torch.inference_mode():
        exact, approx = linear(x), Int8Linear(linear)(x)
    assert approx.shape == exact.shape
    for channels in (slice(0, 1), slice(1, None)):  # one scale for all would make the small ones coarse
        error = (approx[..., channels] - exact[..., channels]).norm() / exact[..., channels].norm()
        assert error < 0.03, (channels, error)


def test_int8_linear_rows_are_bitwise_the_same_alone_and_in_any_batch(tiny_model):
    """PyTorch's dynamic quantization scales activations per batch, so a batch-mate with larger
    activations changed a row's output; per-row scales make each row's output its own."""
    layer = Int8Linear(tiny_model.blocks[0].attn.c_attn)
    torch.manual_seed(1)
    x = torch.randn(1, 1, tiny_model.config.n_embd)
    mates = [10 * torch.randn(3, 1, tiny_model.config.n_embd), 1e-3 * torch.randn(7, 1, tiny_model.config.n_embd),
             torch.zeros(2, 1, tiny_model.config.n_embd)]
    with torch.inference_mode():
        alone = layer(x)[0]
        for mate in mates:
            assert torch.equal(layer(torch.cat([mate, x]))[-1], alone)
            assert torch.equal(layer(torch.cat([x, mate]))[0], alone)


def test_int8_requests_are_the_same_alone_and_in_a_staggered_batch(int8_model):
    cases = [
        ([1, 2, 3], SamplingParams(max_tokens=30, temperature=0)),
        ([7], SamplingParams(max_tokens=20, temperature=0.9, top_k=20, seed=1)),
        ([5, 9, 11, 13, 2] * 5, SamplingParams(max_tokens=40, temperature=0)),  # past the 32-token window
        ([4, 4], SamplingParams(max_tokens=25, temperature=1.2, top_k=None, seed=2)),
    ]
    alone = [Engine(int8_model).generate([p], [q])[0].token_ids for p, q in cases]
    engine = Engine(int8_model, max_batch=4)
    tokens = {i: [] for i in range(len(cases))}
    for step in itertools.count():
        if step < len(cases):
            engine.add_request(step, *cases[step])
        elif not engine.has_work():
            break
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert [tokens[i] for i in range(len(cases))] == alone


def test_quantized_model_generates_with_a_float32_cache(int8_model, tiny_model):
    engine = Engine(int8_model, max_batch=4)
    assert engine.dtype == torch.float32 and engine.cache.k.dtype == torch.float32
    prompts = [[1, 2, 3], [7], [5, 9, 11, 13, 2]]
    params = [SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=5, temperature=0.8, seed=1),
              SamplingParams(max_tokens=40, temperature=0)]  # 5 + 40 > block_size 32: the window path too
    results = engine.generate(prompts, params)
    assert [len(r.token_ids) for r in results] == [12, 5, 40]
    assert all(0 <= t < int8_model.config.vocab_size for r in results for t in r.token_ids)
    ids = torch.tensor([prompts[2]])
    with torch.inference_mode():  # quantized logits stay close to float32 ones
        assert torch.allclose(int8_model(ids), tiny_model(ids), atol=0.05 * tiny_model(ids).abs().max().item())


def test_quantize_refuses_a_model_off_the_cpu(tiny_model):
    meta = type(tiny_model)(tiny_model.config).to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        quantize_int8(meta)


def test_unknown_dtype_name_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model(tiny_ckpt[0], n_head=2, dtype="float16")


def test_handler_serves_dtype_int8(tmp_path, tiny_ckpt, korean_tokenizer, tiny_model):
    shutil.copy(tiny_ckpt[0], tmp_path / "ckpt.pt")
    korean_tokenizer.save(str(tmp_path / "tokenizer.json"))
    yaml = {"batchSize": 2, "handler": {"n_head": 2, "threads": 1, "dtype": "int8"}}
    context = Context("jai", str(tmp_path), {}, 2, None, "0.12.0", model_yaml_config=yaml)
    handler = jai_handler.JAIHandler()
    handler.initialize(context)
    described = json.loads(handler.describe_handle())
    assert described["dtype"] == "int8" and described["parameters"] == tiny_model.num_parameters()
    assert described["linear_kernels"] == "int8"
    assert isinstance(handler.engine.model.head, Int8Linear)
    body = {"prompt": "서울 채용", "max_tokens": 6, "temperature": 0}
    context.request_ids = {0: "a"}
    context.request_processor = [RequestProcessor({})]
    reply = json.loads(handler.handle([{"body": body}], context)[0])
    expected = Engine(load_model(tiny_ckpt[0], n_head=2, dtype="int8"), load_tokenizer(tmp_path / "tokenizer.json"))
    prompt = expected.encode("서울 채용")
    assert reply["generated"] == expected.generate([prompt], [SamplingParams(max_tokens=6, temperature=0)])[0].text
    assert reply["usage"]["completion_tokens"] == 6


def test_demo_model_greedy_mostly_agrees_with_float32(demo_build):
    """On the trained demo model, greedy answers to unseen questions mostly match float32 token for token.
    Not all: where float32 itself is nearly indifferent (which company, which salary), int8 can flip."""
    places = {p.name: p for p in PLACES}
    questions = [q.format(where=places[name].where, place=name, role=role)
                 for name, role in sorted(held_out_pairs()) for q in HELD_OUT_QUESTIONS]
    tokens = {}
    for dtype in ("float32", "int8"):
        engine = Engine(load_model(demo_build.checkpoint, dtype=dtype), load_tokenizer(demo_build.tokenizer),
                        max_batch=len(questions))
        prompts = [engine.encode(chat_prompt(q)) for q in questions]
        params = [SamplingParams(max_tokens=32, temperature=0)] * len(prompts)
        tokens[dtype] = [r.token_ids for r in engine.generate(prompts, params)]
    prefix = [sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(a, b))) / max(len(a), len(b))
              for a, b in zip(tokens["float32"], tokens["int8"])]
    identical = sum(a == b for a, b in zip(tokens["float32"], tokens["int8"]))
    assert sum(prefix) / len(prefix) >= 0.7, prefix
    assert identical >= len(questions) // 2, identical
