/**
 * How fast this host really runs a guest under each accelerator. /dev/kvm opening, and qemu
 * starting with accel=kvm, say nothing about speed: nested KVM without EPT takes every first
 * touch of a guest page as an exit to the host kernel, and a guest touching 64 MiB then needs a
 * minute where TCG needs a fraction of a second. So the project's own boot-sector guest touches
 * PROBE_FILL_MIB of RAM under each accelerator, timed on its serial port from its boot line to
 * its first pass line (the fill alone, not qemu's or SeaBIOS's start), within a hard bound.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { writeGuestImage } from '../guest/image.js';
import { probeQemu } from './host.js';
import type { QemuCredentials } from './process.js';
import type { Accel } from '../domain/index.js';

export const PROBE_FILL_MIB = 16;
/** The whole probe of one accelerator (qemu start, firmware, fill) ends within this. */
export const PROBE_BOUND_MS = 4000;
/** KVM is chosen when it touches PROBE_FILL_MIB within this; healthy KVM needs tens of ms. */
export const KVM_FAST_ENOUGH_MS = 1000;

export interface FillMeasurement {
  accel: Accel;
  fillMiB: number;
  /** From the guest's boot line to its first pass line; absent when the fill did not finish. */
  fillMs?: number;
  /** Why there is no figure: the bound ran out (and how far the guest got), or qemu's own error. */
  failure?: string;
}

export interface AccelChoice {
  accel: Accel;
  kvm?: FillMeasurement;
  tcg?: FillMeasurement;
  /** One line for a person: what was chosen, what was measured, why. */
  reason: string;
}

export interface MeasureOptions {
  fillMiB?: number;
  boundMs?: number;
  signal?: AbortSignal;
}

