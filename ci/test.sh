#!/usr/bin/env bash
# The test command: set-up, then the unit tests of our own code and the conformance cases.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/ruff check conformance cases tests benchmarks topologies
# Any pytest failure fails this script, "no tests collected" (exit 5) included.
exec .venv/bin/pytest tests cases -p no:cacheprovider --mptcp-report "${MPTCP_CONFORMANCE_REPORT_DIR:-reports/test-run}" "$@"
