#!/usr/bin/env bash
# The test command: installs what is missing, brings up the local stack, runs
# every test, then drives the real function binaries through `cargo lambda`
# with the files in events/, and lints the template and the host-side shell.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export SAM_CLI_TELEMETRY=0

tests/stack/stack.sh install
tests/stack/stack.sh up >/dev/null
trap 'tests/stack/stack.sh down >/dev/null 2>&1 || true' EXIT

echo "== shellcheck"
shellcheck -s sh shared/host/plugin-host.sh tests/stack/eic-authorized-keys
shellcheck tests/stack/*.sh tests/run.sh .ci/run

echo "== template"
.venv/bin/cfn-lint template.yaml
AWS_REGION=us-east-1 .venv/bin/sam validate --lint >/dev/null

echo "== the local stack's emulators against the services' documented behaviour"
if ! selftest=$(tests/stack/selftest.sh 2>&1); then
    printf '%s\n' "$selftest"
    exit 1
fi
printf '%s\n' "$selftest" | tail -1

echo "== cargo test"
cargo test --workspace

echo "== function binaries through cargo lambda (demo --check)"
tests/stack/demo.sh --check
