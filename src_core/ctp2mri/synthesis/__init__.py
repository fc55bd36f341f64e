"""Synthesis: sampling slices with a trained model, whole volumes, cohorts."""
