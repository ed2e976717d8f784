"""Seed-compatible wrapper: same as `crossdict align ...`."""

import sys

from crossdict.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["align", *sys.argv[1:]]))
