"""Engine speed, the window trade-off and a step profile, in one run, on one machine.

    .venv/bin/python bench/engine_bench.py [--quick] [--sections ...] [--device cpu|cuda] [--threads N]

Sections (all by default), each printed as a markdown table and written to bench/results/engine.json:
- throughput: the seed's no-cache reference (one stream), the baseline engine (this package as of git
  BASELINE_REV, loaded from git) and this engine, float32 (oneDNN-packed and torch's nn.Linear) and
  int8, at 1/4/16/64 concurrent requests;
- window: per ``window_stride``, what decoding past block_size costs (4 requests whose context is past
  the window) and what it changes on the demo model (greedy tokens against stride 1, perplexity on a
  stream of demo-corpus documents);
- batchmates: 32 requests of which 4 are past the window: the step rate of the other 28, against 32
  requests that all fit the window;
- profile: where a steady decode step of 32 requests spends its time (torch profiler);
- floors (CPU): this machine's memory read bandwidth and the Linear layers' GEMM rate, and the most
  tokens/s they allow at 1 and 64 requests (weights read once per step, attention reading the cache).
Speed sections use the seed's full default shape (24000/256/6/6/384) with random weights, 24-token
prompts and the shipped handler settings (model-config.yaml `handler:`); quality uses the demo model
(the shipped demo/, or --demo-dir). About 6 minutes on 2 cores; --quick is a
smoke run of the same code at tiny sizes. The machine should be otherwise idle; compare within a run.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "tests"), str(ROOT)]

from jaiserve import Engine, SamplingParams, load_model, load_tokenizer, resolve_device  # noqa: E402
from jaiserve.settings import Settings  # noqa: E402
from reference_gpt import ReferenceGPT  # noqa: E402
from scripts import make_demo_model as demo  # noqa: E402

BASELINE_REV = "16e7870"  # the engine before issue 14 (window path recomputed every step, dynamic int8)
PROMPT_TOKENS = 24  # about a chat-wrapped question
SECTIONS = ("throughput", "window", "batchmates", "profile", "floors")
STRIDES = (1, 8, 32, 64, 128)
SETTINGS = Settings.from_yaml(yaml.safe_load((ROOT / "model-config.yaml").read_text())["handler"])  # as served

warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")


# ----- shared -----


def demo_model_dir(directory: Path) -> Path:
    """The demo model in ``directory`` (default: the shipped demo/), built there first if it is missing."""
    if not (directory / demo.CHECKPOINT).exists():
        print(f"building the demo model into {directory} (about 2 minutes, once)", file=sys.stderr)
        build = demo.build_demo_model(directory, progress=False)
        print("  " + build.summary(directory), file=sys.stderr)
    return directory


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(n: int, length: int, vocab: int = 24000) -> list[list[int]]:
    return [torch.randint(0, vocab, (length,)).tolist() for _ in range(n)]


def make_engine(model, max_batch: int, package=None, **settings) -> Engine:
    """This engine (or ``package``'s) with the shipped handler settings unless overridden."""
    if package is not None:  # the baseline knows no window_stride
        return package.Engine(model, max_batch=max_batch, max_prefill_tokens=SETTINGS.max_prefill_tokens)
    # no threads= here: the engine alone keeps torch's thread count at every step (handler.one_thread_rows is
    # a serving choice, for the cores the engine shares with the frontend: docs/performance.md)
    options = dict(max_prefill_tokens=SETTINGS.max_prefill_tokens, window_stride=SETTINGS.window_stride)
    return Engine(model, max_batch=max_batch, **{**options, **settings})


def timed_generate(engine, prompts, params, device) -> tuple[float, list]:
    synchronize(device)
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    synchronize(device)
    return time.perf_counter() - start, results


def reference_tokens_per_s(reference, tokens: int, device) -> float:
    prompt = torch.randint(0, 24000, (1, PROMPT_TOKENS), device=device)
    reference.generate(prompt, 2)  # warm-up
    start = time.perf_counter()
    reference.generate(prompt, tokens)
    return tokens / (time.perf_counter() - start)


def baseline_package(rev: str, scratch: Path):
    """The engine package as of git ``rev``, importable as ``jaiserve_baseline``; None without git."""
    target = scratch / "jaiserve_baseline"
    try:
        names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:handler/jaiserve"],
                               check=True, capture_output=True, text=True).stdout.split()
        target.mkdir()
        for name in (n for n in names if n.endswith(".py")):
            source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:handler/jaiserve/{name}"],
                                    check=True, capture_output=True, text=True).stdout
            (target / name).write_text(source)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  no baseline engine ({rev} not readable from git: {exc})", file=sys.stderr)
        return None
    sys.path.insert(0, str(scratch))
    return importlib.import_module("jaiserve_baseline")


