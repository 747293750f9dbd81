"""The demo model shipped in demo/ (scripts/make_demo_model.py): loadable, it answers, the README's
example is its answer on any CPU, and the script still builds it.

No test trains the model in full: the shipped files are what `make serve` serves. A short rebuild
checks that the script still learns the task; the determinism test uses 5-step builds, since identical
tensors after 5 steps already need identical corpus, tokenizer, init and data order.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer
from jaiserve.checkpoint import file_sha256
from readme_example import curl_example
from scripts.make_demo_model import (
    CHECKPOINT,
    DEFAULT_STEPS,
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
from ts_launcher import ROOT

SHORT_STEPS = 100  # learns the answer's shape (60 steps did not); 114 s on a busy 2-core machine, ~30 s idle

WHERE = {p.name: p.where for p in PLACES}
# (place, role, keyword the answer must contain): pairs the corpus never shows together, in
# the phrasings it never uses, so the model has to read the question, not recall a document
UNSEEN = [(place, role, role.split()[0]) for place, role in sorted(held_out_pairs())[::2][:5]]


@pytest.fixture(scope="session")
def demo(demo_build):
    """The shipped demo model (conftest.py), loaded as a user's checkpoint would be."""
    model = load_model(demo_build.checkpoint)  # no n_head given: it must come from the stored config
    tokenizer = load_tokenizer(demo_build.tokenizer, model.config.vocab_size)
    return demo_build, model, tokenizer


def _answer(model, tokenizer, questions):
    engine = Engine(model, tokenizer, max_batch=len(questions))
    params = SamplingParams(max_tokens=256, temperature=0, stop=["[/ANSWER]"])
    prompts = [tokenizer.encode(chat_prompt(q)).ids for q in questions]
    return engine.generate(prompts, [params] * len(questions))


def test_same_seed_same_model(tmp_path):
    """Each build runs as `make demo` runs it, in a fresh interpreter: the same seed on one machine gives
    the same files. (In-process, after most of the suite, two builds once differed; the thread count
    alone changes the tensors: 1 and 2 torch threads give different ones. Later, in subprocesses, about one
    suite in twenty: the script now fixes MKL's thread count and asks for its reproducible mode.)"""

    def build(name, seed):
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_model.py"), "--out-dir", str(tmp_path / name),
                        "--steps", "5", "--seed", str(seed)], check=True, capture_output=True, timeout=300)
        return tmp_path / name / CHECKPOINT, tmp_path / name / TOKENIZER

    (a, a_tokenizer), (b, b_tokenizer) = build("a", 3), build("b", 3)
    state_a = torch.load(a, weights_only=True)["model"]
    state_b = torch.load(b, weights_only=True)["model"]
    assert list(state_a) == list(state_b)
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert a_tokenizer.read_text() == b_tokenizer.read_text()
    c, _ = build("c", 4)
    assert file_sha256(c) != file_sha256(a)


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
    path.write_bytes(b"a user's checkpoint")
    assert main(["--out-dir", str(tmp_path), "--steps", "1"]) == 0
    assert path.read_bytes() == b"a user's checkpoint"
    assert "already exists" in capsys.readouterr().out
    assert main(["--out-dir", str(tmp_path), "--steps", "1", "--force"]) == 0
    assert path.read_bytes() != b"a user's checkpoint"
    assert (tmp_path / TOKENIZER).is_file()


def _loss(model, tokenizer, docs) -> float:
    """Mean next-token cross-entropy over whole documents (each followed by the end-of-text token)."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    losses = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([tokenizer.encode(doc).ids + [eot]])
            logits = model(ids[:, :-1])
            losses.append(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item())
    return sum(losses) / len(losses)


def test_a_short_rebuild_still_learns_the_task(tmp_path, demo):
    """The script as `make demo` runs it, cut short: the loss on documents of another seed falls from
    chance (ln 1024 = 6.9) to a fraction of it (0.37 measured), a greedy answer has the corpus' shape,
    and its tokenizer is the shipped one (BPE training counts pairs: the same on every CPU)."""
    build = build_demo_model(tmp_path, steps=SHORT_STEPS, progress=False)
    assert build.steps == SHORT_STEPS < DEFAULT_STEPS
    model = load_model(build.checkpoint)
    tokenizer = load_tokenizer(build.tokenizer, model.config.vocab_size)
    docs = make_corpus(1, size=32)
    assert _loss(model, tokenizer, docs) < 1.0
    (done,) = _answer(model, tokenizer, ["서울에서 React 개발자 채용 있어?"])
    assert done.finish_reason == "stop", done.text
    assert re.fullmatch(r"[^\n]+ 채용 중인 곳이 있어요\. [^\n]+\n- 기술 스택: [^\n]+\n- 연봉: [^\n]+\n"
                        r"- 근무 형태: [^\n]+\n관심 있으면 [^\n]+ 지원해 보세요\.\n", done.text), done.text
    assert json.loads(build.tokenizer.read_text()) == json.loads(demo[0].tokenizer.read_text())
    _, shipped, _ = demo
    assert _loss(shipped, tokenizer, docs) < 0.5  # the full 1,200 steps: far better still


ANSWER_SCRIPT = """
import json, sys
import yaml
sys.path.insert(0, "handler")
from jaiserve import Engine, Limits, load_model, load_tokenizer
from jaiserve.api import Defaults, parse_request
from jaiserve.settings import Settings
settings = Settings.from_yaml(yaml.safe_load(open("model-config.yaml"))["handler"])
request = parse_request(json.loads(sys.argv[1]), Defaults(**settings.defaults))
model = load_model("demo/ckpt.pt", cpu_linear=settings.cpu_linear)
engine = Engine(model, load_tokenizer("demo/tokenizer.json", model.config.vocab_size),
                limits=Limits(settings.max_tokens_limit, settings.max_prompt_tokens),
                utf8_safe_sampling=settings.utf8_safe_sampling, window_stride=settings.window_stride)
[done] = engine.generate([engine.encode(request.prompt)], [request.params])
print(json.dumps({"generated": done.text, "finish_reason": done.finish_reason,
                  "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids)}}))
"""
OLDER_KERNELS = {  # what an older CPU would run: torch's, oneDNN's and MKL's kernels without AVX-512
    "sse": dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_ENABLE_INSTRUCTIONS="SSE4_2"),
    "avx2, 1 thread": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
                           OMP_NUM_THREADS="1"),
}


@pytest.mark.parametrize("kernels", ["this CPU", *OLDER_KERNELS])
def test_the_readmes_example_is_the_shipped_models_answer_on_any_cpu(kernels):
    """README.md's curl is greedy: the shipped model gives its answer token for token whatever the CPU's
    instruction set (the server's answer byte for byte: tests/test_e2e.py)."""
    body, answer = curl_example()
    assert body.get("temperature") == 0 or body.get("top_k") == 1  # greedy: no random draw
    env = dict(os.environ, **OLDER_KERNELS.get(kernels, {}))
    result = subprocess.run([sys.executable, "-c", ANSWER_SCRIPT, json.dumps(body)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = json.loads(answer)
    assert json.loads(result.stdout) == {k: expected[k] for k in ("generated", "finish_reason", "usage")}
