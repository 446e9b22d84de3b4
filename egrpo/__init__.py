"""egrpo: entropy-guided GRPO (E-GRPO, AEGPO) for flow-matching text-to-image models, on Ray."""

__version__ = "0.1.0"
