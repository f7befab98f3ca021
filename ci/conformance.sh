#!/usr/bin/env bash
# The main job: set-up, then the conformance suite against the local kernel, writing the
# compliance report under reports/<UTC timestamp>/ (report.html, report.md, results.json,
# junit.xml, artefacts), then the interop matrix of the implementations available here into
# reports/<UTC timestamp>/matrix/ (matrix.html, one report per pair). Arguments go to the suite.
# The exit code is the worse of the two (1 required failure, 2 environment, 3 oracles).
set -uo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh || exit 2
.venv/bin/mptcp-conformance doctor
folder="reports/$(date -u +%Y%m%dT%H%M%SZ)"
.venv/bin/mptcp-conformance run --report "$folder" "$@"
suite=$?
.venv/bin/mptcp-conformance matrix --out "$folder/matrix"
matrix=$?
for code in 1 2 3; do
    if [ "$suite" = "$code" ] || [ "$matrix" = "$code" ]; then exit "$code"; fi
done
exit $(( suite || matrix ))
