"""scripts/export_gguf.py: the GGUF file holds our tensors and tokenizer, and llama.cpp runs it like we do.

The llama.cpp tests run llama-server built from PyPI's llama-cpp-python sources, once per machine
(scripts/llama_server.py --portable; `make test` builds it before the suite).
"""

import json

import gguf
import numpy as np
import pytest
import requests

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer
from scripts import llama_server
from scripts.export_gguf import export

CHAT = "[QUESTION]\n{}\n[/QUESTION]\n\n[ANSWER]\n"  # the seed's /chat wrapping
QUESTIONS = ["서울에서 React 개발자 채용 있어?", "판교 백엔드 개발자 공고 보여줘", "부산 데이터 엔지니어 연봉은?",
             "원격으로 iOS 개발자 구해?"]


def fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_ckpt, korean_tokenizer):
    directory = tmp_path_factory.mktemp("gguf")
    korean_tokenizer.save(str(directory / "tokenizer.json"))
    return directory, export(tiny_ckpt[0], directory / "tokenizer.json", directory / "tiny.gguf", n_head=2)


def test_f32_export_holds_every_tensor_and_the_architecture(tiny_gguf, tiny_ckpt):
    _, path = tiny_gguf
    reader = gguf.GGUFReader(path)
    meta = fields(reader)
    assert meta["general.architecture"] == "gpt2"
    assert (meta["gpt2.block_count"], meta["gpt2.embedding_length"], meta["gpt2.context_length"]) == (2, 32, 32)
    assert (meta["gpt2.attention.head_count"], meta["gpt2.feed_forward_length"]) == (2, 128)
    tensors = {t.name: t for t in reader.tensors}
    state = load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten").state_dict()
    assert len(tensors) == len(state) == 4 + 2 * 12 + 1  # embeddings, ln_f, head; 12 per block
    checks = {"tok_emb.weight": "token_embd.weight", "head.weight": "output.weight",
              "blocks.1.attn.c_attn.weight": "blk.1.attn_qkv.weight", "blocks.1.attn.c_attn.bias": "blk.1.attn_qkv.bias",
              "blocks.0.mlp.c_fc.weight": "blk.0.ffn_up.weight", "blocks.0.mlp.c_proj.weight": "blk.0.ffn_down.weight",
              "blocks.0.ln_2.bias": "blk.0.ffn_norm.bias", "ln_f.weight": "output_norm.weight"}
    for ours, theirs in checks.items():
        np.testing.assert_array_equal(np.asarray(tensors[theirs].data).reshape(state[ours].shape), state[ours].numpy())
    # ggml lists dimensions innermost first: a (out, in) Linear weight is {in, out}
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [32, 128]


def test_tokenizer_round_trips_with_special_and_marker_tokens(tiny_gguf, korean_tokenizer):
    _, path = tiny_gguf
    meta = fields(gguf.GGUFReader(path))
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert len(tokens) == 512  # the model's rows; the tokenizer has fewer ids
    for token, i in korean_tokenizer.get_vocab(with_added_tokens=True).items():
        assert tokens[i] == token
    eot, question = korean_tokenizer.token_to_id("<|endoftext|>"), korean_tokenizer.token_to_id("[QUESTION]")
    assert types[eot] == gguf.TokenType.CONTROL and types[question] == gguf.TokenType.USER_DEFINED
    assert types[511] == gguf.TokenType.UNUSED and tokens[511] == "[PAD511]"
    assert meta["tokenizer.ggml.eos_token_id"] == eot and meta["tokenizer.ggml.add_bos_token"] is False
    merges = json.loads(korean_tokenizer.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 100


def test_q8_0_export_is_close_to_float32(tiny_gguf, tiny_ckpt):
    directory, _ = tiny_gguf
    path = export(tiny_ckpt[0], directory / "tokenizer.json", directory / "tiny-q8.gguf", "q8_0", n_head=2)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    weight = load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten").blocks[0].mlp.c_fc.weight.detach().numpy()
    stored = tensors["blk.0.ffn_up.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q8_0
    restored = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(weight.shape)
    # q8_0: blocks of 32 values sharing one scale, 127 steps each side
    assert np.abs(restored - weight).max() <= np.abs(weight).max() / 127
    assert tensors["blk.0.ffn_up.bias"].tensor_type == gguf.GGMLQuantizationType.F32


def test_bf16_export_rounds_the_linear_weights_to_bfloat16(tiny_gguf, tiny_ckpt):
    """What peer_bench serves beside dtype: bfloat16 (the same weights JAI's bfloat16 Linear layers use)."""
    directory, _ = tiny_gguf
    path = export(tiny_ckpt[0], directory / "tokenizer.json", directory / "tiny-bf16.gguf", "bf16", n_head=2)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    weight = load_model(tiny_ckpt[0], n_head=2, cpu_linear="aten").blocks[0].mlp.c_fc.weight.detach()
    stored = tensors["blk.0.ffn_up.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.BF16
    restored = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(weight.shape)
    assert np.array_equal(restored, weight.bfloat16().float().numpy())  # round to nearest even, as torch
    assert tensors["blk.0.ffn_up.bias"].tensor_type == gguf.GGMLQuantizationType.F32


# ----- llama.cpp itself -----


@pytest.fixture(scope="module")
def llama_binary(tmp_path_factory):
    """The portable build `make test` made and checked (scripts/llama_server.py --portable), or one made now:
    one build whatever the CPU (the native one may not run a quantized model, and a second build costs CI
    minutes)."""
    directory = tmp_path_factory.mktemp("llama")
    return llama_server.working_binary(llama_server.check_models(directory), directory, portable=True)


@pytest.fixture(scope="module")
def demo_in_llama(llama_binary, demo_build, tmp_path_factory):
    directory = tmp_path_factory.mktemp("demo-gguf")
    path = export(demo_build.checkpoint, demo_build.tokenizer, directory / "jai.gguf")
    with llama_server.running(llama_binary, path, directory / "llama.log", slots=2) as server:
        yield server


def test_llama_cpp_tokenizes_like_our_tokenizer(demo_in_llama, demo_build):
    tokenizer = load_tokenizer(demo_build.tokenizer)
    for text in [CHAT.format(q) for q in QUESTIONS] + ["경력 5년 이상, 연봉 6,500만~9,000만 원 (주 2일 재택)"]:
        theirs = requests.post(f"{demo_in_llama.base}/tokenize", json={"content": text}, timeout=30).json()["tokens"]
        assert theirs == tokenizer.encode(text).ids, text


def test_llama_cpp_greedy_tokens_equal_ours(demo_in_llama, demo_build):
    tokenizer = load_tokenizer(demo_build.tokenizer)
    engine = Engine(load_model(demo_build.checkpoint), tokenizer, max_batch=4)
    prompts = [tokenizer.encode(CHAT.format(q)).ids for q in QUESTIONS]
    ours = engine.generate(prompts, [SamplingParams(max_tokens=48, temperature=0)] * len(prompts))
    for prompt, mine in zip(prompts, ours):
        response = requests.post(f"{demo_in_llama.base}/completion", timeout=60, json={
            "prompt": prompt, "n_predict": len(mine.token_ids), "temperature": 0, "return_tokens": True,
            "cache_prompt": False})
        response.raise_for_status()
        assert response.json()["tokens"] == mine.token_ids, tokenizer.decode(prompt)
    assert sum(len(c.token_ids) for c in ours) >= 4 * 20  # real answers, not an immediate end of text
