"""Batch evaluation over prompt CSVs (`python evaluate.py`, docs/EVALUATE.md)."""