# ----- throughput -----


def throughput(checkpoint: Path, args, device, baseline) -> list[dict]:
    """Tokens/s of N concurrent requests (24-token prompts, ``args.tokens`` each, temperature 0.8,
    top_k 50, seeded), per engine and dtype."""
    rows = []
    engines = [("this engine", None)] + ([("baseline engine", baseline)] if baseline else [])
    for (name, package), dtype in itertools.product(engines, args.dtypes):
        if package:  # the baseline knows no cpu_linear: its float32 is torch's nn.Linear
            if dtype == "float32-aten":
                continue
            model, sampling = package.load_model(checkpoint, device=device, dtype=dtype), package.SamplingParams
        else:
            torch_dtype, _, cpu_linear = dtype.partition("-")  # float32-aten: torch's nn.Linear, not packed
            model = load_model(checkpoint, device=device, dtype=torch_dtype, cpu_linear=cpu_linear or "onednn")
            sampling = SamplingParams
        for n in args.concurrency:
            engine = make_engine(model, n, package)
            engine.generate(random_prompts(1, PROMPT_TOKENS), [sampling(max_tokens=4)])  # warm-up
            params = [sampling(max_tokens=args.tokens, temperature=0.8, top_k=50, seed=i) for i in range(n)]
            seconds, results = timed_generate(engine, random_prompts(n, PROMPT_TOKENS), params, device)
            tokens = sum(len(r.token_ids) for r in results)
            rows.append({"engine": name, "dtype": dtype, "concurrency": n, "tokens": tokens,
                         "seconds": seconds, "tokens_per_s": tokens / seconds})
            print(f"  {name:15s} {dtype:8s} x{n:<3d} {tokens / seconds:8.1f} tokens/s", file=sys.stderr)
    return rows


# ----- past the window: cost -----


def window_cost(model, stride: int, requests: int, tokens: int, device, prompt_tokens: int | None = None) -> dict:
    """``requests`` requests decoding ``tokens`` each; their prompts fill the window (by default), so
    every token is decoded past it."""
    engine = make_engine(model, requests, window_stride=stride)
    params = [SamplingParams(max_tokens=tokens, temperature=0.8, seed=i) for i in range(requests)]
    prompts = random_prompts(requests, prompt_tokens or model.config.block_size)
    seconds, results = timed_generate(engine, prompts, params, device)
    generated = sum(len(r.token_ids) for r in results)
    return {"tokens_per_s": generated / seconds, "ms_per_token": 1e3 * seconds / generated * requests}


def batchmates(model, stride: int, n: int, windowed: int, tokens: int, device) -> dict:
    """Step rate (steps/s) of ``n - windowed`` short requests while ``windowed`` batch-mates decode past
    the window, as a share of the step rate of ``n`` short requests. Counted from the first step with
    every request admitted until the short requests finish: each short request gets one token per step."""
    bs = model.config.block_size

    def run(long_prompts: int) -> tuple[float, float]:
        engine = make_engine(model, n, window_stride=stride)
        prompts = random_prompts(long_prompts, bs) + random_prompts(n - long_prompts, PROMPT_TOKENS)
        for i, prompt in enumerate(prompts):
            engine.add_request(i, prompt, SamplingParams(max_tokens=tokens, temperature=0.8, seed=i))
        while engine.waiting:  # admission (prefill) steps are not steady state
            engine.step()
        short, steps, long_tokens = set(range(windowed, n)), 0, 0
        synchronize(device)
        start = time.perf_counter()
        while short:
            for out in engine.step():
                long_tokens += out.request_id < windowed
                if out.finished:
                    short.discard(out.request_id)
            steps += 1
        synchronize(device)
        seconds = time.perf_counter() - start
        return steps / seconds, long_tokens / seconds / max(windowed, 1)

    alone, _ = run(0)
    mixed, long_rate = run(windowed)
    return {"steps_per_s_all_short": alone, "steps_per_s_with_windowed": mixed, "share": mixed / alone,
            "windowed_tokens_per_s_each": long_rate}


