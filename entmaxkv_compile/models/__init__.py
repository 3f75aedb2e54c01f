"""Model code for the fidelity evaluation: a small entmax-1.5 Llama-style LM and its training data."""

from .llama_entmax import EntmaxLM, LMConfig, load_model, save_model

__all__ = ["EntmaxLM", "LMConfig", "load_model", "save_model"]
