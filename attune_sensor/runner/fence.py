"""When this worker's sensors must stop because its heartbeats stopped getting through, so that
no sensor ever runs on two hosts (docs/design.md, "At most one copy").

A peer reaps this worker once the database's now() passes its last stored heartbeat plus
multiplier x its recorded interval, and re-places its sensors at once. The stored heartbeat is
the database's now() when the statement ran, which is never before this daemon sent it; so
measured on this host's monotonic clock from the moment the last successful heartbeat was
*sent*, the same window ends no earlier. The sensors get SIGTERM a grace before the end of the
window, less a margin, and SIGKILL at window minus margin. The margin covers the two clocks'
rate difference (NTP keeps it far below 1 %) and scheduling delay; what it assumes is written
in docs/design.md.
"""

MIN_MARGIN = 1.0
MARGIN_SHARE = 0.05
GRACE_SHARE = 1 / 6


def deadlines(last_ok, interval, multiplier, sensor_timeout):
    """(term_at, kill_at) on the clock of `last_ok` (the send time of the last heartbeat that
    succeeded): SIGTERM to every sensor at term_at, SIGKILL at kill_at, unless a heartbeat
    succeeds before."""
    window = multiplier * interval
    margin = min(max(MIN_MARGIN, MARGIN_SHARE * window), window / 3)
    kill_at = last_ok + window - margin
    return kill_at - min(sensor_timeout, GRACE_SHARE * window), kill_at
