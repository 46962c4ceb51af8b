"""Units, one name each. Binary sizes (KiB, MiB, GiB, TiB: powers of 2^10) and decimal ones (KB,
MB, GB, TB: powers of 10^3) never share a name: memory is printed in GiB (what `nvidia-smi` and
PyTorch report), traffic in GB (what link bandwidths are quoted in). Every figure the tool
prints goes through these helpers, so one kind of number reads the same everywhere."""

from __future__ import annotations

KIB, MIB, GIB, TIB = 2**10, 2**20, 2**30, 2**40
KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12


def gib(b: float, digits: int = 2) -> str:
    """Bytes as GiB: gib(3 * 2**30) == '3.00 GiB'."""
    return f"{b / GIB:,.{digits}f} GiB"


def binary_bytes(b: float, digits: int = 2) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1: '1.50 MiB'."""
    for unit, f in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(b) >= f:
            return f"{b / f:,.{digits}f} {unit}"
    return f"{b:,.0f} B"


def decimal_bytes(b: float, digits: int = 1) -> str:
    """Bytes in the largest decimal unit that keeps the number >= 1: '2.5 GB'."""
    for unit, f in (("TB", TB), ("GB", GB), ("MB", MB), ("KB", KB)):
        if abs(b) >= f:
            return f"{b / f:,.{digits}f} {unit}"
    return f"{b:,.0f} B"


def count(n: float, digits: int = 2) -> str:
    """A count with a decimal suffix: count(8.03e9) == '8.03B'."""
    for unit, f in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= f:
            return f"{n / f:,.{digits}f}{unit}"
    return f"{n:,.0f}"


def seconds(s: float) -> str:
    """A duration with three significant digits in s, ms or µs: '1.23 s', '45.6 ms', '789 µs'."""
    if s == 0:
        return "0 s"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= f or unit == "µs":
            v = s / f
            return f"{v:,.0f} {unit}" if abs(v) >= 100 else f"{v:,.{1 if abs(v) >= 10 else 2}f} {unit}"
    raise AssertionError("unreachable")


def days(s: float) -> str:
    """A long duration in days, or hours under a day: '12.3 days', '5.2 hours'."""
    return f"{s / 86400:,.1f} days" if s >= 86400 else f"{s / 3600:,.1f} hours"


def number(v: float) -> str:
    """A table cell whose unit is in the header: three significant digits at most, small values
    without a wall of zeros (0.00041, not 0.00): number(1234.5) == '1,234', number(0.5) == '0.50'."""
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:,.1f}"
    if v >= 0.01 or v == 0:
        return f"{v:,.2f}"
    return f"{v:.2g}"


def percent(x: float) -> str:
    """A fraction as a percentage, one decimal under 10%: '4.2%', '37%'."""
    return f"{x:.1%}" if abs(x) < 0.1 else f"{x:.0%}"
