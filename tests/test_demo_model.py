"""The embedded demo model (scripts/make_demo_model.py): deterministic, loadable, and it answers.

One full build (about 1-2 minutes on two CPU cores) is shared by the session; the determinism test
uses 5-step builds, since identical tensors after 5 steps already need identical corpus, tokenizer,
init and data order.
"""

import json

import pytest
import torch

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer
from jaiserve.checkpoint import file_sha256
from scripts.make_demo_model import (
    CHECKPOINT,
    HELD_OUT_QUESTIONS,
    MARKERS,
    PLACES,
    QUESTIONS,
    TOKENIZER,
    build_demo_model,
    chat_prompt,
    held_out_pairs,
    main,
    make_corpus,
)

WHERE = {p.name: p.where for p in PLACES}
# (place, role, keyword the answer must contain): pairs the corpus never shows together, in
# the phrasings it never uses, so the model has to read the question, not recall a document
UNSEEN = [(place, role, role.split()[0]) for place, role in sorted(held_out_pairs())[::2][:5]]


@pytest.fixture(scope="session")
def demo(demo_build):
    """The session's one demo build (conftest.py), loaded as a user's checkpoint would be."""
    model = load_model(demo_build.checkpoint)  # no n_head given: it must come from the stored config
    tokenizer = load_tokenizer(demo_build.tokenizer, model.config.vocab_size)
    return demo_build, model, tokenizer


def _answer(model, tokenizer, questions):
    engine = Engine(model, tokenizer, max_batch=len(questions))
    params = SamplingParams(max_tokens=256, temperature=0, stop=["[/ANSWER]"])
    prompts = [tokenizer.encode(chat_prompt(q)).ids for q in questions]
    return engine.generate(prompts, [params] * len(questions))


def test_same_seed_same_model(tmp_path):
    a = build_demo_model(tmp_path / "a", steps=5, seed=3, progress=False)
    b = build_demo_model(tmp_path / "b", steps=5, seed=3, progress=False)
    state_a = torch.load(a.checkpoint, weights_only=True)["model"]
    state_b = torch.load(b.checkpoint, weights_only=True)["model"]
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert a.tokenizer.read_text() == b.tokenizer.read_text()
    c = build_demo_model(tmp_path / "c", steps=5, seed=4, progress=False)
    assert file_sha256(c.checkpoint) != file_sha256(a.checkpoint)


def test_held_out_questions_are_not_in_the_corpus():
    docs = "\n".join(make_corpus(0))
    for place, role, _ in UNSEEN:
        assert (place, role) in held_out_pairs()
        for template in QUESTIONS + HELD_OUT_QUESTIONS:
            assert template.format(where=WHERE[place], place=place, role=role) not in docs


def test_checkpoint_in_seed_format(demo):
    build, model, _ = demo
    blob = torch.load(build.checkpoint, weights_only=True)
    config = model.config
    assert blob["config"] == dict(
        vocab_size=config.vocab_size, block_size=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd,
    )
    state = blob["model"]
    bs = config.block_size
    for i in range(config.n_layer):
        assert torch.equal(state[f"blocks.{i}.attn.bias"], torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs))
    loaded = load_model(build.checkpoint, cpu_linear="aten").state_dict()  # plain nn.Linear weights, not packed
    assert set(state) - set(loaded) == {f"blocks.{i}.attn.bias" for i in range(config.n_layer)}
    for key, tensor in loaded.items():
        assert torch.equal(state[key], tensor), key


def test_tokenizer_round_trips_and_keeps_markers(demo):
    _, _, tokenizer = demo
    for doc in make_corpus(1, size=50):
        assert tokenizer.decode(tokenizer.encode(doc).ids) == doc
    for marker in MARKERS:
        assert tokenizer.encode(marker).ids == [tokenizer.token_to_id(marker)]
    vocab = json.loads(demo[0].tokenizer.read_text())
    specials = {t["content"] for t in vocab["added_tokens"] if t["special"]}
    assert specials == {"<|endoftext|>"}


def test_answers_the_seed_example(demo):
    _, model, tokenizer = demo
    (done,) = _answer(model, tokenizer, ["서울에서 React 개발자 채용 있어?"])
    assert done.finish_reason == "stop"
    assert done.text.startswith("서울에서 React 개발자를 채용 중인 곳이 있어요.")
    assert len(done.token_ids) < 100


def test_answers_unseen_questions_about_the_asked_role(demo):
    _, model, tokenizer = demo
    questions = [
        HELD_OUT_QUESTIONS[i % len(HELD_OUT_QUESTIONS)].format(where=WHERE[p], place=p, role=r)
        for i, (p, r, _) in enumerate(UNSEEN)
    ]
    for question, done, (_, role, keyword) in zip(questions, _answer(model, tokenizer, questions), UNSEEN):
        assert done.finish_reason == "stop", (question, done.text)
        assert keyword in done.text.split("\n")[0], (question, done.text)  # the opening sentence
        assert "지원해 보세요." in done.text, (question, done.text)  # and the answer's last line


def test_keeps_an_existing_checkpoint(tmp_path, capsys):
    path = tmp_path / CHECKPOINT
    path.parent.mkdir(parents=True)
    path.write_bytes(b"a user's checkpoint")
    assert main(["--out-dir", str(tmp_path), "--steps", "1"]) == 0
    assert path.read_bytes() == b"a user's checkpoint"
    assert "already exists" in capsys.readouterr().out
    assert main(["--out-dir", str(tmp_path), "--steps", "1", "--force"]) == 0
    assert path.read_bytes() != b"a user's checkpoint"
    assert (tmp_path / TOKENIZER).is_file()
