"""evoexp: Hydra-configured experiments for dynamic (non-uniform) LLM compression."""

__version__ = "0.1.0"
