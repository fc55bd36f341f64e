"""Recipes: the demo and the paper-profile training pipelines, and `ctp2mri demo`."""
