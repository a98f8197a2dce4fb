"""Read and validate a frame's .npy header without touching its pixels.

The preflight checks thousands of frames; reading only the header (a few hundred bytes) and
comparing the file size with what the header promises catches truncated copies in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from crossdet_ray.data.errors import DatasetError

NUM_CHANNELS = 5  # RGB, thermal, event

# Unsigned integers are scaled by their maximum; floats are taken as already in [0, 1].
_SUPPORTED_UNSIGNED_SIZES = (1, 2)  # uint8, uint16
_SUPPORTED_FLOAT_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int  # where the pixels start in the file
    file_size: int

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]


def is_supported_dtype(dtype: np.dtype) -> bool:
    if dtype.fields is not None or dtype.subdtype is not None:
        return False
    if dtype.kind == "u":
        return dtype.itemsize in _SUPPORTED_UNSIGNED_SIZES
    if dtype.kind == "f":
        return dtype.itemsize in _SUPPORTED_FLOAT_SIZES
    return False


def pixel_scale(dtype: np.dtype) -> float:
    """The value that maps to 1.0: the dtype's maximum for integers, 1 for floats.

    The reference fed 0-255 values into a normalisation made for [0, 1]; scaling by the
    dtype's maximum first fixes that for 8-bit and 16-bit frames alike.
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "u":
        return float(np.iinfo(dtype).max)
    return 1.0


def read_npy_header(path: str | os.PathLike) -> NpyHeader:
    """Header of a frame file, validated as an (H, W, 5) uint8/uint16/float array.

    Raises DatasetError naming the file for an unreadable, truncated, wrongly shaped or
    unsupported-dtype frame.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            return parse_npy_header(stream, os.fstat(stream.fileno()).st_size, str(path))
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read ({error}); check the file's permissions "
                           "or remove it") from error


def parse_npy_header(stream: BinaryIO, file_size: int, where: str) -> NpyHeader:
    """The header at the start of `stream` (a frame of `file_size` bytes, named `where` in
    errors), validated: the one parser for a file on disk and the first bytes of an object in
    a bucket."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise DatasetError(
                f"{where}: .npy format version {version[0]}.{version[1]} is not supported "
                "(only 1.0 and 2.0, which numpy.save writes for plain arrays); re-save the "
                "frame with numpy.save")
        data_offset = stream.tell()
    except (ValueError, SyntaxError, EOFError) as error:
        # numpy raises ValueError for a bad magic string or a garbled header dictionary.
        raise DatasetError(f"{where}: not a readable .npy file ({error}); re-export the frame "
                           "with numpy.save or remove it") from error

    header = NpyHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran_order),
                       data_offset, file_size)
    _validate(where, header)
    return header


def _validate(path: str, header: NpyHeader) -> None:
    shape = header.shape
    if len(shape) != 3 or shape[2] != NUM_CHANNELS:
        raise DatasetError(
            f"{path}: array shape {shape} is not (H, W, {NUM_CHANNELS}); every frame must "
            "hold 5 channels in its last axis (R, G, B, thermal, event): re-export it")
    if shape[0] <= 0 or shape[1] <= 0:
        raise DatasetError(f"{path}: frame of shape {shape} is empty; remove it")
    if not is_supported_dtype(header.dtype):
        raise DatasetError(
            f"{path}: dtype {header.dtype} is not supported; save frames as uint8 (0-255), "
            "uint16 (0-65535) or float in [0, 1]")
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * header.dtype.itemsize
    if header.file_size < header.data_offset + expected_bytes:
        raise DatasetError(
            f"{path}: truncated: the header promises {shape} {header.dtype} "
            f"({expected_bytes} bytes of pixels) but the file holds only "
            f"{max(header.file_size - header.data_offset, 0)}; copy the file again")
