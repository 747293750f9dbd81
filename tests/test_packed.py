"""oneDNN-packed float32 Linear layers (handler.cpu_linear: onednn): same values as nn.Linear, rows
bit-for-bit the same alone and in any batch, and a whole model that still decodes like the seed."""

import pytest
import torch

from conftest import FULL, TINY
from jaiserve import Engine, GPT, GPTConfig, SamplingParams, load_model
from jaiserve.checkpoint import quantize_int8
from jaiserve.packed import PackedLinear, linear_kernels, pack_linears


def test_every_linear_of_a_float32_cpu_model_is_packed(tiny_ckpt):
    model = load_model(tiny_ckpt[0], n_head=TINY["n_head"])
    packed = [name for name, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert "head" in packed and len(packed) == 1 + 4 * TINY["n_layer"]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linear_kernels(model) == "onednn"


def test_aten_and_bfloat16_keep_torchs_linear(tiny_ckpt):
    for model in (load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten"),
                  load_model(tiny_ckpt[0], n_head=2, dtype="bfloat16")):
        assert isinstance(model.head, torch.nn.Linear) and linear_kernels(model) == "aten"


def test_unknown_cpu_linear_is_refused(tiny_ckpt):
    with pytest.raises(ValueError, match="cpu_linear must be one of"):
        load_model(tiny_ckpt[0], n_head=2, cpu_linear="mkl")


def test_int8_refuses_a_packed_model(tiny_model):
    with pytest.raises(ValueError, match="cpu_linear='aten'"):
        quantize_int8(tiny_model)


@pytest.mark.parametrize("shape", [(384, 1152, True), (1536, 384, True), (384, 24000, False)])
def test_packed_linear_matches_nn_linear(shape):
    torch.manual_seed(0)
    fan_in, fan_out, bias = shape
    linear = torch.nn.Linear(fan_in, fan_out, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(2, 5, fan_in)  # any leading shape, as attention and the head pass
    with torch.inference_mode():
        expected, got = linear(x), packed(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_packed_rows_are_bitwise_the_same_alone_and_in_any_batch():
    torch.manual_seed(1)
    layer = PackedLinear(torch.nn.Linear(384, 1152))
    head = PackedLinear(torch.nn.Linear(384, 2400, bias=False))
    x = torch.randn(1, 384)
    for module in (layer, head):
        with torch.inference_mode():
            alone = module(x)[0]
            for rows in (2, 3, 8, 31, 64, 65, 200):
                mates = torch.randn(rows - 1, 384) * 10
                assert torch.equal(module(torch.cat([mates, x]))[-1], alone), rows
                assert torch.equal(module(torch.cat([x, mates]))[0], alone), rows


def test_a_request_decodes_the_same_logits_alone_and_among_batch_mates(tiny_model):
    """The engine's greedy tokens do not move with the batch (the tiny model, packed)."""
    prompts = [[5, 6, 7], [9] * 11, [3, 1, 4, 1, 5, 9, 2, 6], [100]]
    params = SamplingParams(max_tokens=25, top_k=1)
    alone = [Engine(tiny_model, max_batch=4).generate([p], [params])[0].token_ids for p in prompts]
    together = Engine(tiny_model, max_batch=4).generate(prompts, [params] * len(prompts))
    assert [c.token_ids for c in together] == alone


def test_parameter_count_comes_from_the_config_whatever_the_layout(tiny_ckpt):
    for shape in (TINY, FULL):
        config = GPTConfig(**shape)
        assert config.num_parameters == sum(p.numel() for p in GPT(config).parameters())
    packed = load_model(tiny_ckpt[0], n_head=2)
    assert packed.num_parameters() == sum(p.numel() for p in load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten").parameters())


def test_pack_leaves_other_devices_alone():
    model = GPT(GPTConfig(**TINY)).to("meta")
    assert pack_linears(model) is model and isinstance(model.head, torch.nn.Linear)
