"""Shared fixtures: a tiny model (fast unit tests), the seed's full default shape, a Korean tokenizer;
the demo model in a real torchserve, and the front door (nginx) in front of it."""

import shutil
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaiserve import Engine, load_model
from reference_gpt import ReferenceGPT
from ts_launcher import archive, running_front_door, running_torchserve

TINY = dict(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32)
FULL = dict(vocab_size=24000, block_size=256, n_layer=6, n_head=6, n_embd=384)

KOREAN_TEXT = [
    "서울에서 React 프론트엔드 개발자를 채용합니다. 연봉은 5000만원부터 시작합니다.",
    "판교의 백엔드 Java 개발자 포지션, 경력 3년 이상, 재택 근무 가능.",
    "부산 데이터 엔지니어 채용: Python, Spark, Airflow 경험자 우대.",
    "제주 원격 근무 iOS 개발자 모집, 신입 가능, 연봉 협의.",
    "대전 ML 엔지니어, PyTorch 경험 필수, 연구소 근무.",
]


def seed_checkpoint(path, seed=0, **shape):
    """Write a checkpoint exactly as the seed's training does: {"model": state_dict} incl. attn.bias."""
    torch.manual_seed(seed)
    reference = ReferenceGPT(**shape).eval()
    torch.save({"model": reference.state_dict(), "iter_num": 100, "best_val_loss": 2.5}, path)
    return reference


def save_endless_tokenizer(path) -> None:
    """A byte-level BPE over KOREAN_TEXT with no end-of-text token, saved to ``path``: a model served with
    it runs every request to max_tokens (e2e tests that need requests that are long for sure)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(KOREAN_TEXT * 3, trainer)
    tokenizer.save(str(path))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt.pt"
    return path, seed_checkpoint(path, **TINY)


@pytest.fixture(scope="session")
def tiny_reference(tiny_ckpt):
    return tiny_ckpt[1]


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    return load_model(tiny_ckpt[0], n_head=TINY["n_head"])


@pytest.fixture(scope="session")
def full_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "ckpt.pt"
    return path, seed_checkpoint(path, seed=1, **FULL)


@pytest.fixture(scope="session")
def korean_tokenizer():
    """A byte-level BPE tokenizer small enough for the tiny model (ids < 512)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(KOREAN_TEXT * 3, trainer)
    tokenizer.add_tokens(["[QUESTION]", "[/QUESTION]", "[ANSWER]", "[/ANSWER]"])
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_ckpt, korean_tokenizer):
    """What a model archive unpacks to for the tiny model: ckpt.pt and tokenizer.json (handler tests)."""
    directory = tmp_path_factory.mktemp("tiny_model_dir")
    shutil.copy(tiny_ckpt[0], directory / "ckpt.pt")
    korean_tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture
def tiny_engine(tiny_model):
    return Engine(tiny_model, max_batch=8)


# ----- the demo model and a real torchserve (end-to-end tests) -----


@pytest.fixture(scope="session")
def demo_build():
    """The demo model shipped in demo/ (scripts/make_demo_model.py's defaults): what `make serve` serves."""
    from scripts.make_demo_model import CHECKPOINT, DEMO_DIR, TOKENIZER

    return SimpleNamespace(checkpoint=DEMO_DIR / CHECKPOINT, tokenizer=DEMO_DIR / TOKENIZER)


@pytest.fixture(scope="session")
def ts_server(tmp_path_factory, demo_build):
    """torchserve started from the repo's own config.properties (ports moved to free ones), serving
    the demo model packed by the repo's archive.sh; always stopped at the end."""
    root = tmp_path_factory.mktemp("torchserve")
    archive(root, demo_build.checkpoint, demo_build.tokenizer)
    with running_torchserve(root) as server:
        yield server


@pytest.fixture(scope="session")
def front_door(ts_server, tmp_path_factory):
    """The front door (nginx) in front of the session's torchserve."""
    with running_front_door(tmp_path_factory.mktemp("nginx"), ts_server.inference.removeprefix("http://")) as url:
        yield url
