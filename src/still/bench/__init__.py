"""Measurements of the machine and of the models (`still bench ...`)."""
