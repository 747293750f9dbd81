"""Command line: ``python -m jai_client chat "판교 백엔드 채용 있어?"`` (also generate, health, scale, and
update/rollback on the server's host); installed by ``pip install .`` as the ``jaiserve`` command.

chat and generate stream the text to the terminal as it is generated (``--no-stream``: all at once).
Exit status: 0 done, 1 the server refused or could not be reached (one ``error: ...`` line on stderr),
2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
from collections.abc import Iterable

from .client import (
    DEFAULT_KEY_FILE,
    DEFAULT_MANAGEMENT_URL,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    JAIClient,
    JAIError,
    client_settings_from_env,
)

SAMPLING_FLAGS = {  # flag -> (request field, type, help)
    "--max-tokens": ("max_tokens", int, "tokens to generate (server default 256)"),
    "--temperature": ("temperature", float, "0 = greedy (server default 0.8)"),
    "--top-k": ("top_k", int, "keep the k most likely tokens (server default 50)"),
    "--top-p": ("top_p", float, "nucleus sampling threshold (server default 1.0)"),
    "--seed": ("seed", int, "private random stream: the same text every time"),
}


def main(argv: list[str] | None = None, prog: str = "jaiserve") -> int:
    args = _parser(prog).parse_args(argv)
    flags = {"url": args.url, "management_url": args.management_url, "key_file": args.token_file}
    settings = client_settings_from_env() | {name: value for name, value in flags.items() if value}
    client = JAIClient(**settings, timeout=args.timeout)
    try:
        args.run(client, args)
    except JAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _complete(client: JAIClient, args: argparse.Namespace) -> None:
    """chat prints the answer; generate prints the prompt and its continuation (the seed's full text)."""
    params = {field: value for field, _, _ in SAMPLING_FLAGS.values() if (value := getattr(args, field)) is not None}
    if args.stop:
        params["stop"] = args.stop
    pieces: Iterable[str]
    if args.no_stream:
        result = client.chat(args.prompt, **params) if args.mode == "chat" else client.generate(args.prompt, **params)
        pieces = [result.generated if args.mode == "chat" else result.full_text]
    else:
        pieces = client.stream(args.prompt, mode=args.mode, **params)  # sent now: a refusal raises here
        if args.mode == "generate":
            pieces = itertools.chain([args.prompt], pieces)
    last = "\n"
    try:
        for last in pieces:
            print(last, end="", flush=True)
    finally:  # end the line (answers often end with one), also before an error message or after Ctrl-C
        if not last.endswith("\n"):
            print()


def _health(client: JAIClient, args: argparse.Namespace) -> None:
    print(client.health().get("status"))


def _scale(client: JAIClient, args: argparse.Namespace) -> None:
    print(client.scale(args.workers).get("status"))


def _update(client: JAIClient, args: argparse.Namespace) -> None:
    """update / rollback: the server checkout's scripts/update.py (the workers read the server's folder on
    its host, so this runs there, like ``make update``); its progress lines go to stdout."""
    repo = args.repo or os.environ.get("JAI_DIR") or "."
    script = os.path.join(repo, "scripts", "update.py")
    if not os.path.isfile(script):
        raise JAIError(None, f"{script} not found: pass --repo (or JAI_DIR) naming the server's JAI Serve checkout")
    python = os.path.join(repo, ".venv", "bin", "python")
    command = [python if os.path.isfile(python) else sys.executable, script, args.command]
    if args.command == "update":
        command += ["--checkpoint", args.checkpoint, "--tokenizer", args.tokenizer]
    if args.model_store:
        command += ["--model-store", args.model_store]
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise JAIError(None, result.stderr.strip().removeprefix("update.py: ") or f"update.py exited {result.returncode}")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Talk to JAI served by TorchServe.")
    parser.add_argument("--url", help=f"inference API (env JAI_URL, default {DEFAULT_URL})")
    parser.add_argument(
        "--management-url", help=f"management API (env JAI_MANAGEMENT_URL, default {DEFAULT_MANAGEMENT_URL})"
    )
    parser.add_argument("--token-file", help=f"TorchServe's key file (env JAI_KEY_FILE, default ./{DEFAULT_KEY_FILE})")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for each answer (default {DEFAULT_TIMEOUT:g})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for mode, help_text in (
        ("chat", "answer a question (streams as it is generated)"),
        ("generate", "continue a text (streams as it is generated)"),
    ):
        command = commands.add_parser(mode, help=help_text)
        command.add_argument("prompt")
        for flag, (field, kind, flag_help) in SAMPLING_FLAGS.items():
            command.add_argument(flag, dest=field, type=kind, help=flag_help)
        command.add_argument("--stop", action="append", help="stop before this text (repeatable)")
        command.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
        command.set_defaults(run=_complete, mode=mode)

    commands.add_parser("health", help="is the server up? (GET /ping)").set_defaults(run=_health)
    scale = commands.add_parser("scale", help="run exactly N workers (waits until they are up)")
    scale.add_argument("workers", type=_non_negative, metavar="N")
    scale.set_defaults(run=_scale)
    update = commands.add_parser("update", help="put a new checkpoint live, no restart (on the server's host)")
    update.add_argument("--checkpoint", required=True, help="the new ckpt.pt")
    update.add_argument("--tokenizer", required=True, help="its tokenizer.json")
    rollback = commands.add_parser("rollback", help="go back to the version before the last update")
    for command in (update, rollback):
        command.add_argument("--repo", help="the server's JAI Serve checkout (env JAI_DIR, default .)")
        command.add_argument("--model-store", help="the server's model store (default: the checkout's model_store)")
        command.set_defaults(run=_update)
    return parser


def _non_negative(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return int(text)


if __name__ == "__main__":
    sys.exit(main(prog="python -m jai_client"))
