"""The one size parser and formatter: decimal and binary units, and what every command reads them as."""

from __future__ import annotations

import argparse

import pytest

from pipx_llama.errors import UsageError
from pipx_llama.units import human_bytes, parse_size


def test_decimal_and_binary_units():
    assert parse_size("123") == 123
    assert parse_size("4M") == parse_size("4MB") == parse_size("4m") == 4_000_000
    assert parse_size("4Mi") == parse_size("4MiB") == parse_size("4mib") == 4 << 20
    assert parse_size("512K") == parse_size("512k") == 512_000 and parse_size("512Ki") == 512 << 10
    assert parse_size("8G") == 8_000_000_000 and parse_size("16GiB") == 16 << 30
    assert parse_size("1T") == 10**12 and parse_size("1Ti") == 1 << 40
    assert parse_size("1.5g") == 1_500_000_000 and parse_size(" 2 kb ") == 2000 and parse_size(".5K") == 500


@pytest.mark.parametrize("bad", ["lots", "", "-1", "4X", "Mi", "4 M B", "1e9", "iB"])
def test_not_a_size_names_what(bad):
    with pytest.raises(UsageError, match="PIPX_LLAMA_FAKE_RAM: .* is not a size") as err:
        parse_size(bad, "PIPX_LLAMA_FAKE_RAM")
    assert "Ki" in err.value.hint


def test_human_bytes_reads_back():
    assert human_bytes(None) == "?" and human_bytes(0) == "0 B" and human_bytes(999) == "999 B"
    assert human_bytes(4081004224) == "4.1 GB" and human_bytes(2.5e15) == "2500.0 TB"
    for n in (1_500, 98_400_000, 4_100_000_000):
        number, unit = human_bytes(n).split()
        assert parse_size(number + unit) == n  # what is printed can be typed back


def test_serve_and_hardware_agree_on_4M(monkeypatch, tmp_path):
    """`serve --max-body 4M` and `PIPX_LLAMA_FAKE_RAM=4M` read the same 4M (they once disagreed)."""
    from pipx_llama.cli.serve_cmd import _size
    from pipx_llama.system import detect_hardware

    hw = detect_hardware(tmp_path, env={"PIPX_LLAMA_FAKE_RAM": "4M"})
    assert _size("4M") == hw.ram_total == 4_000_000
    assert _size("4Mi") == detect_hardware(tmp_path, env={"PIPX_LLAMA_FAKE_RAM": "4Mi"}).ram_total == 4 << 20
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        _size("4 megabytes")
