"""What UTF-8 safe sampling (handler/jaiserve/utf8.py) costs per engine step, and what it fixes.

    .venv/bin/python bench/utf8_bench.py [--concurrency 1 64] [--steps 64] [--answers 400] [--demo-dir DIR]

1. Cost, on the seed's full default shape (24000/256/6/6/384, random weights, bench/load_bench.py's
   24000-token byte-level tokenizer): ``--steps`` sampled tokens (temperature 0.8, top_k 50) for each of
   N requests, the mask on and off. Reports milliseconds per step both ways and the mask's own share
   of a step (time inside ``Utf8Mask.mask`` and ``advance``, timer overhead included).
2. Effect, on the demo model (the shipped demo/, or --demo-dir): ``--answers``
   sampled answers (temperature 1.0, top_k 50, seeds 0..N-1; 3 in 4 chat questions, 1 in 4 short
   generate prompts such as "채용"), the mask off and on: how many contain U+FFFD.

Prints a markdown table and writes bench/results/utf8.json. The machine may be shared: the share is
measured inside each run, so it is the figure to compare.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "handler"), str(ROOT / "tests"), str(ROOT)]

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer, resolve_device  # noqa: E402
from jaiserve.api import CHAT_STOP  # noqa: E402
from load_bench import make_bench_model  # noqa: E402
from scripts import make_demo_model as demo  # noqa: E402

PROMPT_TOKENS = 24
GENERATE_PROMPTS = ("채용", "서울", "연봉", "판교 백엔드", "신입 개발자", "경력 5년", "부산 데이터", "원격 근무")


# ----- cost per step -----


class _Timed:
    """Wraps the engine's Utf8Mask methods and adds up the seconds spent inside them."""

    def __init__(self, mask):
        self.seconds = 0.0
        for name in ("mask", "advance"):
            setattr(mask, name, self._wrap(getattr(mask, name)))

    def _wrap(self, method):
        @functools.wraps(method)
        def timed(*args):
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_cost(model, tokenizer, concurrency: int, steps: int, safe: bool, device) -> dict:
    engine = Engine(model, tokenizer, max_batch=concurrency, max_prefill_tokens=concurrency * PROMPT_TOKENS,
                    utf8_safe_sampling=safe)
    generator = torch.Generator().manual_seed(concurrency)
    prompts = [torch.randint(0, model.config.vocab_size, (PROMPT_TOKENS,), generator=generator).tolist()
               for _ in range(concurrency)]
    engine.generate(prompts, [SamplingParams(max_tokens=2, temperature=0.8, top_k=50)] * concurrency)  # warm-up
    for i, prompt in enumerate(prompts):
        engine.add_request(i, prompt, SamplingParams(max_tokens=steps + 1, temperature=0.8, top_k=50, seed=i))
    engine.step()  # the prefill step: not what a decode step costs
    timer = _Timed(engine.utf8) if safe else None
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(device)
    elapsed = time.perf_counter() - start
    assert not engine.has_work()
    return {"ms_per_step": 1000 * elapsed / steps, "mask_ms_per_step": 1000 * timer.seconds / steps if timer else 0.0}


def cost(args, device) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint, tokenizer_path = make_bench_model(Path(scratch))
        model = load_model(checkpoint, device=device)
        tokenizer = load_tokenizer(tokenizer_path, model.config.vocab_size)
    rows = []
    for n in args.concurrency:
        runs = {True: [], False: []}
        for _ in range(args.repeats):  # alternate, so that a busy moment hits both
            for safe in (False, True):
                runs[safe].append(step_cost(model, tokenizer, n, args.steps, safe, device))
        off = min(r["ms_per_step"] for r in runs[False])
        on = min(runs[True], key=lambda r: r["ms_per_step"])
        rows.append({"concurrency": n, "ms_per_step_off": off, "ms_per_step_on": on["ms_per_step"],
                     "mask_ms_per_step": on["mask_ms_per_step"],
                     "mask_share": on["mask_ms_per_step"] / on["ms_per_step"]})
        print(f"  x{n:<3d} off {off:7.2f} ms/step, on {on['ms_per_step']:7.2f} ms/step, "
              f"mask {on['mask_ms_per_step']:.3f} ms ({rows[-1]['mask_share']:.2%})", file=sys.stderr)
    return rows


