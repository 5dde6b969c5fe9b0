"""Volumes and their geometry on disk (SimpleITK; no torch), and the atomic writes every file goes through."""

from .atomic import atomic_path
from .image import (
    FILE_ENDINGS,
    Geometry,
    ImageReadError,
    ImageWriteError,
    NonFiniteError,
    read_case,
    read_image,
    split_ending,
    write_image,
)
from .jsonio import read_json, write_json, write_npy

__all__ = [
    "FILE_ENDINGS",
    "Geometry",
    "ImageReadError",
    "ImageWriteError",
    "NonFiniteError",
    "atomic_path",
    "read_case",
    "read_image",
    "read_json",
    "split_ending",
    "write_image",
    "write_json",
    "write_npy",
]