/** Time the test guest's fill under `accel`; the qemu it starts is ended before this returns. */
export async function measureFill(binary: string, accel: Accel, opts: MeasureOptions = {}): Promise<FillMeasurement> {
  const fillMiB = opts.fillMiB ?? PROBE_FILL_MIB;
  const boundMs = opts.boundMs ?? PROBE_BOUND_MS;
  if (opts.signal?.aborted) return { accel, fillMiB, failure: 'the probe was cancelled' };
  const dir = await mkdtemp(path.join(os.tmpdir(), 'kvm-migrate-probe-'));
  try {
    const image = path.join(dir, 'probe.img');
    await writeGuestImage(image, { fillMiB, hotMiB: 0, reportEvery: 1 });
    const argv = [
      '-machine', `pc,accel=${accel}`, '-m', String(fillMiB + 8), '-nodefaults', '-no-user-config', '-display', 'none',
      '-drive', `file=${image},format=raw,if=ide`, '-serial', 'stdio',
    ];
    return await timeFill(binary, argv, { accel, fillMiB, boundMs, signal: opts.signal });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

function timeFill(
  binary: string,
  argv: string[],
  o: { accel: Accel; fillMiB: number; boundMs: number; signal?: AbortSignal },
): Promise<FillMeasurement> {
  return new Promise((resolve) => {
    const started = performance.now();
    const child = spawn(binary, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    let serial = '';
    let stderr = '';
    let bootAt: number | undefined;
    let outcome: Omit<FillMeasurement, 'accel' | 'fillMiB'> | undefined;
    const finish = (result: Omit<FillMeasurement, 'accel' | 'fillMiB'>) => {
      if (outcome) return;
      outcome = result;
      clearTimeout(timer);
      o.signal?.removeEventListener('abort', onAbort);
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    };
    const onAbort = () => finish({ failure: 'the probe was cancelled' });
    const booted = () => (bootAt === undefined ? 'the guest had not even booted' : `booted after ${Math.round(bootAt - started)} ms`);
    const timer = setTimeout(() => finish({ failure: `did not touch ${o.fillMiB} MiB within ${o.boundMs} ms (${booted()})` }), o.boundMs);
    o.signal?.addEventListener('abort', onAbort, { once: true });
    if (o.signal?.aborted) onAbort();
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      serial += chunk;
      if (bootAt === undefined && /KMGT boot [0-9a-f]{8}/i.test(serial)) bootAt = performance.now();
      if (bootAt !== undefined && /KMGT pass [0-9a-f]{8}/i.test(serial)) finish({ fillMs: Math.max(1, Math.round(performance.now() - bootAt)) });
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      if (stderr.length < 4096) stderr += chunk;
    });
    const settle = () => resolve({ accel: o.accel, fillMiB: o.fillMiB, ...outcome! });
    // A qemu that never started has nothing left to end.
    child.on('error', (err) => {
      finish({ failure: `could not start ${binary}: ${err.message}` });
      if (child.pid === undefined) settle();
    });
    // Otherwise settled only once qemu is gone, so no probe qemu outlives the call.
    child.on('close', (code, signal) => {
      finish({ failure: `qemu exited before the fill was done (${signal ?? `exit code ${code}`}): ${lastLine(stderr)}` });
      settle();
    });
  });
}

function lastLine(text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l && !/warning: host doesn't support requested feature/.test(l));
  return lines[lines.length - 1] ?? 'no message';
}

/** The choice from the figures: KVM only when it is usable and fast enough. Pure, for tests. */
export function decideAccel(
  kvmUsable: boolean,
  kvm: FillMeasurement | undefined,
  tcg: FillMeasurement | undefined,
  fastEnoughMs = KVM_FAST_ENOUGH_MS,
): AccelChoice {
  const tcgPart = tcg ? (tcg.fillMs !== undefined ? `TCG in ${tcg.fillMs} ms` : `TCG ${tcg.failure}`) : '';
  const figures = (kvmPart: string) => [kvmPart, tcgPart].filter(Boolean).join(', ');
  if (!kvmUsable) return { accel: 'tcg', tcg, reason: `tcg: KVM is not usable here (/dev/kvm missing, not accessible, or refused by qemu)${tcgPart ? `; ${tcgPart}` : ''}` };
  const fill = kvm?.fillMs;
  const kvmPart = fill !== undefined ? `KVM touched ${kvm!.fillMiB} MiB in ${fill} ms` : `KVM ${kvm?.failure ?? 'was not measured'}`;
  if (fill !== undefined && fill <= fastEnoughMs) return { accel: 'kvm', kvm, tcg, reason: `kvm: ${figures(kvmPart)} (KVM is chosen at ${fastEnoughMs} ms or less)` };
  // A TCG that cannot run at all leaves slow KVM as the only accelerator.
  if (tcg && tcg.fillMs === undefined) return { accel: 'kvm', kvm, tcg, reason: `kvm, though slow: ${figures(kvmPart)}` };
  return { accel: 'tcg', kvm, tcg, reason: `tcg: ${figures(kvmPart)}; KVM is chosen at ${fastEnoughMs} ms or less (nested KVM without EPT is this slow)` };
}

/** Measure TCG, then KVM where it is usable, and choose. At most 2 x the bound. */
export async function chooseAccel(binary: string, kvmUsable: boolean, opts: MeasureOptions & { fastEnoughMs?: number } = {}): Promise<AccelChoice> {
  const tcg = await measureFill(binary, 'tcg', opts);
  const kvm = kvmUsable ? await measureFill(binary, 'kvm', opts) : undefined;
  return decideAccel(kvmUsable, kvm, tcg, opts.fastEnoughMs);
}

/**
 * chooseAccel for this host's qemu (found on PATH unless `binary` names one); KVM counts only
 * where qemu opens it as the user guests' qemu runs as (`credentials`).
 */
export async function chooseHostAccel(opts: MeasureOptions & { binary?: string; credentials?: QemuCredentials } = {}): Promise<AccelChoice> {
  const qemu = await probeQemu(opts.binary, opts.credentials);
  return chooseAccel(qemu.binary, qemu.kvmUsable, opts);
}
