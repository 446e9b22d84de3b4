"""Prompt datasets and a seeded, resumable prompt sampler."""
