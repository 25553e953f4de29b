#!/usr/bin/env bash
# The main job on a fresh machine: install, build, then migrate a real guest between two agents.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node dist/bin/kvm-migrate.js demo
