"""`python -m bot` and the `comfyvast` console script."""

from __future__ import annotations

import sys

from bot.cli import main as _main


def main() -> None:
    sys.exit(_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
