"""Bandwidth values as users write them: bytes per second, an int or a Kubernetes quantity.

Owns: parsing `200Mi`, `1.5G`, `1048576` into an integer of bytes/s, refusing everything else
with a message that says what is accepted.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from blockpull.errors import InvalidSpec

_SUFFIXES = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
#: QEMU takes speed as int64 bytes/s.
MAX_BANDWIDTH = 2**63 - 1


def parse_bandwidth(value: object) -> int:
    """Bytes per second from an int or a quantity string; 0 means unlimited."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidSpec(f"bandwidth must be a number of bytes/s or a quantity like 200Mi, got {value!r}")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, str):
        match = _QUANTITY.match(value.strip())
        if not match:
            raise InvalidSpec(
                f"bandwidth {value!r} is not a quantity: use bytes/s like 1048576 or 200Mi, 1.5G "
                "(suffixes k M G T P E, Ki Mi Gi Ti Pi Ei)"
            )
        try:
            number = Decimal(match["number"]) * _SUFFIXES[match["suffix"] or ""]
        except InvalidOperation as exc:
            raise InvalidSpec(f"bandwidth {value!r} is not a number") from exc
    else:
        raise InvalidSpec(f"bandwidth must be a number of bytes/s or a quantity like 200Mi, got {value!r}")
    if number < 0:
        raise InvalidSpec(f"bandwidth must not be negative, got {value!r}")
    # Round a fraction up: "0.5" must be the slowest limit, never 0 (which means unlimited).
    result = int(number.to_integral_value(rounding=ROUND_CEILING))
    if result > MAX_BANDWIDTH:
        raise InvalidSpec(f"bandwidth {value!r} is larger than QEMU accepts")
    return result


def format_bytes(amount: float) -> str:
    """Human-readable binary size, e.g. 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def progress_text(offset: int, length: int) -> str:
    """offset/length as a percentage with two decimals (CDI's DataVolume style), one rule for
    the status, the CLI and the plugin: truncated, never rounded up, so 99.999% never reads as
    100.00% before the job says done."""
    if length <= 0:
        return "100.00%"
    hundredths = offset * 10000 // length
    return f"{hundredths // 100}.{hundredths % 100:02d}%"
