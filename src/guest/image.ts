// The project's own test guest: a 512-byte boot sector (src/guest/boot.S,
// prebuilt as src/guest/boot.bin) that proves across a migration that the
// guest ran, kept running, did not reboot, and that its RAM arrived intact.
//
// Guest-physical memory map (must match boot.S):
//   0x9000 u32 magic 'KMGT' = 0x4B4D4754
//   0x9004 u32 boot id (RDTSC at boot, never 0; changes on every boot)
//   0x9008 u32 pass counter (starts at 0)
//   0x900C u32 state: 1 = filling RAM, 2 = fill done, passes running
//   0x9010 u32 fillMiB, 0x9014 hotMiB, 0x9018 reportEvery (echoed params)
//   0x200000 .. +fillMiB MiB: dword at A = guestPatternWord(A)
//   0x200000 .. +hotMiB MiB (hot set): dwords at page offsets 0/1K/2K/3K are
//            rewritten by pass n as guestHotWord(A, n); the rest keeps the fill
//            pattern. Everything above the hot set is static once state = 2.
// Serial (COM1, 115200 8N1): "KMGT boot <8 hex>" once per boot, then
// "KMGT pass <8 hex>" every reportEvery passes (0 = never).
// With hotMiB = 0 each pass spins ~4M TSC ticks instead (~hundreds of passes/s).

import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { packageRoot } from '../agent/package-root.js';

export interface GuestParams {
  fillMiB: number;
  hotMiB: number;
  reportEvery: number;
}

export const GUEST_MAGIC = 0x4b4d4754; // 'KMGT'
export const GUEST_BASE_ADDR = 0x9000;
export const GUEST_BOOTID_ADDR = 0x9004;
export const GUEST_PASSES_ADDR = 0x9008;
export const GUEST_STATE_ADDR = 0x900c;
export const GUEST_PARAMS_ADDR = 0x9010;
export const GUEST_STATE_FILLING = 1;
export const GUEST_STATE_RUNNING = 2;
/** Start of the filled region and of the hot set (2 MiB). */
export const GUEST_FILL_BASE = 0x200000;
/** Offset of the 'KPRM' magic in boot.bin; fillMiB, hotMiB, reportEvery (u32 LE) follow. */
export const GUEST_PARAM_MAGIC_OFFSET = 0x1ec;
export const GUEST_PARAM_OFFSET = 0x1f0;
export const GUEST_PARAM_MAGIC = 'KPRM';
/** Size of the raw image written by writeGuestImage. */
export const GUEST_IMAGE_SIZE = 1024 * 1024;
/** Largest fillMiB/hotMiB: the region must stay below the 32-bit PCI hole. */
export const GUEST_MAX_MIB = 3000;

const MiB = 1024 * 1024;
const PAT_MUL = 0x9e3779b1;
const PAT_XOR = 0xdeadbeef;

/** src/guest/ in the package (boot.S, boot.bin, build.sh), also when running from dist/. */
export function guestSourceDir(): string {
  return join(packageRoot, 'src', 'guest');
}

export function bootBinPath(): string {
  return join(guestSourceDir(), 'boot.bin');
}

/** Smallest -m (MiB) that holds everything the guest writes, with 1 MiB to spare. */
export function guestMemoryMiB(params: GuestParams): number {
  return 2 + Math.max(params.fillMiB, params.hotMiB) + 1;
}

export function validateGuestParams(params: GuestParams): void {
  for (const key of ['fillMiB', 'hotMiB', 'reportEvery'] as const) {
    const v = params[key];
    if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) {
      throw new RangeError(`guest param ${key} must be an integer in 0..2^32-1, got ${v}`);
    }
  }
  if (params.fillMiB > GUEST_MAX_MIB) {
    throw new RangeError(`guest param fillMiB must be <= ${GUEST_MAX_MIB}, got ${params.fillMiB}`);
  }
  if (params.hotMiB > params.fillMiB) {
    throw new RangeError(
      `guest param hotMiB (${params.hotMiB}) must be <= fillMiB (${params.fillMiB}): the hot set is the start of the filled region`,
    );
  }
}

/** boot.bin with params patched in (512 bytes). */
export async function buildBootSector(params: GuestParams): Promise<Buffer> {
  validateGuestParams(params);
  const path = bootBinPath();
  const sector = await readFile(path);
  if (sector.length !== 512 || sector[510] !== 0x55 || sector[511] !== 0xaa) {
    throw new Error(`${path} is not a 512-byte boot sector`);
  }
  const magic = sector.toString('latin1', GUEST_PARAM_MAGIC_OFFSET, GUEST_PARAM_MAGIC_OFFSET + 4);
  if (magic !== GUEST_PARAM_MAGIC) {
    throw new Error(`${path}: no ${GUEST_PARAM_MAGIC} parameter block at 0x${GUEST_PARAM_MAGIC_OFFSET.toString(16)}`);
  }
  sector.writeUInt32LE(params.fillMiB, GUEST_PARAM_OFFSET);
  sector.writeUInt32LE(params.hotMiB, GUEST_PARAM_OFFSET + 4);
  sector.writeUInt32LE(params.reportEvery, GUEST_PARAM_OFFSET + 8);
  return sector;
}

/** Write a 1 MiB raw disk image whose boot sector is boot.bin with params patched in. */
export async function writeGuestImage(path: string, params: GuestParams): Promise<void> {
  const sector = await buildBootSector(params);
  const image = Buffer.alloc(GUEST_IMAGE_SIZE);
  sector.copy(image, 0);
  await writeFile(path, image);
}

// ---- reading the guest over the monitor -------------------------------------

export interface GuestCounters {
  magic: number;
  bootId: number;
  passes: number;
}

