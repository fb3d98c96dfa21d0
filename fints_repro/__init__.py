"""fints-repro: inference-time personalization of LLMs by activation steering."""

__version__ = "0.1.0"
