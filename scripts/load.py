"""`dynkv bench load` under its old name (scripts/load): the same options and report."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from dynkv.cli.main import main as dynkv

    sys.argv = ["dynkv", "bench", "load", *(sys.argv[1:] if argv is None else argv)]
    dynkv()


if __name__ == "__main__":
    main()
