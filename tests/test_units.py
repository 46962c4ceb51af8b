"""shardwise/units.py: one name per unit, hand-worked."""

from shardwise import units


def test_binary_and_decimal_sizes_never_share_a_name():
    assert units.GIB == 1_073_741_824 and units.GB == 1_000_000_000
    assert units.gib(3 * 2**30) == "3.00 GiB" and units.gib(1.5 * 2**30, 1) == "1.5 GiB"
    assert units.binary_bytes(1536 * 2**20) == "1.50 GiB"
    assert units.binary_bytes(3 * 2**20 + 2**19, 3) == "3.500 MiB"
    assert units.binary_bytes(512) == "512 B" and units.binary_bytes(4 * 2**20, 0) == "4 MiB"
    assert units.decimal_bytes(2.5e9) == "2.5 GB" and units.decimal_bytes(12.1e12) == "12.1 TB"
    assert units.decimal_bytes(999) == "999 B"


def test_durations_have_three_significant_digits():
    assert units.seconds(0) == "0 s"
    assert units.seconds(1.234) == "1.23 s" and units.seconds(51.06) == "51.1 s" and units.seconds(123.4) == "123 s"
    assert units.seconds(0.0456) == "45.6 ms" and units.seconds(0.003) == "3.00 ms"
    assert units.seconds(789e-6) == "789 µs" and units.seconds(4.2e-9) == "0.00 µs"
    assert units.days(2 * 86400) == "2.0 days" and units.days(5.25 * 3600) == "5.2 hours"


def test_counts_numbers_and_percentages():
    assert units.count(8_030_261_248) == "8.03B" and units.count(999) == "999" and units.count(2e12) == "2.00T"
    assert units.number(1234.5) == "1,234" and units.number(12.34) == "12.3" and units.number(0.5) == "0.50"
    assert units.number(0.00041) == "0.00041" and units.number(0) == "0.00"
    assert units.percent(0.042) == "4.2%" and units.percent(0.37) == "37%" and units.percent(-0.064) == "-6.4%"
