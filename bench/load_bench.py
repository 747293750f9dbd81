"""Closed-loop load against a real torchserve: N clients, each sending its next request as soon as the
last one is answered. Reports aggregate tokens/s, time to first token, inter-token latency and request
latency (p50/p99) per concurrency, for each TorchServe batching mode; then a mixed-length run (max_tokens
drawn from 16..512, clients starting at random times) per mode.

    .venv/bin/python bench/load_bench.py [--modes default continuous] [--clients 1 4 16 64]
                                         [--tokens 128] [--requests-per-client 2] [--rounds 1] [--no-stream]
                                         [--budgets 25] [--step-ahead on off] [--mixed-clients 16]
                                         [--plot PNG]
                                         [--routes native openai]

``--budgets`` runs the continuous batcher once per ``handler.step_budget_ms`` value (ms of engine steps
per handle() call) and ``--step-ahead on off`` once with and once without ``handler.step_ahead`` (the next
step running during the frontend round trip); the continuous batcher needs the frontend patch (torchserve-patch/, loaded by
config.properties). ``--routes native openai`` sends the same load through both HTTP views on the same
server, one after the other at each concurrency: ``POST /predictions/jai`` (NDJSON lines) and
``POST /predictions/jai/1.0/v1/completions`` (server-sent events, usage in the last chunk).

The model is the seed's full default shape (24000/256/6/6/384) with random weights and a synthetic
24000-token tokenizer (every token decodes to a few ASCII letters, so every token is one stream line),
served from the repo's config.properties and model-config.yaml (batching keys overridden per mode) on
free ports. Every configuration's server is started first and each concurrency level then runs on each
server in turn, so modes are compared minutes apart; ``--rounds N`` repeats that N times (servers still
interleaved) and reports each figure's median over the rounds, with every round's tokens/s kept
(``tokens_per_s_runs``): on this shared machine one run's figures move by 10-20%. The mixed run runs once.
Writes bench/results/load.json. Compare modes within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import statistics
import string
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "handler"), str(ROOT / "tests"), str(ROOT)]

from reference_gpt import ReferenceGPT  # noqa: E402
from ts_launcher import archive, running_torchserve  # noqa: E402

MODES = {  # model-config.yaml overrides per TorchServe batcher
    "default": {"continuousBatching": False},
    "continuous": {"continuousBatching": True},
}
MIXED_TOKENS = (16, 512)  # the mixed run's max_tokens range
ROUTES = ("native", "openai")  # the two HTTP views of the same engine (jaiserve/api.py)


def make_bench_model(directory: Path) -> tuple[Path, Path]:
    """Random full-shape checkpoint in the seed's format and a 24000-token byte-level tokenizer."""
    checkpoint, tokenizer_path = directory / "ckpt.pt", directory / "tokenizer.json"
    if checkpoint.exists() and tokenizer_path.exists():
        return checkpoint, tokenizer_path
    torch.manual_seed(0)
    torch.save({"model": ReferenceGPT().state_dict()}, checkpoint)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    words = ("".join(w) for n in itertools.count(2) for w in itertools.product(string.ascii_lowercase, repeat=n))
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    for word in words:
        if len(vocab) == 24000:
            break
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(tokenizer_path))
    return checkpoint, tokenizer_path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def client_loop(server, n_requests: int, tokens, stream: bool, seed: int, out: list, start_gate, delay=0.0,
                route: str = "native"):
    """``tokens``: max_tokens of every request, or a (low, high) range to draw each from."""
    session = requests.Session()
    headers = server.headers()
    draw = random.Random(seed)
    start_gate.wait()
    time.sleep(delay)  # the mixed run: clients start at random times
    for i in range(n_requests):
        max_tokens = draw.randint(*tokens) if isinstance(tokens, tuple) else tokens
        body = {"prompt": f"bench {seed} {i} hello", "max_tokens": max_tokens, "temperature": 0.8,
                "seed": seed * 1000 + i, "stream": stream}
        url = f"{server.inference}/predictions/jai"
        if route == "openai":
            url += "/1.0/v1/completions"
            body["model"] = "jai"
            if stream:
                body["stream_options"] = {"include_usage": True}
        sent = time.perf_counter()
        response = session.post(url, json=body, headers=headers, stream=stream, timeout=600)
        response.raise_for_status()
        arrivals, generated = [], 0
        if stream:
            read = _read_events if route == "openai" else _read_lines
            generated = read(response, arrivals)
        else:
            arrivals.append(time.perf_counter())
            generated = response.json()["usage"]["completion_tokens"]
        out.append({"sent": sent, "arrivals": arrivals, "tokens": generated})


