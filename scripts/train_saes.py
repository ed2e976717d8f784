"""Seed-compatible wrapper: same as `crossdict train ...`."""

import sys

from crossdict.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
