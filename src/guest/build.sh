#!/usr/bin/env bash
# Assemble the test guest boot sector: src/guest/boot.S -> src/guest/boot.bin
# (or to the path given as $1; the tests use that to check that boot.bin in
# the repo is exactly what boot.S assembles to).  Needs GNU as + ld (binutils).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/boot.bin}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
as --32 -o "$tmp/boot.o" "$here/boot.S"
ld -m elf_i386 -Ttext 0x7c00 -e _start --oformat binary -o "$tmp/boot.bin" "$tmp/boot.o"
size=$(stat -c %s "$tmp/boot.bin")
if [ "$size" -ne 512 ]; then
  echo "build.sh: boot.bin is $size bytes, expected exactly 512" >&2
  exit 1
fi
chmod 644 "$tmp/boot.bin"
mv "$tmp/boot.bin" "$out"
