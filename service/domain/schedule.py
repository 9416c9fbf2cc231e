"""How often to check a run, and when to give up on it, by processor (docs/parallel.md §7)."""

from __future__ import annotations

import msgspec

from service.config import Settings


class ProcessorProfile(msgspec.Struct, frozen=True):
    # Multiplies the first-check delay: slow processors are not worth checking early.
    check_scale: float
    # Upper end of Parallel's documented latency, doubled: a run still active then has failed us.
    deadline_s: float
    usd_per_run: float


PROFILES = {
    "lite": ProcessorProfile(1, 2 * 60, 0.005),
    "base": ProcessorProfile(1.5, 2 * 100, 0.010),
    "core": ProcessorProfile(3, 2 * 300, 0.025),
    "core2x": ProcessorProfile(3, 2 * 600, 0.050),
    "pro": ProcessorProfile(6, 2 * 600, 0.100),
    "ultra": ProcessorProfile(15, 2 * 1500, 0.300),
    "ultra2x": ProcessorProfile(15, 2 * 3000, 0.600),
    "ultra4x": ProcessorProfile(15, 2 * 5400, 1.200),
    "ultra8x": ProcessorProfile(15, 2 * 7200, 2.400),
}
DEFAULT_PROFILE = ProcessorProfile(3, 4 * 3600, 2.400)


def profile(processor: str) -> ProcessorProfile:
    """The profile of a processor; `-fast` variants share their standard one's."""
    return PROFILES.get(processor.removesuffix("-fast"), DEFAULT_PROFILE)


def run_deadline_s(settings: Settings, processor: str) -> float:
    """Seconds after its start by which a run still active has failed us (the turn times out)."""
    return profile(processor).deadline_s * settings.run_deadline_scale


def check_delay(processor: str, checks_done: int, initial_s: float, max_s: float) -> float:
    """Seconds until the next check: doubling from the first (1, 2, 4, … times the first),
    capped at max_s."""
    first = initial_s * profile(processor).check_scale
    return min(max_s, first * 2.0 ** min(checks_done, 30))


def poll_start(settings: Settings, grouped: bool = False) -> float:
    """Seconds to the first check of a run (before the processor's scale). In push mode the
    webhook reports the run's end, and for a run in a task group its group's event stream does,
    so the safety net starts late: no check for a run shorter than that, one for a run of two
    minutes, a handful for one of twenty (with poll_cap)."""
    start = settings.poll_initial_s
    if settings.public_base_url:
        start = max(start, settings.push_poll_initial_s)
    if grouped:
        start = max(start, settings.group_poll_initial_s)
    return start


def poll_cap(settings: Settings, grouped: bool = False) -> float:
    """The longest wait between two checks of a run. In push mode Parallel's webhook triggers
    a check as soon as the run ends (a group's stream does for a run in a group), so polling is
    only a safety net and backs off further."""
    cap = settings.poll_max_s
    if settings.public_base_url:
        cap = max(cap, settings.push_poll_max_s)
    if grouped:
        cap = max(cap, settings.group_poll_max_s)
    return cap
