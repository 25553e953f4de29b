#!/usr/bin/env bash
# Builds the one native piece: the preload that hands qemu 7.2 a /dev/userfaultfd grant for
# postcopy (src/qemu/userfaultfd-preload.c). Without a C compiler it is skipped, and this host's
# qemus receive postcopy only where the kernel lets any process use userfaultfd.
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist/native/userfaultfd-preload.so
if ! command -v cc >/dev/null; then
  echo "build-native: no C compiler (cc): $out not built; postcopy needs vm.unprivileged_userfaultfd=1 here" >&2
  exit 0
fi
mkdir -p dist/native
cc -O2 -Wall -Wextra -Werror -shared -fPIC -o "$out.tmp" src/qemu/userfaultfd-preload.c
chmod 0755 "$out.tmp"
mv -f "$out.tmp" "$out"
