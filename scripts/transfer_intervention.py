"""Seed-compatible wrapper: same as `crossdict transfer ...` (e.g. --layer 6 --feature_idx 123 --alpha 5.0)."""

import sys

from crossdict.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["transfer", *sys.argv[1:]]))
