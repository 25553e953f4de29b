// The Linux test guest (src/guest/linux.ts, src/guest/linux-init.sh) under plain qemu (TCG):
// each virtio device it gets is one the agent gives guests, on a fixed PCI address, and the
// guest must show that each works: its own report on the console, and what the test sees from
// outside (the HTTP page, the agent's answers, the balloon, the records on the disk).
import { spawnSync } from 'node:child_process';
import { readFile, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import {
  LINUX_GUEST_AGENT_PORT,
  LINUX_GUEST_CMDLINE,
  LINUX_GUEST_DEVICES,
  LINUX_GUEST_SECTOR,
  ensureLinuxGuest,
  parseLinuxGuestDisk,
  parseLinuxSerialLog,
  type LinuxGuest,
  type LinuxSerialLog,
} from '../../src/guest/linux.js';
import { freePort } from '../../src/migration/ports.js';
import { processMatches, waitForExit, type QemuProcessRecord } from '../../src/qemu/process.js';
import { GuestTracker, QEMU, launchSpec, tmpDir } from '../qemu/helpers.js';
import { guestAgentExchange, linuxGuestOrSkip } from '../helpers/linux-guest.js';

const MiB = 1024 * 1024;
const GUEST_MIB = 256;
const BALLOON_TARGET_MIB = 192;
const DISK_BYTES = 16 * MiB;
const BOOT_TIMEOUT_MS = 30_000;

const guests = new GuestTracker();
const noQemu = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).error ? `${QEMU} not installed` : false;

let guest: LinuxGuest | undefined;
let noGuest: string | false = noQemu;
let buildMs = 0;
if (!noQemu) {
  const started = Date.now();
  ({ guest, skip: noGuest } = await linuxGuestOrSkip());
  buildMs = Date.now() - started;
}

t.test('parsers', async (t) => {
  const id = '0123abcd-4567-89ef-0123-456789abcdef';
  const log = parseLinuxSerialLog(
    `[    1.2] noise\r\nKMLINUX boot ${id}\r\nKMLINUX dev vda ok 32768 sectors\r\nKMLINUX dev rng FAIL current=none read=\r\n` +
      `KMLINUX modprobe failed\r\nKMLINUX tick 0 ${id}\r\nKMLINUX tick 1 ${id}\r\nKMLINUX tick 2 ${id.slice(0, 9)}`,
  );
  t.same(log.boots, [id]);
  t.same(log.ticks, [{ tick: 0, bootId: id }, { tick: 1, bootId: id }], 'a line still being written is not read');
  t.same(log.devices, { vda: { ok: true, detail: '32768 sectors' }, rng: { ok: false, detail: 'current=none read=' } });
  t.same(log.problems, ['modprobe failed']);

  const disk = Buffer.alloc(4 * LINUX_GUEST_SECTOR);
  disk.write(`KMLINUX disk ${id}\n`, 0, 'latin1');
  disk.write(`KMREC 00000000 ${id}\n`, LINUX_GUEST_SECTOR, 'latin1');
  disk.write(`KMREC 00000001 ${id}\n`, 2 * LINUX_GUEST_SECTOR, 'latin1');
  t.same(parseLinuxGuestDisk(disk), { bootId: id, records: [{ tick: 0, bootId: id }, { tick: 1, bootId: id }] });
  disk.write('X', 2 * LINUX_GUEST_SECTOR + 40, 'latin1');
  t.same(parseLinuxGuestDisk(disk).records.length, 1, 'a record with anything but NULs after its line ends the log');
  t.same(parseLinuxGuestDisk(Buffer.alloc(1024)), { bootId: null, records: [] });
});

t.test('the guest is built once, then taken from the cache', { skip: noGuest }, async (t) => {
  t.comment(`kernel package version ${guest!.version}; first ensureLinuxGuest of this file took ${buildMs} ms`);
  const started = Date.now();
  t.same(await ensureLinuxGuest(), guest, 'the same files');
  t.comment(`cached: ${Date.now() - started} ms`);
  const kernel = await readFile(guest!.kernel);
  t.equal(kernel.toString('latin1', 0, 4), '\x7fELF', 'the kernel is the uncompressed ELF (booted through PVH)');
});

