"""Importing real data: ISLES'24 / BIDS subjects to case folders."""
