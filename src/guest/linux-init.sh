#!/bin/busybox sh
# /init of the Linux test guest (src/guest/linux.ts puts it in the initramfs with a static
# busybox and the virtio modules). It brings up each virtio device, says on the serial console
# which ones work, then ticks: each tick is first written to the disk, then served over HTTP,
# then printed, so whatever the console shows is already on the disk.
#
# Serial console (the format parseLinuxSerialLog in linux.ts reads):
#   KMLINUX boot <boot id>              once per boot (the kernel's random boot_id)
#   KMLINUX dev <vda|net|rng|balloon|agent> ok [detail]    or: KMLINUX dev <name> FAIL <why>
#   KMLINUX tick <n> <boot id>          every ~0.5 s, n = 0, 1, 2, ...
# Disk (/dev/vda, 512-byte sectors, each a line padded with NULs):
#   sector 0:      "KMLINUX disk <boot id>"
#   sector n + 1:  "KMREC <n, 8 digits> <boot id>" for tick n
# HTTP (port 80): "KMLINUX boot <boot id> tick <n>" for the latest tick.
# Network traffic of its own (kmfetch=PORT on the kernel command line): it fetches
#   http://10.0.2.2:PORT/fetch?boot=<boot id>&n=<k> (qemu's user network: the host's loopback)
#   about ten times a second, k = 0, 1, 2, ..., so a test sees the network keep working.
# A panic of its own (kmpanic=N): after tick N it tells qemu's pvpanic device (ISA port 0x505,
#   written through /dev/port) that it panicked, as the kernel's pvpanic driver would.
# Guest agent (virtio-serial port org.qemu.guest_agent.0): one JSON command per line;
#   guest-ping and guest-sync are answered as qemu-guest-agent does, anything else is an error.
# Firmware and TPM state of its own (kmstate on the kernel command line), for a guest booted
#   through UEFI with a TPM: at its first boot it writes the UEFI variable KmMigrateTest (the
#   line "first boot <boot id>"), at each boot it extends PCR 16 once with 32 bytes of 'K'; each
#   tick then says what the firmware and the TPM hold (- when absent):
#   KMLINUX state efivar=<the variable's line> pcr16=<PCR 16, sha256 bank, hex>

/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
# The kernel's built-in initramfs already gave us /dev/console; devtmpfs brings the rest.
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "KMLINUX $*"; }
bootid=$(cat /proc/sys/kernel/random/boot_id)
say boot "$bootid"

# Names written by linux.ts; modprobe finds their dependencies in the trimmed modules.dep.
modprobe -a $(cat /etc/kmlinux-modules) || say modprobe failed

# One sector: the line, NUL-padded (conv=sync), on the device before dd returns (fsync).
put_sector() {
  dd of=/dev/vda bs=512 seek="$1" count=1 conv=sync,notrunc,fsync 2>/dev/null
}

disk=
header="KMLINUX disk $bootid"
if [ ! -b /dev/vda ]; then
  say dev vda FAIL no /dev/vda
elif ! echo "$header" | put_sector 0; then
  say dev vda FAIL write
else
  # Read back past the page cache, so the line made the round trip through the device.
  blockdev --flushbufs /dev/vda
  back=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000')
  if [ "$back" = "$header" ]; then
    disk=/dev/vda
    say dev vda ok "$(cat /sys/block/vda/size) sectors"
  else
    say dev vda FAIL read back "$back"
  fi
fi

mkdir -p /www
page() { echo "KMLINUX boot $bootid tick $1" >/www/index.tmp && mv /www/index.tmp /www/index.html; }
page -
# qemu user networking's fixed addresses: no DHCP round trip at boot.
ip link set lo up
if ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
  && httpd -p 80 -h /www; then
  say dev net ok "$(cat /sys/class/net/eth0/address)"
else
  say dev net FAIL
fi

