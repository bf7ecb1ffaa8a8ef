"""Aetheris: hybrid Mamba-2 / MoE students distilled from multilingual transformers."""

__version__ = "0.1.0"
