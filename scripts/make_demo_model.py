"""Build the demo JAI model: a small GPT trained on synthetic Korean job-posting Q&A.

Its result ships in the repo as ``demo/ckpt.pt`` and ``demo/tokenizer.json``: ``make serve`` serves it
when there is no checkpoint of yours, so a fresh checkout answers "서울에서 React 개발자 채용 있어?"
with a real (if made-up) posting without training anything. This script rebuilds it (about 2 minutes
on 2 CPU cores; ``make demo``). Everything is seeded: on one machine the same ``--seed`` gives the same
tokenizer and tensors. Training is not bit-reproducible across CPUs (their float kernels differ), which
is why the model is shipped rather than built on each machine.

    python scripts/make_demo_model.py [--out-dir DIR] [--steps N] [--seed S] [--force]

writes ``DIR/ckpt.pt`` (the seed's ``{"model": state_dict}`` format, plus ``config``) and
``DIR/tokenizer.json``; DIR defaults to the shipped ``demo/``. An existing checkpoint is kept unless
``--force``.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # before torch loads MKL, and only for a build (an import changes nobody's MKL)
    # MKL promises the same float results from run to run only in its conditional numerical reproducibility
    # mode and with the thread count fixed (otherwise they may depend on how many threads it picks): "the
    # same --seed gives the same tensors" needs both. Two builds in the test suite differed about once in
    # twenty suites, never when reproduced alone; AUTO costs nothing here (150 steps: 15.4 s against 15.6),
    # AUTO,STRICT (also for unaligned data) twice the time.
    os.environ.setdefault("MKL_CBWR", "AUTO")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.nn import functional as F
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "handler"))

from jaiserve.model import GPT, GPTConfig  # noqa: E402

DEMO_DIR = REPO_ROOT / "demo"  # the shipped demo model
CHECKPOINT = Path("ckpt.pt")  # names inside an --out-dir (and the archive's)
TOKENIZER = Path("tokenizer.json")
EOT = "<|endoftext|>"  # between documents; the engine stops on it
MARKERS = ["[QUESTION]", "[/QUESTION]", "[ANSWER]", "[/ANSWER]"]  # one token each, kept in decoded text

# n_layer/n_head/n_embd are the smallest that still copy city and role into unseen combinations
ARCH = dict(block_size=256, n_layer=3, n_head=4, n_embd=128)
VOCAB_SIZE = 1024  # byte-level BPE merges learned on the corpus, plus the five added tokens
DEFAULT_STEPS = 1200
BATCH = 32  # documents per step, each trained at positions 0.. as the chat prompt is served
LR, WARMUP = 3e-3, 60

# ----- the synthetic corpus -----


@dataclass(frozen=True)
class Place:
    name: str  # as asked and answered: "부산"
    where: str  # "부산에서"
    work: tuple[str, ...]  # how a posting there is worked


ONSITE = ("주 5일 출근", "주 2일 재택 병행", "하이브리드 근무", "자율 출퇴근")
PLACES = [
    Place("서울", "서울에서", ONSITE),
    Place("판교", "판교에서", ONSITE),
    Place("부산", "부산에서", ONSITE),
    Place("대전", "대전에서", ONSITE),
    Place("제주", "제주에서", ONSITE),
    Place("대구", "대구에서", ONSITE),
    Place("광주", "광주에서", ONSITE),
    Place("인천", "인천에서", ONSITE),
    Place("수원", "수원에서", ONSITE),
    Place("원격", "원격으로", ("전면 원격 근무", "원격 근무, 분기별 오프라인 모임")),
]

# role as asked -> stacks a posting for it lists
ROLES = {
    "React 개발자": ("React, TypeScript, Next.js", "React, Redux, Jest", "React, Vite, Tailwind CSS"),
    "프론트엔드 개발자": ("Vue.js, TypeScript", "React, TypeScript", "Svelte, Vite"),
    "백엔드 개발자": ("Java, Spring Boot, MySQL", "Go, gRPC, PostgreSQL", "Node.js, NestJS, Redis"),
    "Java 개발자": ("Java, Spring Boot, JPA", "Java, Kafka, Oracle", "Java, Spring Cloud, MSA"),
    "Go 개발자": ("Go, gRPC, Kubernetes", "Go, PostgreSQL, Redis", "Go, Kafka, AWS"),
    "Python 개발자": ("Python, Django, PostgreSQL", "Python, FastAPI, Redis", "Python, Flask, Celery"),
    "데이터 엔지니어": ("Python, Spark, Airflow", "Kafka, Flink, BigQuery", "SQL, dbt, Snowflake"),
    "iOS 개발자": ("Swift, SwiftUI, Combine", "Swift, UIKit, RxSwift", "Swift, Tuist, SwiftUI"),
    "안드로이드 개발자": ("Kotlin, Jetpack Compose", "Kotlin, Coroutines, Hilt", "Java, Kotlin, MVVM"),
    "ML 엔지니어": ("Python, PyTorch, MLflow", "PyTorch, Triton, CUDA", "Python, TensorFlow, Kubeflow"),
    "DevOps 엔지니어": ("Kubernetes, Terraform, AWS", "Docker, ArgoCD, GCP", "Ansible, Jenkins, Prometheus"),
    "QA 엔지니어": ("Selenium, Pytest, Jenkins", "Appium, Cypress", "Playwright, TestRail"),
}

COMPANIES = (
    "네오테크", "한빛소프트", "블루웨일", "코드브릿지", "데이터숲", "스텔라랩", "그린픽셀",
    "모아페이", "오로라AI", "바다물류", "하늘헬스", "누리커머스", "별빛게임즈", "산들모빌리티",
)
EXPERIENCE = (
    ("신입", "3,600만~4,200만 원"),
    ("경력 1~3년", "4,000만~5,500만 원"),
    ("경력 3년 이상", "5,000만~7,000만 원"),
    ("경력 5년 이상", "6,500만~9,000만 원"),
    ("경력 7년 이상", "8,000만~1억 2,000만 원"),
)

# {where} "서울에서", {place} "서울", {role} "React 개발자"; a question is PREFIX + one of these
QUESTIONS = (
    "{where} {role} 채용 있어?",
    "{where} {role} 채용하는 곳 알려줘",
    "{place} {role} 공고 있나요?",
    "{where} 일할 {role} 자리 찾고 있어",
    "{place} 지역 {role} 구인 정보 알려줘",
    "{role} 채용 중인 {place} 회사 추천해줘",
    "{where} {role} 구하는 회사 있을까요?",
    "{place} {role} 일자리 추천 부탁해",
    "{role}인데 {where} 지원할 만한 곳 있어?",
    "{where} {role} 모집하는 회사 있나요?",
    "{place} 근처 {role} 채용 공고 보여줘",
    "{role} 포지션 {where} 찾을 수 있을까?",
)
PREFIXES = ("", "", "", "혹시 ", "안녕하세요. ", "요즘 ", "이직 준비 중인데 ")
# never in the corpus: the tests (and curious users) ask these
HELD_OUT_QUESTIONS = (
    "{where} {role}를 뽑는 회사 있어?",
    "{place} 쪽 {role} 포지션 알려줄래?",
)

ANSWER = (
    "{where} {role}를 채용 중인 곳이 있어요. {company}에서 {exp} {role}를 모집합니다.\n"
    "- 기술 스택: {stack}\n- 연봉: {salary}\n- 근무 형태: {work}\n"
    "관심 있으면 {company} 채용 페이지에서 지원해 보세요."
)


def held_out_pairs() -> set[tuple[str, str]]:
    """One (place, role) pair per role, on a diagonal, that the corpus never mentions together."""
    places = [p.name for p in PLACES]
    return {(places[(3 * i + 1) % len(places)], role) for i, role in enumerate(ROLES)}


def chat_prompt(question: str) -> str:
    """The prompt the server builds for ``mode: chat`` (the seed's /chat format)."""
    return f"[QUESTION]\n{question}\n[/QUESTION]\n\n[ANSWER]\n"


def make_corpus(seed: int, size: int = 4000) -> list[str]:
    """``size`` Q&A documents over the trained (place, role) pairs and question phrasings."""
    rng = random.Random(seed)
    held_out = held_out_pairs()
    pairs = [(place, role) for place in PLACES for role in ROLES if (place.name, role) not in held_out]
    docs = []
    for i in range(size):
        place, role = pairs[i % len(pairs)]  # every pair equally often
        exp, salary = rng.choice(EXPERIENCE)
        slots = dict(
            where=place.where, place=place.name, role=role, company=rng.choice(COMPANIES),
            stack=rng.choice(ROLES[role]), exp=exp, salary=salary, work=rng.choice(place.work),
        )
        question = rng.choice(PREFIXES) + rng.choice(QUESTIONS).format(**slots)
        docs.append(chat_prompt(question) + ANSWER.format(**slots) + "\n[/ANSWER]")
    rng.shuffle(docs)
    return docs


# ----- tokenizer -----


def train_tokenizer(docs: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()  # bytes back to UTF-8, so Korean round-trips
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(MARKERS),
        special_tokens=[EOT],  # special: dropped from decoded text
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bodies = [_strip_markers(doc) for doc in docs]  # markers become whole tokens below, not merges
    tokenizer.train_from_iterator(bodies, trainer)
    tokenizer.add_tokens(MARKERS)  # normal added tokens: one id each, decoded back into the text
    for doc in docs[:200]:
        ids = tokenizer.encode(doc).ids
        assert tokenizer.decode(ids) == doc, f"tokenizer does not round-trip {doc!r}"
    return tokenizer


def _strip_markers(doc: str) -> str:
    for marker in MARKERS:
        doc = doc.replace(marker, "")
    return doc


# ----- training -----


def _init_weights(model: GPT) -> None:
    """nanoGPT's init (N(0, 0.02), zero biases): nn.Embedding's default N(0, 1) trains far slower."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)


def _encode_corpus(docs, tokenizer, eot_id: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) token ids, one document per row followed by EOT, padded; and each row's length."""
    rows = [tokenizer.encode(doc).ids + [eot_id] for doc in docs]
    width = max(map(len, rows))
    assert width <= block_size + 1, f"a document is {width} tokens, longer than block_size"
    ids = torch.full((len(rows), width), eot_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) for r in rows])


