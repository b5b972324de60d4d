#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: installs what it needs first
# (packaging/install-deps.sh), then runs pytest. Extra arguments go to pytest.
# Tests run in ATTUNE_TEST_WORKERS processes (default 4; 0 runs them in this one): most of their
# time is spent waiting on real daemons and databases, not on the CPU. Each test file runs
# whole, in order, on one worker (--dist loadfile): a module's container or cluster pair is
# built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install-deps.sh
exec .venv/bin/pytest -n "${ATTUNE_TEST_WORKERS:-4}" --dist loadfile "$@"
