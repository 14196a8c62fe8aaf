"""What the rest of the machine took while a run was timed: CPU seconds of other processes (and of the
hypervisor's other guests, counted as steal time), so that a run slowed by them can be told from a slow method."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

BUSY_SHARE = 0.10  # other processes taking more than this share of the machine's CPUs make a run suspect
BUSY_MIN_S = 0.1  # and at least this many CPU seconds (a tick or two in a short run is not a busy machine)


def machine_busy_seconds() -> float | None:
    """CPU seconds every process (and steal) has used since boot, from ``/proc/stat``; None where it is missing."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def own_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class OthersClock:
    """CPU seconds the rest of the machine used between ``start`` and ``stop`` (None where it cannot tell)."""

    def __init__(self) -> None:
        self._busy: float | None = None
        self._own = 0.0

    def start(self) -> None:
        self._busy, self._own = machine_busy_seconds(), own_seconds()

    def stop(self) -> float | None:
        busy = machine_busy_seconds()
        if busy is None or self._busy is None:
            return None
        return max(0.0, (busy - self._busy) - (own_seconds() - self._own))


def others_share(others_cpu_s: float | None, wall_s: float, cpus: int | None = None) -> float | None:
    """The share of the machine's CPUs other processes took during a run of ``wall_s`` seconds."""
    cpus = cpus or os.cpu_count() or 1
    if others_cpu_s is None or wall_s <= 0:
        return None
    return others_cpu_s / (wall_s * cpus)


def busy_note(records: Iterable[dict[str, Any]], cpus: int | None = None) -> str | None:
    """One line naming the timed runs during which other processes took more than ``BUSY_SHARE`` of the CPUs (and
    ``BUSY_MIN_S`` seconds); None when there were none."""
    busy = []
    for record in records:
        share = others_share(record.get("others_cpu_s"), record.get("wall_s") or 0.0, cpus)
        if share is not None and share > BUSY_SHARE and record["others_cpu_s"] >= BUSY_MIN_S:
            busy.append(f"{record['method']} on question {record['question_id']} ({share:.0%})")
    if not busy:
        return None
    return (f"other processes took more than {BUSY_SHARE:.0%} of the CPUs during {len(busy)} timed run(s), whose "
            f"times may be slowed by it: {', '.join(busy)}")
