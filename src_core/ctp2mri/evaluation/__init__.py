"""Evaluation: metrics, the per-case evaluation, reports, tables, figures and comparisons."""
