"""The agent's wall clock: the one seam for every timestamp it writes and every deadline and
TTL it keeps.

Production uses the real UTC time. In-process tests hand the agent a clock derived from the
event loop's time, so that they run on controlled (fast-forwarded) time: an hour's deadline
passes in milliseconds and is still measured the way production measures it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

#: Now, in UTC.
WallClock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