def _read_lines(response, arrivals: list) -> int:
    """Native NDJSON: one arrival per line; the last line has the usage."""
    for line in response.iter_lines():
        if line:
            arrivals.append(time.perf_counter())
            last = json.loads(line)
    return last["usage"]["completion_tokens"]


def _read_events(response, arrivals: list) -> int:
    """OpenAI server-sent events: one arrival per chunk that carries text; the usage comes with the last
    chunk (ours: a chunk of its own without choices; llama-server: beside the last choice)."""
    usage = None
    for line in response.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if any(choice.get("text") for choice in chunk.get("choices", ())):
            arrivals.append(time.perf_counter())
        usage = chunk.get("usage") or usage
    if usage is None:
        raise RuntimeError("the stream ended without usage (was stream_options.include_usage sent?)")
    return usage["completion_tokens"]


def run_level(server, clients: int, requests_per_client: int, tokens, stream: bool, spread: float = 0.0,
              route: str = "native") -> dict:
    """One closed-loop run; ``spread`` > 0 starts each client after a random delay of up to that many s."""
    delays = [random.Random(c).uniform(0, spread) for c in range(clients)]
    results, wall, client_cpu = run_clients(
        lambda c, results, gate: client_loop(server, requests_per_client, tokens, stream, c, results, gate,
                                             delays[c], route), clients)
    return summarize(results, clients, wall, client_cpu, stream)


def run_clients(client, clients: int) -> tuple[list[dict], float, float]:
    """Run ``client(c, results, gate)`` on a thread per client, all released together at ``gate``; returns
    the results they appended, the wall seconds from the release and this process's cores meanwhile (the
    load generator's share of a machine it shares with the servers). Also bench/peer_bench.py."""
    results: list[dict] = []
    gate = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=client, args=(c, results, gate)) for c in range(clients)]
    for t in threads:
        t.start()
    gate.wait()
    began, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return results, wall, (time.process_time() - cpu) / wall


