"""Write a JAI checkpoint and its tokenizer as one GGUF file that llama.cpp (and Ollama) load.

    python scripts/export_gguf.py [--checkpoint checkpoints/ckpt.pt] [--tokenizer data/tokenizer.json]
                                  [--out jai.gguf] [--outtype f32|f16|bf16|q8_0] [--n-head 6]

JAI is GPT-2's architecture (learned positions, pre-LN blocks, fused QKV, GELU MLP, biases everywhere),
so the file uses llama.cpp's ``gpt2`` architecture; only the head is untied, which ``gpt2`` allows
(``output.weight``). Our ``nn.Linear`` weights are ``(out, in)``, the layout ggml's ``{in, out}`` names,
so no tensor is transposed. The tokenizer is the Hugging Face byte-level BPE: its vocabulary, merges and
special tokens go in as a ``gpt2`` tokenizer with GPT-2's pre-tokenizer regex (the one ``ByteLevel``
uses); ids past the tokenizer's size (the model may have more rows) are padded as unused tokens.

One difference stays: llama.cpp's ``gpt2`` graph computes GELU with the tanh approximation, JAI with the
exact erf, so logits differ by ~1e-3. Greedy tokens agree where the model is decided (the demo model:
tests/test_gguf.py); ``f32`` keeps everything else exact, ``f16``/``bf16``/``q8_0`` trade accuracy for size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "handler"))

from jaiserve.checkpoint import load_model, load_tokenizer  # noqa: E402
from jaiserve.engine import _find_eos  # noqa: E402

try:
    import gguf
except ImportError:  # pragma: no cover - a set-up error, said plainly
    sys.exit("export_gguf.py needs the gguf package: .venv/bin/pip install -r requirements-dev.txt")

OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
# llama.cpp's /v1/chat/completions (and Ollama) format messages with this: the seed's /chat wrapping, each past
# answer closed by [/ANSWER] as jaiserve/openai_api.py does; generation then stops at the "[/ANSWER]" stop string
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[QUESTION]\n{{ message['content'] }}\n[/QUESTION]\n\n[ANSWER]\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n[/ANSWER]\n\n{% endif %}"
    "{% endfor %}"
)
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which JAI trains with

# our parameter name -> (llama.cpp tensor, its suffix); blocks.N.* maps per layer
_GLOBAL = {
    "tok_emb.weight": (gguf.MODEL_TENSOR.TOKEN_EMBD, "weight"),
    "pos_emb.weight": (gguf.MODEL_TENSOR.POS_EMBD, "weight"),
    "ln_f.weight": (gguf.MODEL_TENSOR.OUTPUT_NORM, "weight"),
    "ln_f.bias": (gguf.MODEL_TENSOR.OUTPUT_NORM, "bias"),
    "head.weight": (gguf.MODEL_TENSOR.OUTPUT, "weight"),
}
_BLOCK = {
    "ln_1": gguf.MODEL_TENSOR.ATTN_NORM,
    "attn.c_attn": gguf.MODEL_TENSOR.ATTN_QKV,
    "attn.c_proj": gguf.MODEL_TENSOR.ATTN_OUT,
    "ln_2": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.c_fc": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.c_proj": gguf.MODEL_TENSOR.FFN_DOWN,
}
# the Linear weights (and the embedding) are what f16 / q8_0 shrink; norms, biases and positions stay f32
_QUANTIZABLE = {gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT, gguf.MODEL_TENSOR.ATTN_QKV,
                gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN}


def gguf_name(key: str) -> tuple[str, gguf.MODEL_TENSOR]:
    """``blocks.3.attn.c_attn.weight`` -> (``blk.3.attn_qkv.weight``, ATTN_QKV)."""
    if key in _GLOBAL:
        tensor, suffix = _GLOBAL[key]
        return f"{gguf.TENSOR_NAMES[tensor]}.{suffix}", tensor
    _, layer, rest = key.split(".", 2)
    module, suffix = rest.rsplit(".", 1)
    tensor = _BLOCK[module]
    return f"{gguf.TENSOR_NAMES[tensor].format(bid=int(layer))}.{suffix}", tensor


def tokenizer_fields(tokenizer_path: Path, vocab_size: int) -> dict:
    """The ``tokenizer.ggml.*`` values of a Hugging Face byte-level BPE, padded to ``vocab_size`` ids."""
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise SystemExit(f"{tokenizer_path}: a {model.get('type')} tokenizer; GGUF export knows byte-level BPE")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):  # special: never in decoded text; else kept as text
        i = added["id"]
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp refuses a gpt2 tokenizer without merges and GGUF stores no empty list: a vocabulary without
    # any (bench/load_bench.py's whole-word tokens) gets one merge of two NUL bytes, which no text contains
    merges = merges or ["\u0100 \u0100"]  # byte-level BPE writes byte 0 as U+0100
    return {"tokens": tokens, "types": types, "merges": merges}


def export(checkpoint: Path, tokenizer_path: Path, out: Path, outtype: str = "f32", n_head: int = 6) -> Path:
    checkpoint, tokenizer_path, out = Path(checkpoint), Path(tokenizer_path), Path(out)
    model = load_model(checkpoint, n_head=n_head, cpu_linear="aten")  # plain nn.Linear: its state dict
    config = model.config
    tokenizer = load_tokenizer(tokenizer_path, config.vocab_size)
    vocab = tokenizer_fields(tokenizer_path, config.vocab_size)
    eos = _find_eos(tokenizer)

    writer = gguf.GGUFWriter(str(out), "gpt2")
    writer.add_name(f"JAI ({checkpoint.name})")
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: what tokenizers' ByteLevel pre-tokenizer uses
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_add_bos_token(False)  # JAI prompts start with their first text token, as trained
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_bos_token_id(eos)  # GPT-2's convention; never added (add_bos_token false)

    for key, tensor in model.state_dict().items():
        name, kind = gguf_name(key)
        data = tensor.detach().to(torch.float32).numpy()
        qtype = OUTTYPES[outtype] if kind in _QUANTIZABLE and data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if qtype == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        elif qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if qtype != gguf.GGMLQuantizationType.F32 else None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/ckpt.pt"))
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer.json"))
    parser.add_argument("--out", type=Path, default=Path("jai.gguf"))
    parser.add_argument("--outtype", choices=list(OUTTYPES), default="f32")
    parser.add_argument("--n-head", type=int, default=6, help="only when the checkpoint does not store its config")
    args = parser.parse_args()
    out = export(args.checkpoint, args.tokenizer, args.out, args.outtype, args.n_head)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.outtype})")


if __name__ == "__main__":
    main()
