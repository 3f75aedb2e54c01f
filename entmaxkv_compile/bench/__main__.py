"""``python -m entmaxkv_compile.bench <subcommand>`` (also the ``entmaxkv-bench`` script).

Subcommands register themselves in :data:`SUBCOMMANDS` as ``name -> (add_arguments, run)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from . import e2e, kernels

SUBCOMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
] = {
    "kernels": (kernels.add_arguments, kernels.run),
    "e2e": (e2e.add_arguments, e2e.run),
    "e2e-summary": (e2e.add_summary_arguments, e2e.run_summary),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="entmaxkv-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=SUBCOMMANDS[name][1].__doc__))
    args = parser.parse_args(argv)
    SUBCOMMANDS[args.command][1](args)


if __name__ == "__main__":
    main()
