"""OpenBeepBoop: submit LLM jobs now, collect them later."""

__version__ = "0.1.0"
