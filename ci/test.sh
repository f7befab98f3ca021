#!/usr/bin/env bash
# The test command: set-up, then the unit tests of our own code and the conformance cases.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/ruff check conformance cases tests benchmarks topologies
# Any pytest failure fails this script, "no tests collected" (exit 5) included. Two workers: the
# cases mostly wait on the network, and every run has its own namespace prefix (pytest-xdist).
exec .venv/bin/pytest tests cases -n 2 -p no:cacheprovider --mptcp-report "${MPTCP_CONFORMANCE_REPORT_DIR:-reports/test-run}" "$@"