def summarize(results: list[dict], clients: int, wall: float, client_cpu: float, stream: bool = True) -> dict:
    """One closed-loop run's figures from its requests' send and arrival times (also bench/peer_bench.py)."""
    ttft = [(r["arrivals"][0] - r["sent"]) * 1000 for r in results] if stream else []
    itl = [(b - a) * 1000 for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    latency = [(r["arrivals"][-1] - r["sent"]) * 1000 for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
        "latency_ms_p50": percentile(latency, 50), "latency_ms_p99": percentile(latency, 99),
        "client_cpu_cores": client_cpu,
    }


def median_row(runs: list[dict]) -> dict:
    """One concurrency level run ``len(runs)`` times on one server: every figure's median, and each
    round's tokens/s."""
    row = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            row[key] = statistics.median(r[key] for r in runs)
    row["requests"] = sum(r["requests"] for r in runs)
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return row


def configurations(modes: list[str], budgets: list[float], aheads: list[bool]) -> list[tuple[str, dict]]:
    """(label, model-config overrides) per server to start: the continuous batcher once per budget and
    step-ahead setting."""
    out = []
    for mode in modes:
        if mode == "continuous":
            for budget, ahead in itertools.product(budgets, aheads):
                label = "continuous" + f" {budget:g} ms" * (len(budgets) > 1)
                label += (", step ahead" if ahead else ", no step ahead") * (len(aheads) > 1)
                out.append((label, {**MODES[mode], "handler": {"step_budget_ms": budget, "step_ahead": ahead}}))
        else:
            out.append((mode, MODES[mode]))
    return out


def plot(rows: list[dict], path: Path) -> None:
    series = {label: [r for r in rows if _label(r) == label and not r.get("mixed")]
              for label in dict.fromkeys(_label(r) for r in rows if not r.get("mixed"))}
    plot_levels(series, path, "TorchServe batchers, full default shape, float32, 2 cores (bench/load_bench.py)")


def plot_levels(series: dict[str, list[dict]], path: Path, title: str) -> None:
    """Tokens/s (with every round's range when there are several) and TTFT p50 against concurrency, a line
    per label; rows without a TTFT (an in-process run) only on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    draw_levels(series, left, right)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw_levels(series: dict[str, list[dict]], left, right, styles: dict[str, dict] | None = None) -> None:
    """plot_levels' two panels on given matplotlib axes (also bench/peer_bench.py, a pair per dtype);
    ``styles``: line keyword arguments per label."""
    for label, mine in series.items():
        style = (styles or {}).get(label, {})
        clients = [r["clients"] for r in mine]
        [line] = left.plot(clients, [r["tokens_per_s"] for r in mine], marker="o", label=label, **style)
        if all(len(r.get("tokens_per_s_runs", ())) > 1 for r in mine):  # --rounds: every round's spread
            left.fill_between(clients, [min(r["tokens_per_s_runs"]) for r in mine],
                              [max(r["tokens_per_s_runs"]) for r in mine], color=line.get_color(), alpha=0.2)
        if "ttft_ms_p50" in mine[0]:
            right.plot(clients, [r["ttft_ms_p50"] for r in mine], marker="o", label=label, **style)
    for axis, name in ((left, "tokens/s (higher is better)"), (right, "TTFT p50, ms (lower is better)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent streaming clients")
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    right.set_yscale("log")


def _label(row: dict) -> str:
    return row["mode"] if row.get("route", "native") == "native" else f"{row['mode']}, {row['route']} route"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every concurrency level this many times (servers interleaved); report medians")
    parser.add_argument("--batch-size", type=int, default=64, help="model-config batchSize (engine slots)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[None],
                        help="handler.step_budget_ms values for the continuous batcher (default: the yaml's)")
    parser.add_argument("--step-ahead", nargs="+", default=[None], choices=["on", "off"],
                        help="handler.step_ahead values for the continuous batcher (default: the yaml's)")
    parser.add_argument("--mixed-clients", type=int, default=16, help="clients of the mixed-length run (0: skip)")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    parser.add_argument("--plot", type=Path, default=None, help="write a tokens/s and TTFT plot here")
    parser.add_argument("--routes", nargs="+", default=["native"], choices=ROUTES,
                        help="HTTP views to load, in turn at each concurrency on the same server")
    args = parser.parse_args()
    stream = not args.no_stream
    rows = []
    with tempfile.TemporaryDirectory(prefix="jai-load-") as scratch:
        scratch = Path(scratch)
        checkpoint, tokenizer = make_bench_model(scratch)
        base = yaml.safe_load((ROOT / "model-config.yaml").read_text())
        budgets = args.budgets if args.budgets != [None] else [base["handler"].get("step_budget_ms", 25)]
        aheads = [base["handler"].get("step_ahead", True)] if args.step_ahead == [None] else [
            value == "on" for value in args.step_ahead]
        with contextlib.ExitStack() as stack:  # every server up at once; only one is loaded at a time
            servers = []
            for n, (label, overrides) in enumerate(configurations(args.modes, budgets, aheads)):
                root = scratch / f"server{n}"
                root.mkdir()
                config = {**base, **overrides, "batchSize": args.batch_size,
                          "handler": {**base["handler"], **overrides.get("handler", {})}}
                (root / "model-config.yaml").write_text(yaml.safe_dump(config))
                archive(root, checkpoint, tokenizer, root / "model-config.yaml")
                server = stack.enter_context(running_torchserve(root))
                for route in args.routes:
                    run_level(server, 1, 1, 8, stream, route=route)  # warm-up
                servers.append((label, server))
            # each concurrency level runs on every server in turn: the modes compare minutes apart, not a
            # whole run apart (this shared machine's speed drifts by 10-20% over half an hour)
            for clients in args.clients:
                runs: dict[tuple[str, str], list[dict]] = {}
                for _round, ((label, server), route) in itertools.product(
                        range(args.rounds), itertools.product(servers, args.routes)):
                    row = {"mode": label, "route": route, "stream": stream,
                           **run_level(server, clients, args.requests_per_client, args.tokens, stream, route=route)}
                    runs.setdefault((label, route), []).append(row)
                    print(f"  {label:18s} {route:6s} {clients:3d} clients {row['tokens_per_s']:7.1f} tokens/s "
                          f"ttft p50 {row['ttft_ms_p50']:7.0f} ms, client {row['client_cpu_cores']:.2f} cores", file=sys.stderr)
                rows += [median_row(level) for level in runs.values()]
            for (label, server), route in itertools.product(servers, args.routes if args.mixed_clients else ()):
                row = {"mode": label, "route": route, "stream": stream, "mixed": True,
                       **run_level(server, args.mixed_clients, args.requests_per_client, MIXED_TOKENS, stream,
                                   spread=2.0, route=route)}
                rows.append(row)
                print(f"  {label:18s} {route:6s} mixed {args.mixed_clients} clients "
                      f"{row['tokens_per_s']:7.1f} tokens/s ttft p99 {row['ttft_ms_p99']:7.0f} ms", file=sys.stderr)
    rows.sort(key=lambda r: [label for label, _ in configurations(args.modes, budgets, aheads)].index(r["mode"]))
    print(f"\nClosed loop, {args.tokens} tokens/request, {'streamed' if stream else 'not streamed'}, "
          f"batchSize {args.batch_size}, full default shape, float32"
          + (f"; median of {args.rounds} rounds (tokens/s range)" if args.rounds > 1 else "") + "\n")
    print("| batcher | clients | tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) | latency p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        clients = f"{r['clients']} mixed" if r.get("mixed") else r["clients"]
        tokens = f"{r['tokens_per_s']:.0f}"
        if len(r.get("tokens_per_s_runs", ())) > 1:
            tokens += f" ({min(r['tokens_per_s_runs']):.0f}-{max(r['tokens_per_s_runs']):.0f})"
        print(f"| {_label(r)} | {clients} | {tokens} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} "
              f"| {r['itl_ms_p50']:.0f} / {r['itl_ms_p99']:.0f} | {r['latency_ms_p50']:.0f} / {r['latency_ms_p99']:.0f} |")
    for r in rows:  # --routes native openai: the OpenAI view's cost, same server, same load
        native = [n for n in rows if n.get("route") == "native" and (n["mode"], n["clients"], n.get("mixed")) ==
                  (r["mode"], r["clients"], r.get("mixed"))]
        if r.get("route") == "openai" and native:
            change = r["tokens_per_s"] / native[0]["tokens_per_s"] - 1
            print(f"{r['mode']}, {r['clients']} clients{' mixed' if r.get('mixed') else ''}: openai route "
                  f"{r['tokens_per_s']:.0f} vs native {native[0]['tokens_per_s']:.0f} tokens/s ({change:+.1%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": args.tokens, "stream": stream, "batch_size": args.batch_size,
                                    "rounds": args.rounds, "mixed_tokens": MIXED_TOKENS, "rows": rows}, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
