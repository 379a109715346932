"""The `vaelab` command line: one verb per job, each a thin module over the library.

Each verb module has `add_parser(subparsers)` and `run(args) -> int`. Library errors
(`VaelabError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from typing import Any

from vaelab.errors import ConfigError, VaelabError, one_line

VERBS = ["train", "sample", "evaluate", "plot", "report", "compare", "explore", "export", "data"]


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no prefix matching: `--eps` must never silently mean `--epsilon-std`
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2 (argparse's usage dump is noise here)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from vaelab import __version__

    parser = _Parser(
        prog="vaelab",
        description="Train, measure, show and explore variational autoencoders "
        "(the Keras MNIST example, made real).",
        epilog="Run 'vaelab VERB --help' for a verb's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb in VERBS:
        module = _verb_module(verb)
        if module is not None:
            module.add_parser(sub)
    return parser


def _verb_module(verb: str):
    try:
        return importlib.import_module(f"vaelab.cli.{verb}_cmd")
    except ModuleNotFoundError as e:
        if e.name == f"vaelab.cli.{verb}_cmd":
            return None
        raise


def command() -> None:
    """The `vaelab` command (and `python -m vaelab`): `main`, then exit with its code.

    A process that joined a torchrun group ends with `os._exit` once its output is flushed: DDP
    keeps the gloo group (and its worker threads) alive past `destroy_process_group`, and a worker
    still letting go of its last collective when the interpreter shuts down aborts the process
    ("terminate called without an active exception"; about 1 run in 10 on a busy machine, PyTorch
    2.13). Every file of the run is closed by then; skipping the interpreter's shutdown loses nothing.
    """
    code = main()
    from vaelab.distributed import joined_a_group

    if joined_a_group():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "out", None) == "":  # '' would mean the current folder, or the default
            raise ConfigError("option --out: is empty; give a path")
        code = args.run(args) or 0
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # stop quietly, as a tool killed by SIGPIPE does
        with contextlib.suppress(OSError, ValueError):  # (a stdout without a file descriptor)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        return 141  # 128 + SIGPIPE
    except VaelabError as e:
        message = shown(str(e).removeprefix(f"{args.verb}: "))  # ("evaluate: ..." would say it twice)
        kind = "error: " if getattr(e, "is_error", True) else ""  # (an interruption the user asked for)
        print(f"vaelab {args.verb}: {kind}{message}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"vaelab {args.verb}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the system refuses where no check expected it (a name too long, /proc)
        if e.filename is None:
            raise
        reason = e.strerror or one_line(e)
        print(f"vaelab {args.verb}: error: {shown(str(e.filename))}: {reason}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        smaller = SIZE_OPTIONS.get(args.verb, "smaller sizes")
        print(f"vaelab {args.verb}: error: out of memory ({_allocation(e)}); ask for less: {smaller}",
              file=sys.stderr)
        return 2


# what to make smaller when a verb runs out of memory
SIZE_OPTIONS = {
    "train": "a smaller --batch-size, --hidden or --k",
    "sample": "a smaller -n",
    "evaluate": "fewer --importance-samples or a smaller --limit",
}


# Characters a terminal acts on instead of showing (C0 and C1 controls: ESC starts sequences
# that set the window's title or clear the screen), line and paragraph separators, and the
# bidirectional overrides that reorder what is shown: written as escapes wherever a path, a
# name or a message from a file is printed.
_CONTROLS = {
    c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
              *range(0x2066, 0x206A))
} | {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"} | {
    # a file name's bytes that are not UTF-8 reach Python as these surrogates, and stdout would
    # write the bytes back (0x9b starts an escape sequence on some terminals)
    0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)
}
_CONTROLS_BUT_LINES = {c: e for c, e in _CONTROLS.items() if c not in (ord("\n"), ord("\t"))}


def shown(text: object, lines: bool = False) -> str:
    """`text` with every control character written as an escape (`\\x1b`, `\\n`), so that a file
    name cannot move the cursor, retitle the terminal or split a one-line message; `lines=True`
    keeps newlines and tabs (a log message of several lines)."""
    return str(text).translate(_CONTROLS_BUT_LINES if lines else _CONTROLS)


def _allocation(e: BaseException) -> str:
    """What the failed allocation asked for, in a few words."""
    import re

    found = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", str(e), re.IGNORECASE)
    if found:
        units = {"bytes": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
        size = float(found.group(1)) * units[found.group(2).lower()]
        from vaelab.perf import size_text

        return f"an array of {size_text(size)} was asked for"
    return one_line(e, limit=160)


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation that failed (Python's, torch's CPU allocator or CUDA's)."""
    torch = sys.modules.get("torch")
    if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()  # the CPU allocator's words, and CUDA's and MPS's "out of memory"
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def seed(text: str) -> int:
    """argparse type of a --seed: a whole number in [0, MAX_SEED], as `vaelab train` takes."""
    from vaelab.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, {MAX_SEED}], got {text!r}")
    return value


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def is_terminal() -> bool:
    """Progress bars only where a person watches (quiet in CI and pipes)."""
    return sys.stderr.isatty()


def example(text: str) -> str:
    return "example:\n  " + "\n  ".join(text.strip().splitlines())
