"""Engine throughput vs the seed's no-cache reference, in one run, on the seed's full default shape.

    .venv/bin/python bench/engine_bench.py [--tokens 128] [--concurrency 1 8 32] [--dtypes float32 bfloat16]

Weights are random (speed does not depend on them). Prints a markdown table and writes
bench/results/engine.json. Compare ratios from one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "tests")]

from jaiserve import Engine, SamplingParams, load_model, resolve_device  # noqa: E402
from reference_gpt import ReferenceGPT  # noqa: E402

PROMPT_TOKENS = 24  # about a chat-wrapped question


def reference_tokens_per_s(reference, tokens: int, device) -> float:
    prompt = torch.randint(0, 24000, (1, PROMPT_TOKENS), device=device)
    reference.generate(prompt, 2)  # warm-up
    start = time.perf_counter()
    reference.generate(prompt, tokens)
    return tokens / (time.perf_counter() - start)


def engine_run(model, concurrency: int, tokens: int, device) -> dict:
    engine = Engine(model, max_batch=max(concurrency, 1))
    prompts = [torch.randint(0, 24000, (PROMPT_TOKENS,)).tolist() for _ in range(concurrency)]
    params = [SamplingParams(max_tokens=tokens, temperature=0.8, top_k=50, seed=i) for i in range(concurrency)]
    engine.generate(prompts[:1], [SamplingParams(max_tokens=4)])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(r.token_ids) for r in results)
    return {"tokens_per_s": generated / elapsed, "seconds": elapsed, "tokens": generated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    reference = ReferenceGPT().to(device).eval()
    ref = reference_tokens_per_s(reference, args.tokens, device)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:  # the engine loads the seed's checkpoint format
        checkpoint = Path(scratch) / "ckpt.pt"
        torch.save({"model": reference.state_dict()}, checkpoint)
        models = {name: load_model(checkpoint, device=device, dtype=name) for name in args.dtypes}
    for dtype_name, model in models.items():
        for n in args.concurrency:
            result = engine_run(model, n, args.tokens, device)
            rows.append({"dtype": dtype_name, "concurrency": n, **result, "vs_reference": result["tokens_per_s"] / ref})
            print(f"  {dtype_name:9s} x{n:<4d} {result['tokens_per_s']:8.1f} tokens/s", file=sys.stderr)

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nEngine vs seed reference: {args.tokens} tokens/request, {PROMPT_TOKENS}-token prompts, device {device} ({machine})\n")
    print("| | concurrency | tokens/s | x reference (1 stream) |\n|---|---:|---:|---:|")
    print(f"| seed reference (no cache), float32 | 1 | {ref:.1f} | 1.0 |")
    for r in rows:
        print(f"| engine, {r['dtype']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['vs_reference']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(device), "machine": machine, "tokens": args.tokens,
                                    "reference_tokens_per_s": ref, "engine": rows}, indent=2))


if __name__ == "__main__":
    main()
