"""llama.cpp's ``llama-server``, built from the sources PyPI distributes, for our benchmark and GGUF tests.

    python scripts/llama_server.py [--portable]     # build (minutes, once), check, print the binary's path

The sources are the ``vendor/llama.cpp`` folder of ``llama-cpp-python``'s source distribution on PyPI (a
registry every machine of ours reaches), unpacked once into ``~/.cache/jai-serve/llama.cpp``. A native
build (``GGML_NATIVE``: every instruction this CPU reports) comes first; ``working_binary`` checks it by
serving a float32 and a q8_0 model, and falls back to the portable build (``GGML_NATIVE=OFF``: AVX2, FMA
and F16C, what every x86 server of the last decade runs) when the native one fails. Seen on a 2-vCPU Intel
Xeon VM that reports AMX: the native build serves float32 but segfaults in ggml's AMX q8_0 product (the
VM does not give the process AMX tile state). Nothing of llama.cpp is kept in this repository.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "handler"), str(REPO_ROOT)]

from scripts.multi import free_ports  # noqa: E402

VERSION = "0.3.36"  # llama-cpp-python release whose vendor/llama.cpp we build
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jai-serve" / "llama.cpp"


def _run(command: list[str], log: Path) -> None:
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)


def sources(version: str = VERSION) -> Path:
    """llama.cpp as vendored in llama-cpp-python's source distribution, downloaded and unpacked once."""
    source = CACHE / f"src-{version}"
    if (source / "CMakeLists.txt").exists():
        return source
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        print(f"downloading llama-cpp-python=={version} (sources) from PyPI", file=sys.stderr)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", scratch,
              f"llama-cpp-python=={version}"], CACHE / "download.log")
        [sdist] = Path(scratch).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(scratch, filter="data")
        shutil.move(str(next(p for p in Path(scratch).iterdir() if p.is_dir()) / "vendor" / "llama.cpp"), source)
    return source


def binary_path(version: str = VERSION, portable: bool = False) -> Path:
    """Where ``build`` puts (or has put) llama-server: one cached folder per release and variant."""
    return CACHE / f"build-{version}-{'portable' if portable else 'native'}" / "bin" / "llama-server"


def build(version: str = VERSION, portable: bool = False) -> Path:
    """``llama-server`` built from ``sources``, native or portable (``binary_path``), once."""
    kind = "portable" if portable else "native"
    binary = binary_path(version, portable)
    folder = binary.parent.parent
    if binary.exists():
        return binary
    source = sources(version)
    flags = ["-DGGML_NATIVE=OFF"] if portable else ["-DGGML_NATIVE=ON"]
    log = CACHE / f"build-{version}-{kind}.log"
    print(f"building llama-server ({kind}) into {folder} (minutes; log {log})", file=sys.stderr)
    _run(["cmake", "-S", str(source), "-B", str(folder), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", *flags], log)
    _run(["cmake", "--build", str(folder), "--target", "llama-server", f"-j{os.cpu_count() or 2}"], log)
    return binary


@dataclass
class LlamaServer:
    """A running llama-server, as bench/peer_bench.py's load generator and the GGUF tests see it."""

    process: subprocess.Popen
    base: str
    name: str = "llama-server"

    @property
    def completions_url(self) -> str:
        return f"{self.base}/v1/completions"

    def headers(self) -> dict:
        return {}

    def body(self, body: dict) -> dict:
        """An OpenAI completion body with JAI's samplers only: llama-server's defaults add top_p 0.95,
        min_p 0.05 and penalties; ``ignore_eos`` makes every token asked for, as a random model needs."""
        return {**body, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
                "ignore_eos": True, "cache_prompt": False}


@contextlib.contextmanager
def running(binary: Path, gguf: Path, log: Path, slots: int = 64, block_size: int = 256, threads: int = 2,
            name: str = "llama-server"):
    """Serve ``gguf`` on a free port: ``slots`` sequences of ``block_size`` positions; always stopped."""
    port = free_ports(1)[0]
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(slots), "--ctx-size", str(slots * block_size), "--threads", str(threads),
               "--threads-batch", str(threads), "--cont-batching", "--no-webui"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(process, f"http://127.0.0.1:{port}", name)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}:\n" + log.read_text()[-3000:])
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{server.base}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy:\n" + log.read_text()[-3000:])
            time.sleep(0.3)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def runs(binary: Path, gguf: Path, scratch: Path) -> bool:
    """Whether ``binary`` serves ``gguf`` here: a few greedy tokens from a one-slot server."""
    try:
        with running(binary, gguf, scratch / f"llama-check-{gguf.stem}.log", slots=1) as server:
            response = requests.post(server.completions_url, timeout=60, json=server.body(
                {"prompt": "hello", "max_tokens": 4, "temperature": 0}))
            response.raise_for_status()
        return True
    except (RuntimeError, requests.RequestException) as exc:
        print(f"{binary} cannot serve {gguf.name} here: {str(exc)[-600:]}", file=sys.stderr)
        return False


def working_binary(checks: list[Path], scratch: Path, version: str = VERSION, portable: bool = False) -> Path:
    """A llama-server that serves every GGUF file of ``checks`` here (a float32 and a q8_0 export): the native
    build unless it fails, then the portable one."""
    for kind in [True] if portable else [False, True]:
        try:
            binary = build(version, kind)
        except subprocess.CalledProcessError as exc:
            print(f"llama-server {'portable' if kind else 'native'} build failed: {exc}", file=sys.stderr)
            continue
        if all(runs(binary, gguf, scratch) for gguf in checks):
            return binary
    raise RuntimeError(f"no llama-server build serves {[c.name for c in checks]} on this machine (logs in {scratch})")


def check_models(directory: Path) -> list[Path]:
    """A tiny random JAI model with a byte-level tokenizer, exported as float32 and q8_0 GGUF files:
    what ``working_binary`` serves to tell whether a build runs here."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaiserve.model import GPT, GPTConfig
    from scripts.export_gguf import export

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=320, block_size=64, n_layer=2, n_head=2, n_embd=64)  # q8_0: rows of 32
    torch.save({"model": GPT(config).state_dict(), "config": config.__dict__}, directory / "check.pt")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(directory / "check-tokenizer.json"))
    return [export(directory / "check.pt", directory / "check-tokenizer.json", directory / f"check-{kind}.gguf", kind)
            for kind in ("f32", "q8_0")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--portable", action="store_true", help="build the portable variant only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jai-llama-check-") as scratch:
        print(working_binary(check_models(Path(scratch)), Path(scratch), args.version, args.portable))


if __name__ == "__main__":
    main()
