"""Model-agnostic training pieces shared by every recipe: the loop, checkpoints, seeding,
progress, results. Nothing here imports a model."""
