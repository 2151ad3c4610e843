"""`sora-serve <command>`: one subcommand per stage of train -> adapter dir -> fold/export/serve.

Each command lives in its own module, which provides `add_arguments(parser)` and `run(args)`;
modules are imported only when their command runs, so `--help` stays fast and light.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import AdapterError
from .fs import os_error

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sora_serve.training.cli", "train a LoRA / DoRA / Pre-Diag / SORA adapter on local data"),
    "fold": ("sora_serve.converters.fold", "fold an adapter exactly into the base weights; write a merged checkpoint"),
    "to-lora": ("sora_serve.converters.to_lora", "convert an adapter to a plain PEFT LoRA directory (exact or SVD)"),
    "convert": (
        "sora_serve.converters.convert",
        "convert between our SORA format and the paper's (MaeChd/SORA) format",
    ),
    "export-onnx": ("sora_serve.converters.onnx_export", "export a model to ONNX, merged or with switchable adapters"),
    "serve": ("sora_serve.vllm_plugin.server", "serve a model and adapters with vLLM's OpenAI-compatible server"),
}


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """The validator's two overrides, shared by fold, to-lora, export-onnx and serve."""
    parser.add_argument(
        "--allow-large-updates",
        action="store_true",
        help="accept adapters whose update exceeds the magnitude bounds (docs/VLLM.md, 'What is validated'); "
        "NaN/inf are always refused",
    )
    parser.add_argument(
        "--allow-other-base",
        action="store_true",
        help="accept adapters whose recorded base weights differ from this base's (another model of the same shapes); "
        "shapes are always checked (docs/VLLM.md, 'Security')",
    )
    parser.add_argument(
        "--reference-s0",
        type=float,
        metavar="S",
        help="s_p numerator of adapters saved by the paper's code (MaeChd/SORA) whose run set initial_s_p "
        "(default 1.0; docs/FORMAT.md)",
    )


def override_kwargs(args: argparse.Namespace) -> dict[str, bool | None]:
    """The overrides as keyword arguments; None (not given) lets the environment decide."""
    return {"allow_large_updates": args.allow_large_updates or None, "allow_other_base": args.allow_other_base or None}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    if getattr(args, "reference_s0", None) is not None:  # read by every reader of such dirs, vLLM's workers included
        from .adapter_format import REFERENCE_S0_ENV

        os.environ[REFERENCE_S0_ENV] = repr(args.reference_s0)
    try:
        importlib.import_module(COMMANDS[args.command][0]).run(args)
    except AdapterError as exc:
        return _error(args.command, exc)
    except (PermissionError, FileNotFoundError) as exc:  # one not caught where the file is read: still one line, named
        return _error(args.command, os_error(exc, exc.filename or "?"))
    return 0


def _error(command: str, exc: AdapterError) -> int:
    """Print `sora-serve COMMAND: error: FILE: field 'F': message` (no traceback); exit status 1."""
    print(f"sora-serve {command}: error: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
