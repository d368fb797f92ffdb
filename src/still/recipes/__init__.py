"""Experiments: each recipe is a config (data only) and a function that runs it."""
