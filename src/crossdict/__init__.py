"""crossdict: find the same features inside two different language models."""

__version__ = "0.1.0"
