"""Aetheris: hybrid Mamba-2 / MoE students distilled from multilingual transformers.

Importing the package registers the model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads Aetheris checkpoints. The model itself
(``aetheris.model``) depends only on torch.
"""

__version__ = "0.1.0"

from .hf import register as _register

_register()