def _lr(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to LR / 10


def train(model: GPT, ids: torch.Tensor, lengths: torch.Tensor, steps: int, seed: int, progress=True):
    """AdamW on random batches of whole documents; returns the mean loss of the last 50 steps."""
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.95),
    )
    positions = torch.arange(ids.shape[1])
    recent: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="training demo model", disable=not progress, mininterval=1.0)
    for step in bar:
        batch = torch.randint(len(ids), (BATCH,), generator=generator)
        width = int(lengths[batch].max())
        x, y = ids[batch, : width - 1], ids[batch, 1:width].clone()
        y[positions[1:width][None, :] >= lengths[batch][:, None]] = -100  # padding after EOT
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(recent) / len(recent)


def seed_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict as the seed saves it: each block also carries its causal-mask buffer."""
    bs = model.config.block_size
    state = dict(model.state_dict())
    mask = torch.tril(torch.ones(bs, bs)).view(1, 1, bs, bs)
    for i in range(model.config.n_layer):
        state[f"blocks.{i}.attn.bias"] = mask.clone()
    return dict(sorted(state.items(), key=lambda kv: _seed_key_order(kv[0])))


def _seed_key_order(key: str):
    # the seed registers attn.bias after c_attn/c_proj; keep that order for a faithful file
    parts = key.split(".")
    return (parts[0] != "tok_emb", parts[0] != "pos_emb", parts[0] != "blocks",
            int(parts[1]) if parts[0] == "blocks" else 0, parts[0] == "head")


@dataclass
class DemoBuild:
    checkpoint: Path
    tokenizer: Path
    parameters: int
    steps: int
    final_loss: float
    seconds: float

    def summary(self, root: Path) -> str:
        def rel(p: Path) -> str:
            return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

        return (
            f"demo model: {self.parameters / 1e6:.2f}M params, {self.steps} steps, "
            f"final loss {self.final_loss:.3f}, built in {self.seconds:.0f} s "
            f"-> {rel(self.checkpoint)}, {rel(self.tokenizer)}"
        )


def build_demo_model(out_dir, steps: int = DEFAULT_STEPS, seed: int = 0, progress: bool = True) -> DemoBuild:
    """Train the demo tokenizer and model; write them under ``out_dir`` (overwriting)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 4))  # a tiny model: more threads only add sync overhead
    try:
        docs = make_corpus(seed)
        tokenizer = train_tokenizer(docs)
        config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), **ARCH)
        torch.manual_seed(seed)
        model = GPT(config)
        _init_weights(model)
        ids, lengths = _encode_corpus(docs, tokenizer, tokenizer.token_to_id(EOT), config.block_size)
        loss = train(model, ids, lengths, steps, seed, progress)
    finally:
        torch.set_num_threads(threads)

    checkpoint, tokenizer_path = out_dir / CHECKPOINT, out_dir / TOKENIZER
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_path))
    fields = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    blob = {"model": seed_state_dict(model), "config": {f: getattr(config, f) for f in fields}}
    torch.save(blob, checkpoint)
    return DemoBuild(checkpoint, tokenizer_path, model.num_parameters(), steps, loss,
                     time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEMO_DIR,
                        help="writes OUT_DIR/ckpt.pt and OUT_DIR/tokenizer.json (default: the shipped demo/)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds the corpus, init and data order")
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")

    existing = args.out_dir / CHECKPOINT
    if existing.exists() and not args.force:
        print(f"{existing} already exists; keeping it (pass --force to rebuild the demo model)")
        return 0
    build = build_demo_model(args.out_dir, steps=args.steps, seed=args.seed)
    print(build.summary(args.out_dir.resolve()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
