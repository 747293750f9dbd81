"""JAI served by TorchServe beside llama.cpp's llama-server on the same checkpoint, and our engine in-process.

    .venv/bin/python bench/peer_bench.py [--clients 1 4 16 64] [--rounds 2] [--tokens 128]
                                         [--dtypes float32 int8 bfloat16] [--requests-per-client 2]
                                         [--llama-version 0.3.36] [--portable] [--plot bench/results/peer.png]

One load generator drives both servers through their OpenAI completion routes (streamed, temperature 0.8,
top_k 50, seeded; llama-server's other samplers switched off and ``ignore_eos`` set, so both make every
token asked for): closed loop, each client sending its next request when the last one ends. Concurrency
levels run in turn on each server, ``--rounds`` times, servers interleaved; medians are reported. Our
engine alone (``Engine.generate``, same settings as served) runs the same requests in this process while
both servers sit idle, for the served / in-process ratio.

The model is the seed's full default shape (24000/256/6/6/384) with random weights and load_bench's
synthetic 24000-token tokenizer, written to GGUF by scripts/export_gguf.py. llama-server runs 64 slots of
256 positions, ``--threads 2``, continuous batching; torchserve the repo's config.properties and
model-config.yaml. Per ``--dtypes`` entry, our server with that ``handler.dtype`` beside llama-server on the
GGUF of the same precision (PEER_TYPES: float32 / F32, int8 / Q8_0, bfloat16 / BF16); each row's ratio is
to the llama-server of its own precision.

llama-server is built once from the llama.cpp sources that PyPI distributes (the source distribution of
``llama-cpp-python``, its ``vendor/llama.cpp``) into ``~/.cache/jai-serve/llama.cpp`` with cmake: a native
build first (``GGML_NATIVE``: this CPU's instructions), checked by serving a q8_0 export of the model; if
that build fails or the binary dies (a VM may refuse instructions its CPU reports), a portable build
(``GGML_NATIVE=OFF``: AVX2, FMA, F16C; scripts/llama_server.py). It takes minutes: not in CI.
Writes bench/results/peer.json. Compare within one run, with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "tests"), str(ROOT / "bench"), str(ROOT)]

from engine_bench import PROMPT_TOKENS, make_engine  # noqa: E402
from jaiserve import SamplingParams, load_model, load_tokenizer  # noqa: E402
from load_bench import (  # noqa: E402
    _read_events, draw_levels, make_bench_model, median_row, run_clients, summarize)
from scripts import llama_server  # noqa: E402
from scripts.export_gguf import export  # noqa: E402
from ts_launcher import archive, running_torchserve  # noqa: E402

SLOTS = 64  # llama-server --parallel: as many sequences as our batchSize
# Warm-up, (clients, tokens) runs before the measured rounds, each server as it serves best. TorchServe's
# JVM compiles its hot paths for a while: after 16 clients x 32 tokens, three 64-client runs in a row took
# 1,679 / 1,868 / 1,960 tokens/s while the JIT's C2 thread fell from 8.4% to 3.6% to 2.1% of a core (2-core
# Xeon); a server that has run for minutes is the one users meet. llama-server, compiled ahead of time, gets
# the short warm-up only: after 64 concurrent clients it serves 16 at 454 instead of 1,158 tokens/s for as
# long as it runs (same binary, same hour), which is its weakness, not the bar. Levels run from the fewest
# clients up, so no llama-server level below 64 follows a 64-client round either.
WARM_UP = {"torchserve": [(16, 32), (64, 128), (64, 128), (64, 128)], "llama-server": [(16, 32)]}
TEMPERATURE, TOP_K = 0.8, 50
LLAMA, OURS, IN_PROCESS = "llama-server", "JAI (TorchServe)", "JAI in-process"
LLAMA_NATIVE = "llama-server, native build"
# our handler.dtype -> the GGUF type llama-server serves beside it: the same bytes per Linear weight
PEER_TYPES = {"float32": "f32", "int8": "q8_0", "bfloat16": "bf16"}
SHIPPED_VMARGS = re.search(r"^vmargs=(.*)$", (ROOT / "config.properties").read_text(), flags=re.M).group(1)
# --variants: more torchserve servers beside the shipped one, each with these config.properties lines and
# model-config.yaml handler keys; "a+b" serves both variants' settings together
VARIANTS = {
    # the C1 compiler only, on top of the shipped JVM settings (C2's compiles compete with the engine)
    "lean-jvm": ({"vmargs": f"{SHIPPED_VMARGS} -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1"}, {}),
    # TorchServe's own JVM sizing: the parallel GC's threads, Netty's default thread counts (0: 2 x cores)
    "default-jvm": ({"vmargs": SHIPPED_VMARGS.replace(" -XX:+UseSerialGC", ""), "number_of_netty_threads": "0",
                     "netty_client_threads": "0"}, {}),
    **{f"one-thread-{rows}": ({}, {"one_thread_rows": rows}) for rows in (0, 2, 4, 8, 16, 32, 64)},
}


def variant(name: str) -> tuple[dict, dict]:
    """config.properties lines and handler keys of ``name`` ("a+b": both)."""
    properties, handler = {}, {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; known: {', '.join(VARIANTS)}")
        properties.update(VARIANTS[part][0])
        handler.update(VARIANTS[part][1])
    return properties, handler


# ----- our server through the same client -----


@dataclass
class TorchServeTarget:
    server: object  # ts_launcher.Server
    name: str = OURS

    @property
    def completions_url(self) -> str:
        return f"{self.server.inference}/predictions/jai/1.0/v1/completions"

    def headers(self) -> dict:
        return self.server.headers()

    def body(self, body: dict) -> dict:
        return body


# ----- load -----


def client(target, n_requests: int, tokens: int, seed: int, out: list, gate: threading.Barrier) -> None:
    headers = target.headers()
    gate.wait()
    for i in range(n_requests):
        body = target.body({"model": "jai", "prompt": f"bench {seed} {i} hello", "max_tokens": tokens,
                            "temperature": TEMPERATURE, "top_k": TOP_K, "seed": seed * 1000 + i, "stream": True,
                            "stream_options": {"include_usage": True}})
        sent = time.perf_counter()
        # a connection per request, for both servers: llama-server's HTTP library sometimes closes a kept-alive
        # connection after a stream, which a reused session meets as "Remote end closed connection"
        response = requests.post(target.completions_url, json=body, headers=headers, stream=True, timeout=600)
        response.raise_for_status()
        arrivals: list[float] = []
        generated = _read_events(response, arrivals)
        out.append({"sent": sent, "arrivals": arrivals, "tokens": generated})


def run_level(target, clients: int, requests_per_client: int, tokens: int) -> dict:
    results, wall, client_cpu = run_clients(
        lambda c, results, gate: client(target, requests_per_client, tokens, c, results, gate), clients)
    if len(results) != clients * requests_per_client:
        raise RuntimeError(f"{target.name}: {clients * requests_per_client - len(results)} requests failed")
    return summarize(results, clients, wall, client_cpu)


def in_process(engine_model, tokenizer, clients: int, requests_per_client: int, tokens: int) -> dict:
    """The same requests through ``Engine.generate`` in this process: ``clients`` at a time, in waves, on
    torch's threads at every step (what the engine makes with both cores to itself). With the tokenizer, as
    served: each token detokenized, sampling UTF-8 safe (without them the engine made 4% more at 64 rows)."""
    engine = make_engine(engine_model, SLOTS, tokenizer=tokenizer)
    engine.generate([[1] * 4], [SamplingParams(max_tokens=4)])  # warm-up
    produced, began = 0, time.perf_counter()
    for wave in range(requests_per_client):
        prompts = [torch.randint(0, 24000, (PROMPT_TOKENS,)).tolist() for _ in range(clients)]
        params = [SamplingParams(max_tokens=tokens, temperature=TEMPERATURE, top_k=TOP_K, seed=c * 1000 + wave)
                  for c in range(clients)]
        produced += sum(len(r.token_ids) for r in engine.generate(prompts, params))
    return {"clients": clients, "requests": clients * requests_per_client,
            "tokens_per_s": produced / (time.perf_counter() - began)}


def quiet(busy_below: float = 0.1, window_s: float = 0.5, limit_s: float = 20.0) -> float:
    """Wait until the machine's CPUs are idle for a window (the JVMs compile and collect for seconds after a
    burst of load, and two lockstep threads, ours or llama.cpp's, lose most of a step to any other busy
    thread); returns the busy share of the last window."""
    def busy_and_total() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)  # not idle, not iowait
    deadline = time.monotonic() + limit_s
    while True:
        (b0, t0), _ = busy_and_total(), time.sleep(window_s)
        b1, t1 = busy_and_total()
        share = (b1 - b0) / max(t1 - t0, 1)
        if share < busy_below or time.monotonic() > deadline:
            return share


# ----- report -----


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def print_table(rows: list[dict]) -> None:
    """Per concurrency, every target's figures, and each one's tokens/s against the faster llama-server of its
    precision and against our engine in-process in its dtype."""
    print("| clients | server | dtype | tokens/s | / best llama-server, same precision | / JAI in-process "
          "| TTFT p50 / p99 (ms) | gap p50 / p99 (ms) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        same = [p for p in rows if p["clients"] == r["clients"] and p["dtype"] == r["dtype"]]
        alone = next((p for p in same if p["target"].startswith(IN_PROCESS)), None)
        llama = max((p for p in same if p["target"].startswith(LLAMA)), key=lambda p: p["tokens_per_s"], default=None)
        tokens = f"{r['tokens_per_s']:.0f}"
        if len(r.get("tokens_per_s_runs", ())) > 1:
            tokens += f" ({min(r['tokens_per_s_runs']):.0f}-{max(r['tokens_per_s_runs']):.0f})"
        to_llama, to_alone = (f"{r['tokens_per_s'] / o['tokens_per_s']:.2f}" if o else "" for o in (llama, alone))
        timing = ("| | " if r["target"].startswith(IN_PROCESS) else
                  f"| {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | {r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f} ")
        print(f"| {r['clients']} | {r['target']} | {r['dtype']} | {tokens} | {to_llama} | {to_alone} {timing}|")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """A row of two panels (tokens/s, TTFT p50) per dtype: llama-server's builds, JAI served, JAI in-process."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(11, 3.6 * len(dtypes)), squeeze=False)
    for dtype, (left, right) in zip(dtypes, axes):
        mine = [r for r in rows if r["dtype"] == dtype]
        series = {t: [r for r in mine if r["target"] == t] for t in dict.fromkeys(r["target"] for r in mine)}
        styles = {t: {"color": "tab:olive" if t.startswith(LLAMA_NATIVE) else "tab:green" if t.startswith(LLAMA)
                      else "tab:gray" if t.startswith(IN_PROCESS) else "tab:blue",
                      "linestyle": "--" if t.startswith(IN_PROCESS) else "-"} for t in series}
        draw_levels(series, left, right, styles)
        left.set_title(f"{dtype}: tokens/s (higher is better)")
        right.set_title(f"{dtype}: TTFT p50, ms (lower is better)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", choices=list(PEER_TYPES), default=list(PEER_TYPES),
                        help="our handler.dtype values, each beside llama-server on the GGUF of its precision")
    parser.add_argument("--llama-version", default=llama_server.VERSION)
    parser.add_argument("--portable", action="store_true", help="skip the native build")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="also serve these float32 variants beside the shipped configuration "
                             f"({', '.join(VARIANTS)}; a+b for both)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "peer.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "peer.png")
    args = parser.parse_args()
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="jai-peer-") as scratch:
        scratch = Path(scratch)
        checkpoint, tokenizer = make_bench_model(scratch)
        ggufs = {t: export(checkpoint, tokenizer, scratch / f"jai-{t}.gguf", t) for t in ("f32", "q8_0", "bf16")}
        # the build's check runs a quantized model too
        binary = llama_server.working_binary([ggufs["f32"], ggufs["q8_0"]], scratch, args.llama_version, args.portable)
        native = llama_server.binary_path(args.llama_version, portable=False)
        shipped = yaml.safe_load((ROOT / "model-config.yaml").read_text())
        settings = shipped["handler"]
        models = {dtype: load_model(checkpoint, dtype=dtype, cpu_linear=settings["cpu_linear"])
                  for dtype in args.dtypes}
        block_size = next(iter(models.values())).config.block_size
        engine_tokenizer = load_tokenizer(tokenizer, next(iter(models.values())).config.vocab_size)
        torch.set_num_threads(settings.get("threads") or torch.get_num_threads())
        with contextlib.ExitStack() as stack:  # every server up at once; one is loaded at a time
            targets = []
            for dtype in args.dtypes:
                gguf_type = PEER_TYPES[dtype]
                gguf = ggufs[gguf_type]
                llama = stack.enter_context(llama_server.running(
                    binary, gguf, scratch / f"llama-{gguf_type}.log", SLOTS, block_size, name=f"{LLAMA} {gguf_type}"))
                targets.append((llama, dtype))
                if native != binary and native.exists() and llama_server.runs(native, gguf, scratch):
                    # the native build refused the check's q8_0 but serves this type: the faster peer is the bar
                    targets.append((stack.enter_context(llama_server.running(
                        native, gguf, scratch / f"llama-native-{gguf_type}.log", SLOTS, block_size,
                        name=f"{LLAMA_NATIVE} {gguf_type}")), dtype))
            served = [(dtype, None) for dtype in args.dtypes] + [("float32", name) for name in args.variants]
            for n, (dtype, variant_name) in enumerate(served):
                root = scratch / f"ts-{n}"
                root.mkdir()
                properties, handler = variant(variant_name) if variant_name else ({}, {})
                config = {**shipped, "handler": {**settings, "dtype": dtype, **handler}}
                (root / "model-config.yaml").write_text(yaml.safe_dump(config))
                archive(root, checkpoint, tokenizer, root / "model-config.yaml")
                server = stack.enter_context(running_torchserve(root, properties=properties))
                name = f"{OURS} {dtype}" + (f", {variant_name}" if variant_name else "")
                targets.append((TorchServeTarget(server, name), dtype))
            for target, _ in targets:
                for clients, tokens in WARM_UP["torchserve" if isinstance(target, TorchServeTarget) else "llama-server"]:
                    run_level(target, clients, 2, tokens)
            for clients in args.clients:
                runs: dict[str, list[dict]] = {}
                for _round in range(args.rounds):
                    for target, dtype in targets:
                        busy = quiet()  # the other CPU use just before: > 0.1 means the wait gave up
                        row = {"target": target.name, "dtype": dtype, "busy_before": busy,
                               **run_level(target, clients, args.requests_per_client, args.tokens)}
                        runs.setdefault(target.name, []).append(row)
                        print(f"  {target.name:30s} {clients:3d} clients {row['tokens_per_s']:7.1f} tokens/s "
                              f"ttft p50 {row['ttft_ms_p50']:6.0f} ms", file=sys.stderr)
                    for dtype, model in models.items():
                        busy = quiet()
                        alone = {"target": f"{IN_PROCESS} {dtype}", "dtype": dtype, "busy_before": busy,
                                 **in_process(model, engine_tokenizer, clients, args.requests_per_client, args.tokens)}
                        runs.setdefault(alone["target"], []).append(alone)
                        print(f"  {alone['target']:30s} {clients:3d} clients {alone['tokens_per_s']:7.1f} tokens/s",
                              file=sys.stderr)
                rows += [median_row(level) for level in runs.values()]
    title = (f"JAI vs llama-server, full default shape, {' / '.join(args.dtypes)}, {args.tokens} tokens streamed; "
             f"{machine}")
    print(f"\n{title}; median of {args.rounds} rounds\n")
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "llama_cpp_python": args.llama_version,
                                    "llama_server": str(binary), "tokens": args.tokens, "rounds": args.rounds,
                                    "requests_per_client": args.requests_per_client, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot, title)


if __name__ == "__main__":
    main()
