"""The ``twa`` command (also ``python -m twa_kernels``).

    twa backends [--device cpu|cuda] [--json]    which kernel backends run here, why others do not, and the fix
"""

from __future__ import annotations

import argparse
import json
import sys

from .backends import backend_report, format_backend_report


def _backends(args) -> int:
    report = backend_report(args.device)
    if args.json:
        print(json.dumps([r.as_dict() for r in report], indent=1))
    else:
        print(format_backend_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twa", description="Trainable Weight Averaging tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("backends", help="which kernel backends run here, and why the others do not",
                       description="Report every kernel backend for a device: whether it runs, how (built at "
                                   "install or compiled on first use), or why not and the command that fixes it.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible, else cpu)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_backends)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
