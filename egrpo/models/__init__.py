"""Diffusion transformers as RL policies (`policy`) and tiny offline stand-ins for tests and the toy world (`tiny`)."""
