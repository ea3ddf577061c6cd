import pytest

from placement.sizes import SizeError, format_size, parse_size


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2 ** 30), ("7.5GB", 7_500_000_000), ("512MiB", 512 * 2 ** 20), ("24G", 24 * 2 ** 30),
    ("1024", 1024), ("100B", 100), (" 2 gib ", 2 * 2 ** 30), ("1.5TiB", 3 * 2 ** 39), ("64KB", 64_000),
    ("0.5MiB", 2 ** 19), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8XB", "eight GiB", "-1GiB", "8 Gib B", "1e9", "8iB", True, -5,
                                  float("nan"), float("inf"), -1.0])
def test_parse_size_rejects(text):
    with pytest.raises(SizeError, match="--gpu-memory"):
        parse_size(text, what="--gpu-memory")


def test_format_size_round_trips_through_parse():
    for n in (0, 512, 1536, 8 * 2 ** 30, 416 * 2 ** 20 + 12345):
        text = format_size(n)
        assert abs(parse_size(text.replace(" ", "")) - n) <= max(1, n * 0.005)
    assert format_size(8 * 2 ** 30) == "8.00 GiB"
    assert format_size(512) == "512 B"
