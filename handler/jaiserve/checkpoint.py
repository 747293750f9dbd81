"""Loading a trained checkpoint and its tokenizer, with errors that name the file, key and shapes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .int8 import quantize_int8
from .model import GPT, GPTConfig
from .packed import CPU_LINEARS, bfloat16_linears, pack_linears

# The seed registers each block's causal mask as a buffer; we build masks on the fly instead.
_SEED_MASK_BUFFER = re.compile(r"^blocks\.\d+\.attn\.bias$")
_COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the module and prefixes every key
_CONFIG_KEYS = ("config", "model_args")
_CONFIG_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
# handler.dtype; on CPU int8 and bfloat16 change the Linear layers only (int8.py, packed.py), the rest stays float32
DTYPES = ("float32", "bfloat16", "int8")


class CheckpointError(ValueError):
    """A checkpoint or tokenizer file that cannot serve this model; the message says why."""


def load_model(path, n_head: int = 6, device="cpu", dtype=torch.float32, cpu_linear: str = "onednn") -> GPT:
    """Build a GPT from ``path`` (``{"model": state_dict}``, a bare state dict, or nanoGPT-style).

    The architecture comes from the checkpoint's ``config``/``model_args`` when present, otherwise from
    the tensor shapes; ``n_head`` is used only when the checkpoint does not say. ``dtype`` is a torch
    dtype or one of ``DTYPES``; ``"int8"`` loads in float32 and then applies ``int8.quantize_int8``;
    ``"bfloat16"`` on CPU loads in float32 and gives the Linear layers bfloat16 weights
    (``packed.bfloat16_linears``), elsewhere the whole model is bfloat16 (as a torch dtype is, anywhere).
    ``cpu_linear`` is one of ``CPU_LINEARS``: float32 on CPU packs its Linear layers for oneDNN
    (``packed.py``) unless it is ``"aten"``.
    """
    if cpu_linear not in CPU_LINEARS:
        raise ValueError(f"cpu_linear must be one of {CPU_LINEARS}, got {cpu_linear!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == "int8":
            return quantize_int8(load_model(path, n_head, device, torch.float32, cpu_linear="aten"))
        if dtype == "bfloat16" and torch.device(device).type == "cpu":
            return bfloat16_linears(load_model(path, n_head, device, torch.float32, cpu_linear="aten"), cpu_linear)
        dtype = getattr(torch, dtype)
    path = Path(path)
    state, stored_config = _read_state_dict(path)
    config = _config_from(state, stored_config, n_head, path)
    model = GPT(config)
    _check_keys_and_shapes(model, state, path)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    return pack_linears(model) if cpu_linear == "onednn" else model


def load_tokenizer(path, vocab_size: int | None = None) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json``; refuse one whose ids do not fit the model's embedding."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{path}: not a tokenizers JSON file ({exc})") from exc
    if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model's tok_emb has "
            f"{vocab_size} rows; this tokenizer was not trained with this checkpoint"
        )
    return tokenizer


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_state_dict(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read by torch.load(weights_only=True): {exc}") from exc
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(blob).__name__}")
    stored_config = next((blob[k] for k in _CONFIG_KEYS if isinstance(blob.get(k), dict)), None)
    state = blob["model"] if "model" in blob else blob
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    state = {
        key.removeprefix(_COMPILE_PREFIX): tensor
        for key, tensor in state.items()
        if not _SEED_MASK_BUFFER.match(key.removeprefix(_COMPILE_PREFIX))
    }
    return state, stored_config


def _config_from(state, stored, n_head: int, path: Path) -> GPTConfig:
    if stored is not None:
        values = {name: stored[name] for name in _CONFIG_FIELDS if name in stored}
    else:
        values = {}
    for key in ("tok_emb.weight", "pos_emb.weight"):
        if key not in state:
            raise CheckpointError(f"{path}: missing key {key!r}; is this a JAI GPT checkpoint?")
    values.setdefault("vocab_size", state["tok_emb.weight"].shape[0])
    values.setdefault("block_size", state["pos_emb.weight"].shape[0])
    values.setdefault("n_embd", state["tok_emb.weight"].shape[1])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    values.setdefault("n_layer", len(layers))
    values.setdefault("n_head", n_head)
    try:
        return GPTConfig(**values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model configuration {values}: {exc}") from exc


def _check_keys_and_shapes(model: GPT, state, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: key {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)} for {model.config}"
            )
