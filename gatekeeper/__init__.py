"""gatekeeper: a deployment gate that detects backdoors in prompt-tuned CLIP models (CLIP-Inspector)."""

__version__ = "0.1.0"