rng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
sample=$(timeout 5 dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ "$rng" = virtio_rng.0 ] && [ ${#sample} -eq 32 ]; then
  say dev rng ok "$sample"
else
  say dev rng FAIL "current=$rng read=$sample"
fi

if ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -q '^virtio'; then
  say dev balloon ok
else
  say dev balloon FAIL driver bound to no device
fi

# A port opens once at a time, so one read-write descriptor serves both directions. While the
# host end is closed, reads return EOF: wait and read again.
agent() {
  while :; do
    while read -r line; do
      case $line in
        *'"guest-ping"'*) echo '{"return": {}}' ;;
        *'"guest-sync"'*)
          id=$(echo "$line" | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*\(-\{0,1\}[0-9]\{1,\}\).*/\1/p')
          if [ -n "$id" ]; then echo "{\"return\": $id}"; else echo '{"error": {"class": "GenericError", "desc": "guest-sync needs a numeric id"}}'; fi
          ;;
        *) echo '{"error": {"class": "CommandNotFound", "desc": "this guest answers guest-ping and guest-sync only"}}' ;;
      esac
    done <>"$1" >&0
    sleep 1
  done
}
port=
for p in /sys/class/virtio-ports/vport*; do
  [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
if [ -c "$port" ]; then
  agent "$port" &
  say dev agent ok "$port"
else
  say dev agent FAIL no port named org.qemu.guest_agent.0
fi

fetchport=$(sed -n 's/.*kmfetch=\([0-9]\{1,5\}\).*/\1/p' /proc/cmdline)
if [ -n "$fetchport" ]; then
  say fetching from port "$fetchport"
  (k=0; while :; do
    # nc, not wget: the static busybox's wget crashes in glibc's name service lookups.
    status=$(printf 'GET /fetch?boot=%s&n=%s HTTP/1.0\r\n\r\n' "$bootid" "$k" | nc -w 3 10.0.2.2 "$fetchport" 2>&1 | head -n 1)
    case $status in
      'HTTP/1.'?' 200'*) k=$((k + 1)) ;;
      *) say fetch "$k" failed: "$status" ;;
    esac
    usleep 100000
  done) &
fi

efivar=/sys/firmware/efi/efivars/KmMigrateTest-6a3f5e2c-1b4d-4c8e-9f7a-2d5b8c1e0f34
pcr16=/sys/class/tpm/tpm0/pcr-sha256/16
state=
if grep -q kmstate /proc/cmdline; then
  state=1
  if [ -d /sys/firmware/efi ] && modprobe efivarfs && mount -t efivarfs efivarfs /sys/firmware/efi/efivars; then
    # 4 bytes of attributes (non-volatile, boot and runtime access), then the value.
    [ -e "$efivar" ] || printf '\007\000\000\000first boot %s' "$bootid" >"$efivar" || say efivar write failed
  else
    say efivar FAIL no efivarfs
  fi
  if [ -c /dev/tpm0 ]; then
    # TPM2_PCR_Extend(PCR 16, password session, one sha256 digest of 32 'K'), in one write.
    exec 3<>/dev/tpm0
    printf '\200\002\000\000\000\101\000\000\001\202\000\000\000\020\000\000\000\011\100\000\000\011\000\000\000\000\000\000\000\000\001\000\013KKKKKKKKKKKKKKKKKKKKKKKKKKKKKKKK' >&3
    rc=$(dd bs=64 count=1 <&3 2>/dev/null | od -An -tx1 -j6 -N4 | tr -d ' \n')
    exec 3<&-
    [ "$rc" = 00000000 ] || say pcr extend FAIL "rc=$rc"
  else
    say tpm FAIL no /dev/tpm0
  fi
fi

panicat=$(sed -n 's/.*kmpanic=\([0-9]\{1,6\}\).*/\1/p' /proc/cmdline)
n=0
while :; do
  if [ -n "$disk" ]; then
    printf 'KMREC %08d %s\n' "$n" "$bootid" | put_sector $((n + 1)) || say disk write "$n" failed
  fi
  page "$n"
  say tick "$n" "$bootid"
  if [ -n "$state" ]; then
    say state "efivar=$(tail -c +5 "$efivar" 2>/dev/null || echo -)" "pcr16=$(cat "$pcr16" 2>/dev/null || echo -)"
  fi
  if [ "$n" = "$panicat" ]; then
    say panic
    printf '\001' | dd of=/dev/port bs=1 seek=1285 count=1 2>/dev/null
  fi
  n=$((n + 1))
  usleep 500000
done
