"""Flow-matching sampling as a policy: schedules, ODE/SDE steps, rollout plans (plain torch)."""
