"""Pure timing rules: start-up backoff and the watchdog fit check."""

import pytest

from attune_sensor.db import Backoff
from attune_sensor.errors import ConfigError
from attune_sensor.worker.notify import check_watchdog_fits


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter():
    middle = Backoff(rng=lambda: 0.5)
    assert [middle.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    low, high = Backoff(rng=lambda: 0.0), Backoff(rng=lambda: 1.0)
    assert [low.next_delay() for _ in range(6)][-1] == pytest.approx(24)
    assert [high.next_delay() for _ in range(6)][-1] == pytest.approx(36)


def test_watchdog_fit():
    check_watchdog_fits(30, {})  # no watchdog armed: nothing to check
    check_watchdog_fits(45, {"WATCHDOG_USEC": "90000000"})
    with pytest.raises(ConfigError, match="at most 45s"):
        check_watchdog_fits(46, {"WATCHDOG_USEC": "90000000"})
    # armed for another process (WATCHDOG_PID differs): not ours to honour
    check_watchdog_fits(46, {"WATCHDOG_USEC": "90000000", "WATCHDOG_PID": "1"})
