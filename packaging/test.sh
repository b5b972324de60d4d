#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine, as root: installs what it needs first
# (packaging/install-deps.sh), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash packaging/install-deps.sh
exec .venv/bin/pytest "$@"