export interface GuestStatus extends GuestCounters {
  /** GUEST_STATE_FILLING (1) or GUEST_STATE_RUNNING (2); anything else: not booted (yet). */
  state: number;
  params: GuestParams;
}

/** Minimal view of the QMP client: runs an HMP command via human-monitor-command. */
export interface HmpRunner {
  hmp(commandLine: string): Promise<string>;
}

/** Words of an HMP `xp /Nwx ADDR` reply, in address order. */
export function parseXpWords(output: string): number[] {
  const words: number[] = [];
  for (const line of output.split(/\r?\n/)) {
    const m = /^\s*[0-9a-fA-F]+:\s*(.*)$/.exec(line);
    if (!m) continue;
    for (const tok of m[1]!.trim().split(/\s+/)) {
      if (/^0x[0-9a-fA-F]+$/.test(tok)) words.push(parseInt(tok, 16) >>> 0);
    }
  }
  return words;
}

/** Read `count` u32 words of guest-physical memory at `addr` via HMP xp. */
export async function readGuestWords(m: HmpRunner, addr: number, count: number): Promise<number[]> {
  const out = await m.hmp(`xp /${count}wx 0x${addr.toString(16)}`);
  const words = parseXpWords(out);
  if (words.length !== count) {
    throw new Error(`unexpected xp output for ${count} words at 0x${addr.toString(16)}: ${JSON.stringify(out)}`);
  }
  return words;
}

export async function readGuestCounters(m: HmpRunner): Promise<GuestCounters> {
  const [magic, bootId, passes] = (await readGuestWords(m, GUEST_BASE_ADDR, 3)) as [number, number, number];
  return { magic, bootId, passes };
}

export async function readGuestStatus(m: HmpRunner): Promise<GuestStatus> {
  const w = (await readGuestWords(m, GUEST_BASE_ADDR, 7)) as [number, number, number, number, number, number, number];
  return {
    magic: w[0],
    bootId: w[1],
    passes: w[2],
    state: w[3],
    params: { fillMiB: w[4], hotMiB: w[5], reportEvery: w[6] },
  };
}

// ---- memory contents -----------------------------------------------------------

/** Fill-pattern dword the guest stores at guest-physical `addr` (4-aligned, in the filled region). */
export function guestPatternWord(addr: number): number {
  return (Math.imul(addr, PAT_MUL) ^ PAT_XOR) >>> 0;
}

/** Value pass `pass` writes at a hot-set address (page offsets 0, 1024, 2048, 3072). */
export function guestHotWord(addr: number, pass: number): number {
  return (guestPatternWord(addr) ^ Math.imul(pass, 4)) >>> 0;
}

/** The part of the filled region that never changes once the fill is done (above the hot set). */
export function guestStaticRegion(params: GuestParams): { addr: number; size: number } {
  return { addr: GUEST_FILL_BASE + params.hotMiB * MiB, size: (params.fillMiB - params.hotMiB) * MiB };
}

/** sha256 (hex) of what the guest's static region must contain: compare with ramDigest() of it. */
export function expectedRegionDigest(addr: number, size: number): string {
  if (addr % 4 !== 0 || size % 4 !== 0) throw new RangeError('addr and size must be multiples of 4');
  const hash = createHash('sha256');
  const chunk = Buffer.alloc(Math.min(size, MiB));
  for (let off = 0; off < size; off += chunk.length) {
    const len = Math.min(chunk.length, size - off);
    for (let i = 0; i < len; i += 4) chunk.writeUInt32LE(guestPatternWord(addr + off + i), i);
    hash.update(len === chunk.length ? chunk : chunk.subarray(0, len));
  }
  return hash.digest('hex');
}

/**
 * sha256 (hex) of `sizeBytes` of guest-physical RAM from `startAddr`, via QMP
 * `pmemsave` into a temp file in `tmpDir` (QEMU writes it, so it must be a
 * path the QEMU process can write on the same host). Pause the guest, or digest
 * only guestStaticRegion(), for the result to be comparable.
 */
export async function ramDigest(
  exec: (cmd: string, args: object) => Promise<unknown>,
  sizeBytes: number,
  tmpDir: string,
  startAddr = 0,
): Promise<string> {
  const filename = join(tmpDir, `kmgt-ram-${process.pid}-${randomBytes(6).toString('hex')}.bin`);
  try {
    await exec('pmemsave', { val: startAddr, size: sizeBytes, filename });
    const hash = createHash('sha256');
    let got = 0;
    for await (const buf of createReadStream(filename)) {
      hash.update(buf as Buffer);
      got += (buf as Buffer).length;
    }
    if (got !== sizeBytes) throw new Error(`pmemsave wrote ${got} bytes, expected ${sizeBytes}`);
    return hash.digest('hex');
  } finally {
    await rm(filename, { force: true });
  }
}

// ---- serial log ------------------------------------------------------------------

export interface SerialLog {
  /** Boot ids in order of appearance (lowercase hex); more than one = the guest rebooted. */
  boots: string[];
  /** Last pass number reported, or null if none. */
  lastPass: number | null;
  /** Every pass number reported, in order (monotonic unless it rebooted). */
  passes: number[];
}

export function parseSerialLog(text: string): SerialLog {
  const boots: string[] = [];
  const passes: number[] = [];
  // Only whole 8-digit numbers count: a line being written may be cut short.
  const re = /KMGT (boot|pass) ([0-9a-fA-F]{8})(?![0-9a-fA-F])/g;
  for (let m = re.exec(text); m; m = re.exec(text)) {
    if (m[1] === 'boot') boots.push(m[2]!.toLowerCase());
    else passes.push(parseInt(m[2]!, 16));
  }
  return { boots, lastPass: passes.length ? passes[passes.length - 1]! : null, passes };
}
