#!/usr/bin/env bash
# The main job: set-up, then the conformance suite against the local kernel, writing the
# compliance report under reports/<UTC timestamp>/ (results.json, report.md, junit.xml, artefacts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
.venv/bin/mptcp-conformance doctor
exec .venv/bin/mptcp-conformance run "$@"