# ----- past the window: quality on the demo model -----


def demo_stream(tokenizer, documents: int, seed: int = 1) -> list[int]:
    """Demo-corpus documents (a corpus of another seed than training) end to end, each closed by EOT."""
    eot = tokenizer.token_to_id(demo.EOT)
    return [t for doc in demo.make_corpus(seed=seed, size=documents) for t in tokenizer.encode(doc).ids + [eot]]


@torch.inference_mode()
def strided_predictions(model, ids: list[int], stride: int, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced: for each of ``ids[1:]``, its cross-entropy and the argmax token, predicted from
    the context the engine holds at ``stride``. Window 0 is ids[0:bs] and scores every position; window
    j > 0 starts at j * stride and scores only its last ``stride`` positions (the tokens decoded from
    it). No cache: one forward per window, ``batch`` windows at a time."""
    bs = model.config.block_size
    keep = bs - stride + 1
    windows = [(0, 0)] + [(j * stride, keep - 1) for j in range(1, math.ceil((len(ids) - keep) / stride))]
    nll, argmax = [], []
    for length, group in itertools.groupby(windows, key=lambda w: min(bs, len(ids) - 1 - w[0])):
        group = list(group)
        for chunk in (group[i : i + batch] for i in range(0, len(group), batch)):
            x = torch.tensor([ids[s : s + length] for s, _ in chunk])
            y = torch.tensor([ids[s + 1 : s + length + 1] for s, _ in chunk])
            logits = model(x).float()  # (B, length, vocab)
            losses = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, length)
            for row, (_, first) in enumerate(chunk):
                nll.append(losses[row, first:])
                argmax.append(logits[row, first:].argmax(-1))
    nll, argmax = torch.cat(nll), torch.cat(argmax)
    assert len(nll) == len(ids) - 1, (len(nll), len(ids))
    return nll, argmax


def window_quality(demo_dir: Path, strides, prompts: int, tokens: int, documents: int) -> dict:
    """Each stride against stride 1 (the seed's crop) on the demo model: greedy tokens of chat prompts
    decoded far past the window; teacher-forced next-token argmax and perplexity on a stream of demo
    documents."""
    model = load_model(demo_dir / demo.CHECKPOINT)
    tokenizer = load_tokenizer(demo_dir / demo.TOKENIZER, model.config.vocab_size)
    questions = [doc.split("[QUESTION]\n", 1)[1].split("\n[/QUESTION]", 1)[0]
                 for doc in demo.make_corpus(seed=2, size=prompts)]
    prompt_ids = [tokenizer.encode(demo.chat_prompt(q)).ids for q in questions]
    # tokens decoded while the context still fits the window are the same for every stride
    past = [model.config.block_size + 1 - len(p) for p in prompt_ids]
    stream = demo_stream(tokenizer, documents)
    greedy, predicted, rows = {}, {}, {}
    exact = strides[0]
    for stride in strides:
        # no tokenizer: no end-of-text stop, so every answer runs on into further documents, past the window
        engine = Engine(model, max_batch=prompts, max_prefill_tokens=SETTINGS.max_prefill_tokens, window_stride=stride)
        greedy[stride] = [r.token_ids for r in engine.generate(prompt_ids, [SamplingParams(tokens, temperature=0)] * prompts)]
        nll, predicted[stride] = strided_predictions(model, stream, stride)
        same = [sum(1 for _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(a[k:], b[k:])))
                for a, b, k in zip(greedy[exact], greedy[stride], past)]
        rows[stride] = {
            "past_window_equal_before_divergence": sum(same) / sum(tokens - k for k in past),
            "identical_share": sum(a == b for a, b in zip(greedy[exact], greedy[stride])) / prompts,
            "next_token_agreement": (predicted[stride] == predicted[exact]).float().mean().item(),
            "perplexity": math.exp(nll.mean().item()),
        }
        print(f"  window quality stride {stride:3d} {rows[stride]}", file=sys.stderr)
    return {"prompts": prompts, "tokens": tokens, "stream_tokens": len(stream), "documents": documents,
            "reference_stride": exact, "strides": rows}


# ----- profile of a steady decode step -----


PHASES = {  # engine method -> what it does in a step
    "_decode": "decode forward (model, cache writes)",
    "_prefill": "prefill forward",
    "_append": "append: detokenize, stop checks (per request)",
    "_decode_rows_first": "scheduling",
    "_take_prefill_work": "scheduling",
    "_retire": "scheduling",
    "_queue_full_rows": "scheduling",
}


def profile_step(model, n: int, steps: int, device) -> dict:
    """Wall time per phase of a steady decode step of ``n`` requests (perf_counter around each engine
    method and around ``sample``), and the torch operators that take the most time (torch profiler)."""
    import jaiserve.engine as engine_module

    engine = make_engine(model, n)
    params = [SamplingParams(max_tokens=10 * steps, temperature=0.8, top_k=50, seed=i) for i in range(n)]
    for i, prompt in enumerate(random_prompts(n, PROMPT_TOKENS)):
        engine.add_request(i, prompt, params[i])
    while len(engine.rows) < n or engine.waiting:  # admitted and prefilled: only decode steps follow
        engine.step()
    spent: dict[str, float] = {}

    def timed(label, fn):
        def wrapper(*a, **k):
            synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                synchronize(device)
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start
        return wrapper

    for method, label in PHASES.items():
        setattr(engine, method, timed(label, getattr(engine, method)))
    real_sample = engine_module.sample
    engine_module.sample = timed("sample: temperature, top-k, draws", real_sample)
    try:
        for _ in range(3):
            engine.step()
        spent.clear()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
        phases = {label: 1e3 * t / steps for label, t in spent.items()}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
    finally:
        engine_module.sample = real_sample
    phases["rest of step() (Python glue)"] = 1e3 * wall / steps - sum(phases.values())
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
            "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps} for e in ops[:12]]
    return {"requests": n, "steps": steps, "ms_per_step": 1e3 * wall / steps, "phases_ms": phases, "top_ops": top,
            "operator_calls_per_step": sum(e.count for e in ops) / steps}


# ----- what this machine allows -----


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def floors(model, concurrency: int, context: int) -> dict:
    """Memory read bandwidth, the GEMM rate of the model's own Linear layers, and the tokens/s they
    allow: one request reads every Linear weight once per token; ``concurrency`` requests at ``context``
    cached tokens spend one step on their Linear FLOPs (at the measured rate) plus reading their K/V."""
    block = torch.ones(80 * 2**20, dtype=torch.float32)  # 320 MB, written (untouched pages read as zeros from cache)
    bandwidth = block.numel() * 4 / _median_seconds(block.sum, 7)
    del block
    linears = [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    weights = sum(m.in_features * m.out_features for m in linears)  # multiply-adds per token
    bytes_per_value = torch.float32.itemsize  # a float32 weight, key or value

    def chain_seconds(rows: int) -> float:  # every Linear once, in model order: weights come from memory
        inputs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
        with torch.inference_mode():
            return _median_seconds(lambda: [m(inputs[m.in_features]) for m in linears], 5)

    one_row, many_rows = chain_seconds(1), chain_seconds(concurrency)
    gemm = 2 * weights * concurrency / many_rows  # FLOP/s
    c = model.config
    kv_bytes = concurrency * 2 * c.n_layer * context * c.n_embd * bytes_per_value  # K and V of every row
    step = 2 * weights * concurrency / gemm + kv_bytes / bandwidth
    result = {
        "bandwidth_gb_s": bandwidth / 1e9, "linear_weights": weights, "weight_mb": weights * bytes_per_value / 1e6,
        "gemm_gflop_s": gemm / 1e9, "concurrency": concurrency, "context": context,
        "linear_chain_ms_1_row": 1e3 * one_row, "linear_chain_ms_many_rows": 1e3 * many_rows,
        "kv_mb_per_step": kv_bytes / 1e6,
        "floor_1": bandwidth / (weights * bytes_per_value),  # float32 weights, read once per token
        "floor_1_int8": bandwidth / weights,  # one byte a weight
        "floor_many": concurrency / step,
    }
    print(f"  floors: {result['bandwidth_gb_s']:.1f} GB/s, {result['gemm_gflop_s']:.0f} GFLOP/s at {concurrency} rows; "
          f"{result['floor_1']:.0f} tokens/s at 1, {result['floor_many']:.0f} at {concurrency}", file=sys.stderr)
    return result


# ----- output -----


def print_tables(report: dict) -> None:
    print(f"\nMachine: {report['machine']}; torch {report['torch']}; device {report['device']}. Full default shape, "
          f"random weights, {PROMPT_TOKENS}-token prompts; shipped settings: max_prefill_tokens "
          f"{SETTINGS.max_prefill_tokens}, window_stride {SETTINGS.window_stride}.")
    if "throughput" in report:
        ref = report["reference_tokens_per_s"]
        print(f"\n{report['tokens']} tokens per request (temperature 0.8, top_k 50, seeded):\n")
        print("| | dtype | concurrency | tokens/s | x reference |\n|---|---|---:|---:|---:|")
        print(f"| seed reference (no cache) | float32 | 1 | {ref:.1f} | 1.0 |")
        for r in report["throughput"]:
            print(f"| {r['engine']} | {r['dtype']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | "
                  f"{r['tokens_per_s'] / ref:.1f} |")
    if "window" in report:
        w = report["window"]
        caption = (f"\nPast the window: speed of {w['requests']} requests whose {w['prompt_tokens']}-token prompts fill "
                   f"the window, {w['tokens']} tokens each (with {PROMPT_TOKENS}-token prompts, inside the window, "
                   f"they make {w['inside_tokens_per_s']:.1f} tokens/s)")
        if "quality" in w:
            q = w["quality"]
            caption += (f"; quality on the demo model against stride {q['reference_stride']}: greedy, {q['prompts']} "
                        f"chat prompts x {q['tokens']} tokens with no end-of-text stop (only tokens past the window "
                        f"compared), and teacher-forced on a stream of {q['documents']} demo documents "
                        f"({q['stream_tokens']} tokens)")
        print(caption)
        print("\n| window_stride | tokens kept | tokens/s past the window | vs inside | past-window tokens equal "
              "before divergence | answers identical | next-token argmax agreement | perplexity |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for stride, c in w["cost"].items():
            q = w.get("quality", {}).get("strides", {}).get(stride)
            quality = (f"{q['past_window_equal_before_divergence']:.1%} | {q['identical_share']:.0%} | "
                       f"{q['next_token_agreement']:.1%} | {q['perplexity']:.2f}") if q else "- | - | - | -"
            print(f"| {stride} | {w['block_size'] - int(stride) + 1} | {c['tokens_per_s']:.1f} | "
                  f"{c['tokens_per_s'] / w['inside_tokens_per_s']:.0%} | {quality} |")
    if "batchmates" in report:
        b = report["batchmates"]
        print(f"\nBatch of {b['requests']}, {b['windowed']} of them past the window, {b['tokens']} tokens each: "
              f"step rate of the other {b['requests'] - b['windowed']}\n")
        print("| window_stride | steps/s, all inside | steps/s, with windowed | share (goal >= 70%) "
              "| tokens/s of each windowed request |\n|---:|---:|---:|---:|---:|")
        for stride, r in b["strides"].items():
            print(f"| {stride} | {r['steps_per_s_all_short']:.1f} | {r['steps_per_s_with_windowed']:.1f} | "
                  f"{r['share']:.0%} | {r['windowed_tokens_per_s_each']:.1f} |")
    if "profile" in report:
        p = report["profile"]
        print(f"\nSteady decode step, {p['requests']} requests (float32, no tokenizer): {p['ms_per_step']:.2f} ms "
              f"per step, {p['operator_calls_per_step']:.0f} torch operator calls per step (profiled separately)"
              f"\n\n| phase | ms per step | share |\n|---|---:|---:|")
        for label, ms in sorted(p["phases_ms"].items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {ms:.2f} | {ms / p['ms_per_step']:.0%} |")
        print("\n| torch operator (self time) | ms per step | share of operator time | calls per step |\n|---|---:|---:|---:|")
        for op in p["top_ops"]:
            print(f"| {op['op']} | {op['ms_per_step']:.2f} | {op['share']:.0%} | {op['calls_per_step']:.0f} |")


def print_floors(f: dict, throughput: list[dict]) -> None:
    def measured(dtype: str) -> dict[int, float]:  # this engine's tokens/s by concurrency
        return {r["concurrency"]: r["tokens_per_s"] for r in throughput
                if r["engine"] == "this engine" and r["dtype"] == dtype}

    n = f["concurrency"]
    print(f"\nWhat this machine allows: memory read at {f['bandwidth_gb_s']:.1f} GB/s (a 320 MB tensor); the model's "
          f"{f['linear_weights'] / 1e6:.1f} M Linear weights ({f['weight_mb']:.0f} MB float32) run as one chain in "
          f"{f['linear_chain_ms_1_row']:.2f} ms for 1 row and {f['linear_chain_ms_many_rows']:.2f} ms for {n} rows "
          f"({f['gemm_gflop_s']:.0f} GFLOP/s); {n} rows at {f['context']} cached tokens read {f['kv_mb_per_step']:.0f} MB "
          f"of K/V per step.\n")
    print("| requests | bound | floor tokens/s | this engine | issue #14 goal |\n|---|---|---:|---:|---:|")
    fmt = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
    print(f"| 1, float32 | every weight read once per token | {f['floor_1']:.0f} | "
          f"{fmt(measured('float32').get(1))} | 300 |")
    print(f"| 1, int8 | one byte per weight | {f['floor_1_int8']:.0f} | {fmt(measured('int8').get(1))} | 800 |")
    print(f"| {n}, float32 | Linear FLOPs at the measured rate + K/V reads | {f['floor_many']:.0f} | "
          f"{fmt(measured('float32').get(n))} | {'2,000' if n == 64 else '-'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float32-aten", "int8"],
                        help="float32 = Linear layers packed for oneDNN, float32-aten = torch's nn.Linear")
    parser.add_argument("--strides", type=int, nargs="+", default=list(STRIDES))
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision of the baseline engine ('' = none)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--demo-dir", type=Path, default=demo.DEMO_DIR,
                        help="the demo model (default: the shipped demo/; built there once if missing)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, same code")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.concurrency, args.strides = 8, [1, 4], [1, 64]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type != "cpu":
        args.dtypes = [d for d in args.dtypes if d in ("float32", "bfloat16")]  # fbgemm, oneDNN: CPU only
    began = time.perf_counter()
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    report = {"machine": machine, "torch": torch.__version__, "device": str(device), "tokens": args.tokens}
    torch.manual_seed(0)
    reference = ReferenceGPT().to(device).eval()
    with tempfile.TemporaryDirectory(prefix="jai-engine-bench-") as scratch:
        checkpoint = Path(scratch) / "ckpt.pt"  # the engines load the seed's checkpoint format
        torch.save({"model": reference.state_dict()}, checkpoint)
        if "throughput" in args.sections:
            report["reference_tokens_per_s"] = reference_tokens_per_s(reference, args.tokens, device)
            print(f"  seed reference {report['reference_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
            baseline = baseline_package(args.baseline, Path(scratch)) if args.baseline else None
            report["throughput"] = throughput(checkpoint, args, device, baseline)
        model = load_model(checkpoint, device=device)
    requests, tokens = (2, 8) if args.quick else (4, args.tokens)
    if "window" in args.sections:
        bs = model.config.block_size
        inside = window_cost(model, 1, requests, tokens, device, prompt_tokens=PROMPT_TOKENS)
        report["window"] = {"requests": requests, "tokens": tokens, "prompt_tokens": bs, "block_size": bs,
                            "inside_tokens_per_s": inside["tokens_per_s"], "cost": {}}
        for stride in args.strides:
            report["window"]["cost"][stride] = window_cost(model, stride, requests, tokens, device)
            print(f"  past the window, stride {stride:3d}: {report['window']['cost'][stride]['tokens_per_s']:.1f} tokens/s",
                  file=sys.stderr)
        sizes = dict(prompts=2, tokens=260, documents=4) if args.quick else dict(prompts=8, tokens=320, documents=30)
        report["window"]["quality"] = window_quality(demo_model_dir(args.demo_dir), args.strides, **sizes)
    if "batchmates" in args.sections:
        n, windowed = (8, 2) if args.quick else (32, 4)
        report["batchmates"] = {"requests": n, "windowed": windowed, "tokens": tokens, "strides": {}}
        for stride in args.strides:
            result = batchmates(model, stride, n, windowed, tokens, device)
            report["batchmates"]["strides"][stride] = result
            print(f"  batch-mates, stride {stride:3d}: {result['share']:.0%} of their step rate", file=sys.stderr)
    if "profile" in args.sections:
        report["profile"] = profile_step(model, 8 if args.quick else 32, 5 if args.quick else 40, device)
    if "floors" in args.sections and device.type == "cpu":
        report["floors"] = floors(model, max(args.concurrency), PROMPT_TOKENS + args.tokens // 2)
    report["seconds"] = time.perf_counter() - began
    print_tables(report)
    if "floors" in report:
        print_floors(report["floors"], report.get("throughput", []))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} in {report['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