t.test('every virtio device works in the guest and from outside; the disk holds every tick', { skip: noGuest }, async (t) => {
  const { kernel, initrd } = guest!;
  const dir = await tmpDir(t);
  const disk = path.join(dir, 'disk.raw');
  const serialPath = path.join(dir, 'serial.log');
  const agentSocket = path.join(dir, 'qga.sock');
  await writeFile(disk, '');
  await truncate(disk, DISK_BYTES);
  const httpPort = await freePort('127.0.0.1');

  // The devices on pcie.0 at fixed slots, as the agent places them.
  const argv = [
    '-accel', 'tcg', '-machine', 'q35', '-m', String(GUEST_MIB), '-smp', '1',
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-kernel', kernel, '-initrd', initrd, '-append', LINUX_GUEST_CMDLINE,
    '-chardev', `file,id=charserial0,path=${serialPath}`,
    '-serial', 'chardev:charserial0',
    '-drive', `file=${disk},format=raw,if=none,id=drive-vda`,
    '-device', 'virtio-blk-pci,drive=drive-vda,id=vda,bus=pcie.0,addr=0x3',
    '-netdev', `user,id=hostnet0,hostfwd=tcp:127.0.0.1:${httpPort}-:80`,
    '-device', 'virtio-net-pci,netdev=hostnet0,id=net0,bus=pcie.0,addr=0x4',
    '-device', 'virtio-serial-pci,id=virtio-serial0,bus=pcie.0,addr=0x5',
    '-chardev', `socket,id=charagent0,path=${agentSocket},server=on,wait=off`,
    '-device', `virtserialport,bus=virtio-serial0.0,nr=1,chardev=charagent0,name=${LINUX_GUEST_AGENT_PORT}`,
    '-object', 'rng-random,id=objrng0,filename=/dev/urandom',
    '-device', 'virtio-rng-pci,rng=objrng0,id=rng0,bus=pcie.0,addr=0x6',
    '-device', 'virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x7',
  ];
  const started = Date.now();
  const { record, qmp } = await guests.launch(t, launchSpec(dir, argv));
  const serial = () => readFile(serialPath, 'latin1').catch(() => '');
  const waitForSerial = (what: string, done: (log: LinuxSerialLog) => boolean, timeoutMs = BOOT_TIMEOUT_MS) =>
    waitForGuest(record, serial, what, done, timeoutMs);

  const booted = await waitForSerial('the first tick', (log) => log.ticks.length > 0);
  const bootMs = Date.now() - started;
  t.comment(`qemu start -> first tick: ${bootMs} ms (TCG)`);
  t.equal(booted.boots.length, 1, 'one boot line');
  const bootId = booted.boots[0]!;
  for (const dev of LINUX_GUEST_DEVICES) {
    const report = booted.devices[dev];
    t.ok(report?.ok, `device ${dev}: ${report ? `${report.ok ? 'ok' : 'FAIL'} ${report.detail}` : 'no report'}`);
  }
  t.match(booted.devices.vda?.detail, `${DISK_BYTES / LINUX_GUEST_SECTOR} sectors`, 'the guest sees the whole disk');
  t.same(booted.problems, [], 'no other complaint');

  // Ticks advance, each carrying the one boot id.
  const ticking = await waitForSerial('three ticks', (log) => log.ticks.length >= 3);
  t.same(ticking.ticks.map((k) => k.tick), ticking.ticks.map((_, i) => i), 'ticks count up from 0 without a gap');
  t.ok(ticking.ticks.every((k) => k.bootId === bootId), 'every tick carries the boot id');

  // virtio-net: the page the guest serves, reached through the user network's host forward.
  const lastSeen = ticking.ticks.at(-1)!.tick;
  const res = await fetch(`http://127.0.0.1:${httpPort}/`, { signal: AbortSignal.timeout(10_000) });
  const page = await res.text();
  t.equal(res.status, 200, 'the guest answers HTTP');
  const served = new RegExp(`^KMLINUX boot ${bootId} tick (\\d+)$`, 'm').exec(page);
  t.ok(served, `the page carries the boot id: ${JSON.stringify(page)}`);
  t.ok(Number(served?.[1]) >= lastSeen, `and a current tick (${served?.[1]}, last on the console ${lastSeen})`);

  // virtio-serial: the agent's protocol, one JSON line each way.
  const syncId = Math.floor(Math.random() * 2 ** 31);
  const replies = await guestAgentExchange(agentSocket, [
    { execute: 'guest-sync', arguments: { id: syncId } },
    { execute: 'guest-ping' },
  ]);
  t.same(replies, [{ return: syncId }, { return: {} }], 'guest-sync returns its id, guest-ping an empty object');

  // virtio-balloon: the guest's driver gives memory back when asked.
  await qmp.execute('balloon', { value: BALLOON_TARGET_MIB * MiB });
  const actual = await waitForValue('the balloon to inflate', async () => {
    const { actual } = await qmp.execute<{ actual: number }>('query-balloon');
    return actual <= BALLOON_TARGET_MIB * MiB ? actual : undefined;
  });
  t.equal(actual, BALLOON_TARGET_MIB * MiB, `the guest is down to ${BALLOON_TARGET_MIB} MiB`);

  // virtio-blk: every tick the console showed is on the disk, in order, nothing after it.
  await qmp.execute('quit');
  t.ok(await waitForExit(record, 10_000), 'qemu quits');
  const final = parseLinuxSerialLog(await serial());
  const image = await readFile(disk);
  const onDisk = parseLinuxGuestDisk(image);
  t.equal(onDisk.bootId, bootId, 'the disk header carries the boot id');
  t.same(onDisk.records.map((r) => r.tick), onDisk.records.map((_, i) => i), 'the records count up from 0 without a gap');
  t.ok(onDisk.records.every((r) => r.bootId === bootId), 'every record carries the boot id');
  const lastTick = final.ticks.at(-1)!.tick;
  // Each tick is written before it is printed: one more record is fine, one fewer is a lost write.
  t.ok(
    onDisk.records.length === lastTick + 1 || onDisk.records.length === lastTick + 2,
    `${onDisk.records.length} records for ticks 0..${lastTick} on the console`,
  );
  const rest = image.subarray((onDisk.records.length + 1) * LINUX_GUEST_SECTOR);
  t.ok(rest.every((b) => b === 0), 'nothing written past the last record');
  t.same(final.problems, [], 'no complaint until the end');
});

// It checks that the file started qemus: only when the guest could be built.
if (!noGuest) guests.checkNoneLeft(t);

/** Polls the serial log until `done`; fails at once if qemu is gone, or when time runs out. */
async function waitForGuest(
  record: QemuProcessRecord,
  serial: () => Promise<string>,
  what: string,
  done: (log: LinuxSerialLog) => boolean,
  timeoutMs: number,
): Promise<LinuxSerialLog> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const text = await serial();
    const log = parseLinuxSerialLog(text);
    if (done(log)) return log;
    if (!processMatches(record)) throw new Error(`qemu exited while waiting for ${what}; serial:\n${text}`);
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; serial:\n${text}`);
    await sleep(20);
  }
}

async function waitForValue<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}
