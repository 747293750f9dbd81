"""oneDNN-packed float32 Linear layers (handler.cpu_linear: onednn): same values as nn.Linear, rows
bit-for-bit the same alone and in any batch, and a whole model that still decodes like the seed. And
``dtype: bfloat16`` on CPU: bfloat16 Linear weights (packed, or torch's GEMM), everything else float32."""

import pytest
import torch

from conftest import FULL, TINY
from jaiserve import Engine, GPT, GPTConfig, SamplingParams, load_model
from jaiserve.checkpoint import quantize_int8
from jaiserve.packed import Bfloat16Linear, PackedLinear, bfloat16_available, linear_kernels, pack_linears


def test_every_linear_of_a_float32_cpu_model_is_packed(tiny_ckpt):
    model = load_model(tiny_ckpt[0], n_head=TINY["n_head"])
    packed = [name for name, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert "head" in packed and len(packed) == 1 + 4 * TINY["n_layer"]
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linear_kernels(model) == "onednn"


def test_aten_keeps_torchs_linear(tiny_ckpt):
    model = load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten")
    assert isinstance(model.head, torch.nn.Linear) and linear_kernels(model) == "aten"


def test_bfloat16_on_cpu_gives_the_linear_layers_bfloat16_weights_and_keeps_the_rest_float32(tiny_ckpt):
    packed = "onednn-bfloat16" if bfloat16_available() else "aten-bfloat16"
    for cpu_linear, kernels in (("onednn", packed), ("aten", "aten-bfloat16")):
        model = load_model(tiny_ckpt[0], n_head=2, dtype="bfloat16", cpu_linear=cpu_linear)
        assert linear_kernels(model) == kernels
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # embeddings, LayerNorms
        engine = Engine(model)
        assert engine.cache.k.dtype == torch.float32


# the packed kind where oneDNN has bfloat16 kernels for this CPU (AVX-512 and up); torch's GEMM everywhere
@pytest.mark.parametrize("kind", ["aten"] + (["packed"] if bfloat16_available() else []))
@pytest.mark.parametrize("shape", [(384, 1152, True), (1536, 384, True), (384, 2400, False)])
def test_bfloat16_linear_is_the_product_of_bfloat16_inputs_and_weights_in_float32(kind, shape):
    torch.manual_seed(0)
    fan_in, fan_out, bias = shape
    linear = torch.nn.Linear(fan_in, fan_out, bias=bias)
    module = PackedLinear(linear, torch.bfloat16) if kind == "packed" else Bfloat16Linear(linear)
    x = torch.randn(2, 5, fan_in)
    with torch.inference_mode():
        got = module(x)
        exact = x.bfloat16().float() @ linear.weight.bfloat16().float().t()  # float32 sums of the rounded operands
        exact = exact + (linear.bias if bias else 0)
    assert got.dtype == torch.float32 and got.shape == (2, 5, fan_out)
    # the product comes back rounded to bfloat16 (8 significant bits), the bias is added in float32
    torch.testing.assert_close(got, exact, rtol=2**-7, atol=1e-3)


def test_a_bfloat16_model_decodes_mostly_like_float32(tiny_ckpt):
    prompt, params = [5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=16, top_k=1)
    full = Engine(load_model(tiny_ckpt[0], n_head=2)).generate([prompt], [params])[0].token_ids
    half = Engine(load_model(tiny_ckpt[0], n_head=2, dtype="bfloat16")).generate([prompt], [params])[0].token_ids
    assert len(half) == 16 and half[:2] == full[:2]  # rounding may change later greedy choices


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


def test_a_packed_model_applies_gelu_inside_the_mlp_input_product(tiny_ckpt):
    """pack_linears gives GELU to oneDNN (one operator call less per block): same values as the layer
    followed by nn.GELU, rows still the same alone and in any batch."""
    model = load_model(tiny_ckpt[0], n_head=TINY["n_head"])
    for block in model.blocks:
        assert block.mlp.c_fc.post_op[0] == "gelu" and isinstance(block.mlp.gelu, torch.nn.Identity)
        assert block.mlp.c_proj.post_op[0] == "none" and block.attn.c_attn.post_op[0] == "none"
    torch.manual_seed(2)
    linear = torch.nn.Linear(384, 1536)
    fused = PackedLinear(linear)
    fused.fuse_gelu()
    x = torch.randn(7, 384) * 3
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), torch.nn.functional.gelu(linear(x)), rtol=1e-5, atol=1e-5)
        assert torch.equal(fused(x[:1]), fused(x)[:1])


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
