"""GRPO math: group advantages and the clipped objective (plain torch)."""