# ----- U+FFFD in sampled demo answers -----


def demo_prompts(n: int) -> list[tuple[str, tuple[str, ...]]]:
    """(prompt, stop) pairs: chat questions over every place and role, and plain generate prompts."""
    roles = list(demo.ROLES)
    prompts = []
    for i in range(n):
        if i % 4 == 3:
            prompts.append((GENERATE_PROMPTS[i // 4 % len(GENERATE_PROMPTS)], ()))
            continue
        place, role = demo.PLACES[i % len(demo.PLACES)], roles[i // len(demo.PLACES) % len(roles)]
        question = demo.QUESTIONS[i % len(demo.QUESTIONS)].format(where=place.where, place=place.name, role=role)
        prompts.append((demo.chat_prompt(question), (CHAT_STOP,)))
    return prompts


def broken_answers(model, tokenizer, prompts, safe: bool, max_tokens: int) -> int:
    engine = Engine(model, tokenizer, max_batch=64, utf8_safe_sampling=safe)
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=50, seed=i, stop=stop)
              for i, (_, stop) in enumerate(prompts)]
    results = engine.generate([engine.encode(p) for p, _ in prompts], params)
    return sum("\ufffd" in r.text for r in results)


def effect(args, device) -> dict:
    directory = args.demo_dir
    if not (directory / demo.CHECKPOINT).exists():
        print(f"building the demo model into {directory} (about 2 minutes, once)", file=sys.stderr)
        demo.build_demo_model(directory, progress=False)
    model = load_model(directory / demo.CHECKPOINT, device=device)
    tokenizer = load_tokenizer(directory / demo.TOKENIZER, model.config.vocab_size)
    prompts = demo_prompts(args.answers)
    counts = {name: broken_answers(model, tokenizer, prompts, safe, args.max_tokens)
              for name, safe in (("off", False), ("on", True))}
    print(f"  answers with U+FFFD: off {counts['off']}/{len(prompts)}, on {counts['on']}/{len(prompts)}",
          file=sys.stderr)
    return {"answers": len(prompts), "max_tokens": args.max_tokens, "with_fffd_off": counts["off"],
            "with_fffd_on": counts["on"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 64])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting (the fastest counts)")
    parser.add_argument("--answers", type=int, default=400, help="sampled demo answers (0: skip)")
    parser.add_argument("--max-tokens", type=int, default=128, help="per demo answer")
    parser.add_argument("--demo-dir", type=Path, default=demo.DEMO_DIR,
                        help="the demo model (default: the shipped demo/; built there once if missing)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "utf8.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    report = {"device": str(device), "machine": machine, "steps": args.steps, "cost": cost(args, device)}
    if args.answers:
        report["effect"] = effect(args, device)

    print(f"\nUTF-8 safe sampling, full default shape (vocab 24000), device {device} ({machine})\n")
    print("| concurrency | ms/step, mask off | ms/step, mask on | mask ms/step | mask share of a step |")
    print("|---:|---:|---:|---:|---:|")
    for r in report["cost"]:
        print(f"| {r['concurrency']} | {r['ms_per_step_off']:.2f} | {r['ms_per_step_on']:.2f} | "
              f"{r['mask_ms_per_step']:.3f} | {r['mask_share']:.2%} |")
    if args.answers:
        e = report["effect"]
        print(f"\nDemo answers with U+FFFD (temperature 1.0, top_k 50, max {e['max_tokens']} tokens): "
              f"mask off {e['with_fffd_off']}/{e['answers']}, mask on {e['with_fffd_on']}/{e['answers']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
