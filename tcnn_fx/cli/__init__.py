"""The ``tcnn-fx`` command line: one module per command, each ``add_parser(subparsers)`` and ``run(args)``.

    tcnn-fx sites MODEL [--module PATH] [--input-size N] [--weights FILE] [--graphml FILE] [--json FILE]
    tcnn-fx convert MODEL [--module PATH] --policy stage4 [--verify] [--fold-norm] --out FILE [--onnx FILE]
    tcnn-fx bench MODEL --policy stage4 [--batch-sizes 1,8] [--runtime torch,ort] [--json FILE] [--plot FILE]
    tcnn-fx finetune MODEL [--weights FILE] --policy last --data DIR --out RUN [--resume] [--epochs N ...]
    tcnn-fx evaluate MODEL --data DIR [--corruptions all] [--severities 1,2,3,4,5] [--per-class N] [--json FILE]
    tcnn-fx analyze HYBRID --data DIR [--images 256] [--json FILE] [--plot FILE]
    tcnn-fx search MODEL --out DIR [--data DIR] [--base-policy P] [--objectives accuracy,latency_ratio ...]

MODEL is ``torchvision:NAME``, ``timm:NAME``, ``cifar:resnetDEPTH``,
``path/to/file.py:factory``, or a checkpoint written by ``convert`` or
``finetune`` (a ``.safetensors`` or ``.pt`` file; one whose base model is a
Python file loads only with ``--trust-model-file``).  ``--policy`` takes an
expression (``stage4``, ``stage>=3 & res<=14`` ...) or a policy file
(``.json``, ``.yaml``).

The commands call library functions and print.  Every expected error (a
``TcnnFxError``: a bad spec, policy, path, checkpoint ...) is printed as one
line ``error: ...`` on stderr, exit status 2; a failed verification exits
with status 1; anything else is a bug and keeps its traceback.  Outputs are
checked before any work and written whole or not at all.
"""

from __future__ import annotations

import argparse
import sys

from tcnn_fx.cli import analyze, bench, convert, evaluate, finetune, search, sites
from tcnn_fx.cli.common import one_line
from tcnn_fx.errors import TcnnFxError, VerificationError

COMMANDS = (sites, convert, bench, finetune, evaluate, analyze, search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcnn-fx", description="Recast a CNN's convolutions as self-attention.", allow_abbrev=False
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser

    def add_parser(*args, **kwargs) -> argparse.ArgumentParser:  # no abbreviated flags: a new flag breaks none
        return add(*args, allow_abbrev=False, **kwargs)

    commands.add_parser = add_parser
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TcnnFxError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(1 if isinstance(error, VerificationError) else 2)


__all__ = ["build_parser", "main"]
