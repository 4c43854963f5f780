"""Sub-byte packing against a brute-force unpacking of the ONNX layout."""

import numpy as np
import pytest

from hawq.export._pack import pack_bits


def _unpack(data: bytes, bits: int, n: int) -> np.ndarray:
    out = []
    for byte in data:
        for j in range(8 // bits):
            field = (byte >> (bits * j)) & ((1 << bits) - 1)
            out.append(field - (1 << bits) if field >= 1 << (bits - 1) else field)  # two's complement
    return np.array(out[:n])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 64])
def test_pack_bits_round_trips(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 100 + n)
    values = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=n).astype(np.int8)
    data = pack_bits(values, bits)
    assert len(data) == -(-n * bits // 8)
    np.testing.assert_array_equal(_unpack(data, bits, n), values)


def test_pack_bits_low_bits_first() -> None:
    assert pack_bits(np.array([1, -1], np.int8), 4) == bytes([0xF1])
    assert pack_bits(np.array([1, -1, 0, -2], np.int8), 2) == bytes([0b10_00_11_01])
