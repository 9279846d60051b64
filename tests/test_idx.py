
import numpy as np
import pytest

from capsnet.data import DataError, read_idx, write_idx


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_round_trip_raw_and_gzip(tmp_path, name):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name, expected_ndim=3)
    assert b.dtype == np.uint8 and b.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)


def test_header_is_the_mnist_magic(tmp_path):
    write_idx(tmp_path / "img", np.zeros((1, 28, 28), np.uint8))
    write_idx(tmp_path / "lab", np.zeros((1,), np.uint8))
    assert (tmp_path / "img").read_bytes()[:4] == (0x00000803).to_bytes(4, "big")
    assert (tmp_path / "lab").read_bytes()[:4] == (0x00000801).to_bytes(4, "big")


def test_truncated_payload_names_the_file(tmp_path):
    path = tmp_path / "short.idx"
    write_idx(path, np.ones((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="short.idx.*truncated"):
        read_idx(path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = tmp_path / "cut.idx.gz"
    write_idx(path, np.random.default_rng(0).integers(0, 255, (50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.idx.gz.*(truncated|corrupt)"):
        read_idx(path)


def test_wrong_magic_is_refused(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + (1).to_bytes(4, "big") + b"\x00")
    with pytest.raises(DataError, match="bad.idx is not an IDX file"):
        read_idx(path)


def test_wrong_number_of_dimensions_is_refused(tmp_path):
    path = tmp_path / "labels.idx"
    write_idx(path, np.zeros((3,), np.uint8))
    with pytest.raises(DataError, match="1 dimension.*expected 3"):
        read_idx(path, expected_ndim=3)


def test_extra_bytes_are_refused(tmp_path):
    path = tmp_path / "long.idx"
    write_idx(path, np.zeros((2, 2), np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    with pytest.raises(DataError, match="payload bytes"):
        read_idx(path)


def test_corrupt_gzip_body_is_refused(tmp_path):
    path = tmp_path / "flip.idx.gz"
    write_idx(path, np.arange(1000, dtype=np.uint8).reshape(10, 10, 10) % 7)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="flip.idx.gz"):
        read_idx(path)
