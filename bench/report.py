"""Benchmark report: serving speed per dtype and worker layout, quality per dtype, start-up and footprint.

    .venv/bin/python bench/report.py [--clients 1 4 16 64] [--requests-per-client 2] [--tokens 128]
                                     [--demo-dir DIR] [--quick]

In one run, on this machine:
- the seed's no-cache reference (bench/engine_bench.py), one request at a time: the baseline;
- quality of bfloat16 and int8 against float32 on the demo model (the shipped demo/, or
  --demo-dir): greedy agreement over the first 64 tokens of 50 chat questions (half of them about
  city/role pairs the demo never saw together) and perplexity on held-out documents;
- a real torchserve per configuration (dtype float32 / bfloat16 / int8 x 1 worker with 2 threads or
  2 workers with 1 thread each; the shipped batcher and batchSize, streamed, random weights at the full
  default shape) under bench/load_bench.py's closed loop at each client count; start-up time (from
  `torchserve --start` to the first answer) and resident memory per worker; archive sizes.
Writes bench/results/report.json and bench/results/report.png and prints markdown tables. Takes about
10 minutes on 2 cores (plus about 2 minutes the first time, to build the demo model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "handler"), str(ROOT / "tests"), str(ROOT)]

from engine_bench import demo_model_dir, reference_tokens_per_s  # noqa: E402
from jaiserve import Engine, SamplingParams, load_model, load_tokenizer  # noqa: E402
from load_bench import make_bench_model, run_level  # noqa: E402
from reference_gpt import ReferenceGPT  # noqa: E402
from scripts import make_demo_model as demo  # noqa: E402
from ts_launcher import archive, running_torchserve  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8")
LAYOUTS = ((1, 2), (2, 1))  # (workers, torch threads per worker) on 2 cores
BATCH_SIZE = yaml.safe_load((ROOT / "model-config.yaml").read_text())["batchSize"]  # the shipped one
QUALITY_PROMPTS, QUALITY_TOKENS = 50, 64
RESULTS = ROOT / "bench" / "results"

# torch.ao.quantization warns that it is deprecated (in favour of torchao) on every call; it still works
# in torch 2.13, and the README says so. Keep the report's output readable.
warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")


# ----- quality on the demo model -----


def _slots(place, role, rng: random.Random) -> dict:
    exp, salary = rng.choice(demo.EXPERIENCE)
    return dict(where=place.where, place=place.name, role=role, company=rng.choice(demo.COMPANIES),
                stack=rng.choice(demo.ROLES[role]), exp=exp, salary=salary, work=rng.choice(place.work))


def quality_prompts(n: int = QUALITY_PROMPTS) -> list[str]:
    """Chat-wrapped questions: every held-out (place, role) pair in the held-out phrasings, then
    questions from a corpus of another seed (trained pairs, new combinations), ``n`` in all."""
    places = {p.name: p for p in demo.PLACES}
    rng = random.Random(1)
    questions = [template.format(**_slots(places[name], role, rng))
                 for name, role in sorted(demo.held_out_pairs()) for template in demo.HELD_OUT_QUESTIONS]
    for doc in demo.make_corpus(seed=1, size=n):
        question = doc.split("[QUESTION]\n", 1)[1].split("\n[/QUESTION]", 1)[0]
        if question not in questions:
            questions.append(question)
    return [demo.chat_prompt(q) for q in questions[:n]]


def held_out_documents(seed: int = 1, per_pair: int = 4) -> list[str]:
    """Whole Q&A documents, in the corpus' format, about the (place, role) pairs training never saw."""
    places = {p.name: p for p in demo.PLACES}
    rng = random.Random(seed)
    docs = []
    for name, role in sorted(demo.held_out_pairs()):
        for _ in range(per_pair):
            slots = _slots(places[name], role, rng)
            question = rng.choice(demo.PREFIXES) + rng.choice(demo.QUESTIONS).format(**slots)
            docs.append(demo.chat_prompt(question) + demo.ANSWER.format(**slots) + "\n[/ANSWER]")
    return docs


