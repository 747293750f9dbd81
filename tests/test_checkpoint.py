"""Loading the user's checkpoint unchanged, and refusing files that do not fit, with clear errors."""

import pytest
import torch

from conftest import TINY
from jaiserve import CheckpointError, load_model, load_tokenizer
from reference_gpt import ReferenceGPT


@pytest.fixture(scope="module")
def seed_state():
    torch.manual_seed(0)
    return ReferenceGPT(**TINY).state_dict()


def same_weights(model, state):
    return all(torch.equal(model.state_dict()[k], state[k]) for k in model.state_dict())


def test_seed_format_loads_and_ignores_mask_buffers(tiny_ckpt):
    path, reference = tiny_ckpt
    model = load_model(path, n_head=2)
    assert model.config.vocab_size == 512 and model.config.block_size == 32
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    assert same_weights(model, reference.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,  # a bare state dict
        lambda s: {"model": {"_orig_mod." + k: v for k, v in s.items()}},  # torch.compile'd
        lambda s: {"model": s, "model_args": dict(TINY), "iter_num": 7},  # nanoGPT style
        lambda s: {"model": s, "config": dict(TINY)},
    ],
)
def test_accepted_layouts(tmp_path, seed_state, wrap):
    torch.save(wrap(seed_state), tmp_path / "c.pt")
    model = load_model(tmp_path / "c.pt", n_head=2)
    assert same_weights(model, seed_state)


def test_n_head_comes_from_the_checkpoint_config_over_the_setting(tmp_path, seed_state):
    torch.save({"model": seed_state, "config": dict(TINY, n_head=4)}, tmp_path / "c.pt")
    assert load_model(tmp_path / "c.pt", n_head=2).config.n_head == 4


def _broken(state, change):
    state = dict(state)
    change(state)
    return {"model": state}


@pytest.mark.parametrize(
    "blob, message",
    [
        (lambda s: _broken(s, lambda d: d.pop("ln_f.weight")), "missing key 'ln_f.weight'"),
        (lambda s: _broken(s, lambda d: d.update(extra=torch.zeros(1))), "unexpected key 'extra'"),
        (
            lambda s: _broken(s, lambda d: d.update({"head.weight": torch.zeros(512, 16)})),
            "key 'head.weight' has shape (512, 16), expected (512, 32)",
        ),
        (lambda s: _broken(s, lambda d: d.pop("tok_emb.weight")), "missing key 'tok_emb.weight'"),
        (lambda s: [1, 2, 3], "expected a dict, got list"),
        (lambda s: {"model": {"a": 1}}, "not a state dict of tensors"),
        (lambda s: {"model": s, "config": dict(TINY, n_head=5)}, "must be divisible by n_head"),
    ],
)
def test_bad_checkpoints_name_the_file_and_the_problem(tmp_path, seed_state, blob, message):
    path = tmp_path / "bad.pt"
    torch.save(blob(seed_state), path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, n_head=2)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt: cannot be read by torch.load"):
        load_model(tmp_path / "junk.pt")


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path, korean_tokenizer):
    path = tmp_path / "tokenizer.json"
    korean_tokenizer.save(str(path))
    assert load_tokenizer(path, vocab_size=512).get_vocab_size() == korean_tokenizer.get_vocab_size()
    with pytest.raises(CheckpointError, match=r"tokenizer.json: tokenizer has \d+ tokens but"):
        load_tokenizer(path, vocab_size=100)
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a tokenizers JSON file"):
        load_tokenizer(tmp_path / "bad.json")
