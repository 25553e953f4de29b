#!/usr/bin/env bash
# The test suite: set-up, build, every tap test file (the leftover check last), and a closing
# line `N passed, N failed` taken from tap's own counts.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || { echo "0 passed, 1 failed"; exit 1; }

# One measurement for the whole suite: KVM only where it is fast enough (see src/qemu/accel-probe.ts).
if [ -z "${KVM_MIGRATE_TEST_ACCEL:-}" ]; then
  KVM_MIGRATE_TEST_ACCEL=$(node dist/bin/kvm-migrate.js check-accel) || { echo "0 passed, 1 failed"; exit 1; }
  export KVM_MIGRATE_TEST_ACCEL
else
  echo "accelerator $KVM_MIGRATE_TEST_ACCEL (set by KVM_MIGRATE_TEST_ACCEL)" >&2
fi

mapfile -t files < <(find dist/test -name '*.test.js' ! -name 'zz-*' | sort)
files+=(dist/test/zz-leftovers.test.js)
log=$(mktemp)
node_modules/.bin/tap "$@" "${files[@]}" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
summary=$(grep -E '^# \{ total: [0-9]+' "$log" | tail -n 1)
rm -f "$log"
count() { sed -nE "s/.*[ {]$1: ([0-9]+).*/\1/p" <<<"$summary"; }
pass=$(count pass); fail=$(count fail); skip=$(count skip)
[ -n "$summary" ] || { pass=0; fail=1; }
if [ "$rc" -ne 0 ] && [ "${fail:-0}" -eq 0 ]; then fail=1; fi
line="${pass:-0} passed, ${fail:-0} failed"
[ -n "${skip}" ] && [ "${skip}" -gt 0 ] && line="$line, ${skip} skipped"
echo "$line"
exit "$rc"
