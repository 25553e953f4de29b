#!/usr/bin/env bash
# Installs what the agent, the demo and the tests need on a fresh Debian machine, then builds.
# Idempotent: a machine that has everything only runs the build.
set -euo pipefail
cd "$(dirname "$0")/.."

# npm would only warn (EBADENGINE) and the build fail later, less clearly: bookworm's own nodejs is 18.
if ! node -e 'const [a, b, c] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && (b > 18 || (b === 18 && c >= 1))) ? 0 : 1)'; then
  echo "setup: Node >= 20.18.1 is needed, this is $(node --version 2>/dev/null || echo 'no node'); see README.md, Prerequisites" >&2
  exit 1
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v ip >/dev/null || need+=(iproute2)
command -v as >/dev/null || need+=(binutils)
# The postcopy preload for qemu 7.2 (scripts/build-native.sh, src/qemu/userfaultfd-preload.c).
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v openssl >/dev/null || need+=(openssl)
# A guest's <tpm>: swtpm emulates it, swtpm_setup manufactures it; the TPM tests read its state with tpm2-tools.
command -v swtpm >/dev/null || need+=(swtpm)
command -v swtpm_setup >/dev/null || need+=(swtpm-tools)
command -v tpm2_nvread >/dev/null || need+=(tpm2-tools)
# <os firmware='efi'>: OVMF and its descriptors in /usr/share/qemu/firmware.
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need+=(ovmf)
# The Linux test guest (src/guest/linux.ts): xz unpacks its kernel, cpio makes its initramfs.
command -v xz >/dev/null || need+=(xz-utils)
command -v cpio >/dev/null || need+=(cpio)
# The test of deploy/systemd checks the unit with systemd-analyze verify (no systemd as PID 1 needed).
command -v systemd-analyze >/dev/null || need+=(systemd)
# The compose rig's test (test/rig): podman builds the image and runs it, podman-compose runs
# compose.yaml; aardvark-dns resolves the services' names on their network (netavark only
# recommends it, and this installs without recommends).
command -v podman >/dev/null || need+=(podman netavark)
command -v podman-compose >/dev/null || need+=(podman-compose)
[ -x /usr/lib/podman/aardvark-dns ] || need+=(aardvark-dns)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run as root or install them with apt-get" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Linux test guest's kernel and busybox come from apt-get download, so apt must know them
# (a fresh machine may have no package lists); without them that test skips.
if [ "$(id -u)" -eq 0 ] && ! apt-cache show --no-all-versions linux-image-amd64 busybox-static >/dev/null 2>&1; then
  echo "setup: apt knows no linux-image-amd64 or busybox-static: apt-get update" >&2
  apt-get update -qq >/dev/null || echo "setup: apt-get update failed; the Linux guest test will skip" >&2
fi

# npm ci when node_modules is missing or older than the lock file.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
npm run --silent build
