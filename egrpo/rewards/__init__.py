"""Reward models: one scoring interface and a registry from reward names to the models that produce them."""
