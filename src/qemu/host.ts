/** What this host's qemu offers: version, machine types, and whether KVM works. */
import fs from 'node:fs';
import path from 'node:path';
import { execa } from 'execa';
import type { FirmwareDescriptor } from '../domain/index.js';
import { loadFirmwareDescriptors, type FirmwareScan } from './firmware.js';
import type { QemuCredentials } from './process.js';

export interface QemuHostInfo {
  binary: string;
  /** e.g. "7.2.22" */
  version: string;
  /** Alias machine types to the concrete versioned type, e.g. { pc: 'pc-i440fx-7.2', q35: 'pc-q35-7.2' }. */
  machineAliases: Record<string, string>;
  /** Every name `-machine help` lists, aliases included. */
  knownMachines: string[];
  /** /dev/kvm opens read-write AND this qemu actually initialises KVM (nested setups may refuse). */
  kvmUsable: boolean;
  /** qemu's firmware descriptors, in priority order (UEFI images for `<os firmware='efi'>`). */
  firmwares: FirmwareDescriptor[];
  /** Descriptors that could not be read, and why. */
  firmwaresSkipped: FirmwareScan['skipped'];
  /** swtpm and swtpm_setup are on PATH: a guest may have an emulated `<tpm>`. */
  swtpm: boolean;
}

const DEFAULT_BINARY = 'qemu-system-x86_64';
const PROBE_TIMEOUT_MS = 15_000;

export async function probeQemu(binary?: string, credentials?: QemuCredentials): Promise<QemuHostInfo> {
  const bin = binary ?? findOnPath(DEFAULT_BINARY);
  if (!bin) throw new Error(`${DEFAULT_BINARY} not found on PATH`);

  const { stdout: versionText } = await execa(bin, ['--version'], { timeout: PROBE_TIMEOUT_MS });
  const version = /version (\d+\.\d+\.\d+)/.exec(versionText)?.[1];
  if (!version) throw new Error(`cannot read the qemu version from '${bin} --version': ${versionText.split('\n')[0]}`);

  const { stdout: machineText } = await execa(bin, ['-machine', 'help'], { timeout: PROBE_TIMEOUT_MS });
  const machineAliases: Record<string, string> = {};
  const knownMachines: string[] = [];
  for (const line of machineText.split('\n').slice(1)) {
    const name = /^(\S+)\s/.exec(line)?.[1];
    if (!name) continue;
    knownMachines.push(name);
    const target = /\(alias of ([^)\s]+)\)/.exec(line)?.[1];
    if (target) machineAliases[name] = target;
  }

  const scan = await loadFirmwareDescriptors();
  return {
    binary: bin, version, machineAliases, knownMachines,
    kvmUsable: kvmUsable() && (await qemuStartsWithKvm(bin, credentials)),
    firmwares: scan.descriptors,
    firmwaresSkipped: scan.skipped,
    swtpm: findOnPath('swtpm') !== undefined && findOnPath('swtpm_setup') !== undefined,
  };
}

/** /dev/kvm exists and this process may open it read-write. */
export function kvmUsable(): boolean {
  try {
    fs.closeSync(fs.openSync('/dev/kvm', fs.constants.O_RDWR));
    return true;
  } catch {
    return false;
  }
}

export function resolveAccel(mode: 'auto' | 'kvm' | 'tcg', kvmOk: boolean): 'kvm' | 'tcg' {
  if (mode === 'tcg') return 'tcg';
  if (kvmOk) return 'kvm';
  if (mode === 'auto') return 'tcg';
  throw new Error('accelerator kvm was requested, but KVM is not usable on this host (/dev/kvm missing, not accessible, or refused by qemu); use --accel tcg or auto');
}

/**
 * Opening /dev/kvm can succeed where creating a VM fails; ask qemu itself, with an empty
 * machine, as the user guests' qemu runs as (root may open a /dev/kvm that user may not).
 */
async function qemuStartsWithKvm(bin: string, credentials: QemuCredentials | undefined): Promise<boolean> {
  const r = await execa(bin, ['-machine', 'none,accel=kvm', '-nodefaults', '-no-user-config', '-display', 'none', '-qmp', 'stdio'], {
    input: '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
    timeout: PROBE_TIMEOUT_MS,
    reject: false,
    ...credentials,
  });
  return r.exitCode === 0;
}

function findOnPath(name: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, name);
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (fs.statSync(candidate).isFile()) return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}
