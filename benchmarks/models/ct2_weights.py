"""Reader for CTranslate2 ``model.bin`` files (binary layout version 5 and later) into numpy arrays.

Layout: u32 version, string spec name, u32 revision, u32 variable count, then per variable a string name,
u8 rank, rank × u32 dims, u8 dtype, u32 byte count and the raw bytes; optionally u32 alias count and
(alias, target) string pairs. Strings are u16 length (including a trailing NUL) followed by the bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

# CTranslate2's DataType enum order.
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def unpack(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.data, self.offset)[0]
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("H")
        text = self.data[self.offset:self.offset + length - 1].decode()
        self.offset += length
        return text


def read_ct2_weights(path: Path | str) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model, by name (aliases resolved to the arrays they point to)."""
    data = Path(path).read_bytes()
    cur = _Cursor(data)
    version = cur.unpack("I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is not supported (need >= 5)")
    cur.string()  # spec name
    cur.unpack("I")  # spec revision
    weights = {}
    for _ in range(cur.unpack("I")):
        name = cur.string()
        shape = [cur.unpack("I") for _ in range(cur.unpack("B"))]
        dtype = np.dtype(_DTYPES[cur.unpack("B")])
        nbytes = cur.unpack("I")
        weights[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, cur.offset).reshape(shape)
        cur.offset += nbytes
    if cur.offset < len(data):
        for _ in range(cur.unpack("I")):
            alias, target = cur.string(), cur.string()
            weights[alias] = weights[target]
    return weights
