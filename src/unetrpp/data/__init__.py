"""Datasets: layouts, converters, checks, planning, preprocessing and the phantom (no torch)."""