@torch.inference_mode()
def perplexity(model, tokenizer, docs: list[str]) -> float:
    """exp(mean next-token cross-entropy) over every token of each document and its end-of-text, as trained."""
    eot = tokenizer.token_to_id(demo.EOT)
    nll, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tokenizer.encode(doc).ids + [eot]])
        logits = model(ids[:, :-1]).float()
        nll += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Per prompt: the share of positions equal before the first divergence; and the share identical."""
    prefix = []
    for a, b in zip(reference, other):
        same = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b)))
        prefix.append(1.0 if a == b else same / max(len(a), len(b)))
    return {"mean_prefix_fraction": sum(prefix) / len(prefix),
            "identical_share": sum(a == b for a, b in zip(reference, other)) / len(reference)}


@torch.inference_mode()
def divergence_margins(model, prompts: list[list[int]], reference: list[list[int]], other: list[list[int]]):
    """For each prompt whose tokens differ: float32's probability gap between its top two tokens at the
    first differing position. A small gap means float32 itself was nearly indifferent there."""
    margins = []
    for prompt, a, b in zip(prompts, reference, other):
        if a == b:
            continue
        same = sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b)))
        context = torch.tensor([(prompt + a[:same])[-model.config.block_size:]])
        top = model(context)[0, -1].softmax(-1).topk(2).values
        margins.append((top[0] - top[1]).item())
    return margins


def quality(demo_dir: Path) -> dict:
    checkpoint, tokenizer_path = demo_dir / demo.CHECKPOINT, demo_dir / demo.TOKENIZER
    prompts = quality_prompts()
    held_out = held_out_documents()
    other_seed = demo.make_corpus(seed=1, size=200)
    tokens, rows = {}, {}
    reference = None  # the float32 model: DTYPES lists it first
    for dtype in DTYPES:
        model = load_model(checkpoint, dtype=dtype)
        tokenizer = load_tokenizer(tokenizer_path, model.config.vocab_size)
        engine = Engine(model, tokenizer, max_batch=len(prompts))
        params = [SamplingParams(max_tokens=QUALITY_TOKENS, temperature=0)] * len(prompts)
        prompt_ids = [engine.encode(p) for p in prompts]
        tokens[dtype] = [c.token_ids for c in engine.generate(prompt_ids, params)]
        rows[dtype] = {"perplexity_held_out_pairs": perplexity(model, tokenizer, held_out),
                       "perplexity_other_seed": perplexity(model, tokenizer, other_seed)}
        if dtype == "float32":
            reference = model
        else:
            rows[dtype].update(agreement(tokens["float32"], tokens[dtype]))
            margins = sorted(divergence_margins(reference, prompt_ids, tokens["float32"], tokens[dtype]))
            rows[dtype]["fp32_top2_gap_at_divergence"] = {
                "median": margins[len(margins) // 2] if margins else None, "max": max(margins, default=None)}
        print(f"  quality {dtype:9s} {rows[dtype]}", file=sys.stderr)
    return {"prompts": len(prompts), "held_out_prompts": 2 * len(demo.held_out_pairs()),
            "tokens": QUALITY_TOKENS, "held_out_documents": len(held_out), "other_seed_documents": len(other_seed),
            "dtypes": rows}


# ----- serving through torchserve -----


def model_config(dtype: str, workers: int, threads: int) -> dict:
    config = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    # the shipped batcher (continuousBatching and step_budget_ms from model-config.yaml)
    config.update(minWorkers=workers, maxWorkers=workers, batchSize=BATCH_SIZE)
    config["handler"] = {**config["handler"], "dtype": dtype, "threads": threads}
    return config


def worker_rss_mib(server, workers: int, timeout: float = 120) -> list[float]:
    """Resident memory of each worker process once all ``workers`` are READY."""
    deadline = time.monotonic() + timeout
    while len(ready := server.ready_workers()) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(ready)} of {workers} workers READY:\n{server.log()}")
        time.sleep(0.5)
    return [psutil.Process(int(w["pid"])).memory_info().rss / 2**20 for w in ready]


def serve_and_load(root: Path, checkpoint, tokenizer, config: dict, args) -> dict:
    root.mkdir()
    (root / "model-config.yaml").write_text(yaml.safe_dump(config))
    mar = archive(root, checkpoint, tokenizer, root / "model-config.yaml")
    workers = config["minWorkers"]
    started = time.perf_counter()
    with running_torchserve(root) as server:
        response = server.predict({"prompt": "hello", "max_tokens": 1}, timeout=120)
        response.raise_for_status()
        startup = time.perf_counter() - started
        rss_started = worker_rss_mib(server, workers)
        levels = []
        if args.clients:
            run_level(server, workers, 1, 8, True)  # warm-up, every worker
            for clients in args.clients:
                level = run_level(server, clients, args.requests_per_client, args.tokens, True)
                levels.append(level)
                print(f"    {clients:3d} clients {level['tokens_per_s']:7.1f} tokens/s "
                      f"ttft p50 {level['ttft_ms_p50']:6.0f} ms", file=sys.stderr)
        rss_loaded = worker_rss_mib(server, workers)
    return {"archive_mib": mar.stat().st_size / 2**20, "startup_s": startup,
            "worker_rss_mib_started": rss_started, "worker_rss_mib_loaded": rss_loaded, "levels": levels}


# ----- output -----


def label(row: dict) -> str:
    return f"{row['dtype']}, {row['workers']} worker{'s' * (row['workers'] > 1)} x {row['threads']} thread{'s' * (row['threads'] > 1)}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"float32": "tab:blue", "bfloat16": "tab:orange", "int8": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for row in report["serving"]:
        clients = [lv["clients"] for lv in row["levels"]]
        style = dict(color=colors[row["dtype"]], linestyle="-" if row["workers"] == 1 else "--", marker="o",
                     label=label(row))
        left.plot(clients, [lv["tokens_per_s"] for lv in row["levels"]], **style)
        right.plot(clients, [lv["ttft_ms_p50"] for lv in row["levels"]], **style)
    left.axhline(report["reference_tokens_per_s"], color="gray", linestyle=":",
                 label="seed reference (no cache, 1 request)")
    left.set(title="Throughput", ylabel="generated tokens/s (all clients)", ylim=(0, None))
    right.set(title="Time to first token (p50)", ylabel="ms", yscale="log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["clients"], [str(c) for c in report["clients"]])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"JAI through TorchServe: full default shape, {report['tokens']} streamed tokens/request, "
                 f"batchSize {BATCH_SIZE}, {report['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(report: dict) -> None:
    print(f"\nMachine: {report['machine']}; torch {report['torch']}. Seed reference (no cache, one request): "
          f"{report['reference_tokens_per_s']:.1f} tokens/s\n")
    print("| dtype | workers x threads | clients | tokens/s | x reference | TTFT p50 / p99 (ms) "
          "| inter-token p50 / p99 (ms) | latency p50 / p99 (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in report["serving"]:
        for lv in row["levels"]:
            print(f"| {row['dtype']} | {row['workers']} x {row['threads']} | {lv['clients']} | "
                  f"{lv['tokens_per_s']:.0f} | {lv['tokens_per_s'] / report['reference_tokens_per_s']:.1f} | "
                  f"{lv['ttft_ms_p50']:.0f} / {lv['ttft_ms_p99']:.0f} | {lv['itl_ms_p50']:.0f} / {lv['itl_ms_p99']:.0f} "
                  f"| {lv['latency_ms_p50']:.0f} / {lv['latency_ms_p99']:.0f} |")
    q = report["quality"]
    print(f"\nQuality on the demo model: greedy, first {q['tokens']} tokens of {q['prompts']} chat questions "
          f"({q['held_out_prompts']} about held-out city/role pairs); perplexity on {q['held_out_documents']} "
          f"held-out-pair documents and {q['other_seed_documents']} documents of a corpus with another seed\n")
    print("| dtype | positions equal before first divergence (mean) | prompts identical "
          "| float32 top-2 gap at divergence, median / max | perplexity, held-out pairs | perplexity, other seed |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, r in q["dtypes"].items():
        if dtype == "float32":
            agree = "(reference) | (reference) | "
        else:
            gap = r["fp32_top2_gap_at_divergence"]
            gaps = f"{gap['median']:.3f} / {gap['max']:.3f}" if gap["max"] is not None else "-"
            agree = f"{r['mean_prefix_fraction']:.1%} | {r['identical_share']:.0%} | {gaps}"
        print(f"| {dtype} | {agree} | {r['perplexity_held_out_pairs']:.4f} | {r['perplexity_other_seed']:.4f} |")
    print("\n| dtype | workers x threads | start-up to first answer (s) | RSS per worker after start / after load (MiB) |")
    print("|---|---|---:|---:|")
    for row in report["serving"] + [report["demo_serving"]]:
        rss = lambda key: " + ".join(f"{m:.0f}" for m in row[key])  # noqa: E731
        name = row["dtype"] + (" (demo model)" if row is report["demo_serving"] else "")
        print(f"| {name} | {row['workers']} x {row['threads']} | {row['startup_s']:.1f} | "
              f"{rss('worker_rss_mib_started')} / {rss('worker_rss_mib_loaded')} |")
    print(f"\nArchive jai.mar: full default shape {report['archive_mib']['full']:.1f} MiB, "
          f"demo model {report['archive_mib']['demo']:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="streamed tokens per request")
    parser.add_argument("--demo-dir", type=Path, default=demo.DEMO_DIR,
                        help="the demo model (default: the shipped demo/; built there once if missing)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 16 tokens, 1 request each")
    parser.add_argument("--out", type=Path, default=RESULTS / "report.json")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.tokens, args.requests_per_client = [1, 4], 16, 1
    began = time.perf_counter()
    torch.set_num_threads(2)
    machine = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores"

    torch.manual_seed(0)
    reference = reference_tokens_per_s(ReferenceGPT().eval(), args.tokens, torch.device("cpu"))
    print(f"  seed reference {reference:.1f} tokens/s", file=sys.stderr)
    demo_dir = demo_model_dir(args.demo_dir)
    report = {"machine": machine, "torch": torch.__version__, "tokens": args.tokens, "clients": args.clients,
              "requests_per_client": args.requests_per_client, "batch_size": BATCH_SIZE,
              "reference_tokens_per_s": reference, "quality": quality(demo_dir), "serving": []}

    with tempfile.TemporaryDirectory(prefix="jai-report-") as scratch:
        scratch = Path(scratch)
        checkpoint, tokenizer = make_bench_model(scratch)
        for dtype, (workers, threads) in itertools.product(DTYPES, LAYOUTS):
            print(f"  serving {dtype}, {workers} worker(s) x {threads} thread(s)", file=sys.stderr)
            result = serve_and_load(scratch / f"{dtype}-{workers}", checkpoint, tokenizer,
                                    model_config(dtype, workers, threads), args)
            report["serving"].append({"dtype": dtype, "workers": workers, "threads": threads, **result})
        demo_args = argparse.Namespace(**{**vars(args), "clients": []})
        report["demo_serving"] = {"dtype": "float32", "workers": 1, "threads": 2, **serve_and_load(
            scratch / "demo", demo_dir / demo.CHECKPOINT, demo_dir / demo.TOKENIZER,
            model_config("float32", 1, 2), demo_args)}
    report["archive_mib"] = {"full": report["serving"][0]["archive_mib"], "demo": report["demo_serving"]["archive_mib"]}
    report["seconds"] = time.perf_counter() - began

    print_tables(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')} in {report['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
