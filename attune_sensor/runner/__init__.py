"""Running what is placed on this worker: one supervised child process per placed sensor.

The room has two parts, each with one reason to change:

* launch.py: what a placement runs, and the trust boundary (docs/operations.md, "What the
  database may choose"): the entrypoint resolved inside packs_base_dir, the interpreter of its
  runtime, the environment of the platform's standalone-sensor contract. Pure functions.
* supervisor.py: children, restart backoff, stopping, and their output to the journal; no SQL.

The service only tells the Supervisor "these sensors are yours now" (set_desired) and "stop
everything" (stop_all); when to stop them so that no sensor ever runs twice fleet-wide is the
fence rule in fence.py (docs/design.md, "At most one copy").
"""
