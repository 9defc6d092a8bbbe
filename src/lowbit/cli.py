"""The ``lowbit`` command (also ``python -m lowbit``).

Each subcommand is one entry in :data:`COMMANDS`: a function that adds its
arguments and a function that calls the API and returns an :class:`Output`.
Every subcommand takes ``--json``: stdout then holds exactly one JSON object
(the result, or ``{"error": {"type": ..., "message": ...}}``). Errors raised
on purpose by lowbit print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from .errors import LowbitError

EXIT_ERROR = 2


@dataclass
class Output:
    """What a subcommand prints: ``text`` for people, ``data`` (JSON-able) for ``--json``."""

    text: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Output]


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="w8a8", help="quantization preset (default: w8a8)")
    parser.add_argument("--batches", type=int, default=4, help="random calibration batches (default: 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per calibration batch (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the random data (default: 0)")


def _demo_model() -> Any:
    """A small LeNet-style float net for 1x28x28 inputs (feature extractor + classifier)."""
    from torch import nn

    class DemoNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, x):
            return self.classifier(self.features(x))

    return DemoNet()


def _run_demo(args: argparse.Namespace) -> Output:
    import torch

    from . import api

    torch.manual_seed(args.seed)
    model = api.quantize(_demo_model(), args.preset)
    batches = [torch.rand(args.batch_size, 1, 28, 28) for _ in range(args.batches)]
    api.calibrate(model, batches)
    table = api.summary(model, example_input=(1, 1, 28, 28))
    text = f"{table}\n\npreset {args.preset}, calibrated on {args.batches} random batch(es) of {args.batch_size}"
    data = {"preset": args.preset, "calibration_batches": args.batches, "summary": table.to_dict()}
    return Output(text=text, data=data)


COMMANDS: dict[str, Command] = {
    "demo": Command("quantize a small LeNet-style net with a preset and print its summary", _demo_arguments, _run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Quantized and binarized neural networks for PyTorch.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0)
    try:
        output = COMMANDS[args.command].run(args)
    except LowbitError as exc:
        message = " ".join(str(exc).split())
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"type": type(exc).__name__, "message": message}}))
        return EXIT_ERROR
    print(json.dumps(output.data) if args.json else output.text)
    return 0
