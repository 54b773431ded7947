"""Scaling laws: fitting (fit.py)."""
