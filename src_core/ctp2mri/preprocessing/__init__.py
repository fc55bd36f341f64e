"""Preprocessing: reading CTP and MRI onto the model grid (resampling, registration)."""
