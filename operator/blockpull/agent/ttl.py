"""`ttlSecondsAfterFinished`: delete finished objects when their time is up.

Owns: one timer per finished object with a TTL, re-armed when the TTL or the completion time
changes and cancelled when the object goes; the delete carries the object's uid, so a new
object of the same name is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Mapping
from typing import Any

from blockpull.agent import status as st
from blockpull.agent.clock import WallClock, utc_now
from blockpull.agent.kube import Gone, KubeAPI, KubeAPIError, ObjectRef

log = logging.getLogger(__name__)


class TTLTimers:
    def __init__(self, kube: KubeAPI, clock: WallClock = utc_now) -> None:
        self._kube = kube
        self._clock = clock
        self._timers: dict[str, tuple[datetime.datetime, asyncio.Task[None]]] = {}

    def schedule(self, ref: ObjectRef, body: Mapping[str, Any]) -> None:
        """(Re-)arm the timer of a finished object from its spec and completionTime."""
        ttl = body.get("spec", {}).get("ttlSecondsAfterFinished")
        finished = st.parse_time((body.get("status") or {}).get("completionTime"))
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0 or finished is None:
            self.cancel(ref.uid)
            return
        due = finished + datetime.timedelta(seconds=ttl)
        current = self._timers.get(ref.uid)
        if current is not None and current[0] == due:
            return
        self.cancel(ref.uid)
        self._timers[ref.uid] = (due, asyncio.create_task(self._delete_at(ref, due)))

    def cancel(self, uid: str) -> None:
        entry = self._timers.pop(uid, None)
        if entry is not None:
            entry[1].cancel()

    async def close(self) -> None:
        tasks = [task for _, task in self._timers.values()]
        self._timers.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _delete_at(self, ref: ObjectRef, due: datetime.datetime) -> None:
        delay = (due - self._clock()).total_seconds()
        await asyncio.sleep(max(0.0, delay))
        try:
            await self._kube.delete(ref)
            log.info("%s: deleted after ttlSecondsAfterFinished", ref)
        except Gone:
            pass
        except KubeAPIError as exc:
            log.warning("%s: TTL delete failed: %s", ref, exc)
        finally:
            self._timers.pop(ref.uid, None)
