"""attune-sensor: registers this host as a sensor worker in Attune's PostgreSQL `worker` table,
proves it is alive with heartbeats, and leaves cleanly.

The public API, for custom integrations::

    from attune_sensor import Config, SensorWorkerRegistration, SensorService

Heavy imports (psycopg2) happen lazily so `attune-sensor --version` and `config` stay fast.
"""

__version__ = "0.1.0"

__all__ = ["Config", "SensorWorkerRegistration", "SensorService", "__version__"]


def __getattr__(name):
    # Lazy re-exports: importing the package must not pull in psycopg2 (see bench/startup).
    if name == "Config":
        from .config import Config
        return Config
    if name == "SensorWorkerRegistration":
        from .worker.registration import SensorWorkerRegistration
        return SensorWorkerRegistration
    if name == "SensorService":
        from .worker.service import SensorService
        return SensorService
    raise AttributeError(name)
