"""The README's first command, as a newcomer runs it: the demo shows heartbeats and a sample
sensor placed and running, then cleans up after itself."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_shows_heartbeats_and_a_placed_sensor_running_then_cleans_up():
    before = set(os.listdir("/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTUNE") and k != "DATABASE_URL"}
    env.update(DEMO_SECONDS="9", DEMO_HEARTBEAT_INTERVAL="1")
    result = subprocess.run(["bash", str(ROOT / "packaging" / "demo.sh")], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    out = result.stdout
    assert result.returncode == 0, out
    assert "heartbeat: worker sensor-demo" in out
    assert "sensor demo.hello: hello from demo.hello" in out and "polling every 5s" in out
    assert "sensor demo.hello started" in out
    table = out.split("--- attune-sensor assignments", 1)[1]
    assert "demo.hello" in table and "running" in table and "sensor-demo" in table
    assert "sensor demo.hello stopped" in out  # stopped with the daemon
    assert not [n for n in set(os.listdir("/tmp")) - before if n.startswith("attune-demo-")]
