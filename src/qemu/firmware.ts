/**
 * qemu's firmware descriptors (docs/interop/firmware.json): JSON files that say which firmware
 * images this host has, for which machines, with which features. Read where libvirt reads them;
 * a file in an earlier directory hides one of the same name in a later one, and the survivors go
 * in file-name order, which is their priority.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { FirmwareDescriptor } from '../domain/index.js';

export const FIRMWARE_DESCRIPTOR_DIRS = ['/etc/qemu/firmware', '/usr/share/qemu/firmware'];

export interface FirmwareScan {
  descriptors: FirmwareDescriptor[];
  /** Descriptors that could not be used, and why (a warning for the log, not a failure). */
  skipped: Array<{ file: string; reason: string }>;
}

export async function loadFirmwareDescriptors(dirs: string[] = FIRMWARE_DESCRIPTOR_DIRS): Promise<FirmwareScan> {
  const byName = new Map<string, string>();
  for (const dir of dirs) {
    const names = await fs.readdir(dir).catch(() => [] as string[]);
    for (const name of names) if (name.endsWith('.json') && !byName.has(name)) byName.set(name, path.join(dir, name));
  }
  const scan: FirmwareScan = { descriptors: [], skipped: [] };
  for (const name of [...byName.keys()].sort()) {
    const file = byName.get(name)!;
    try {
      const text = await fs.readFile(file, 'utf8');
      // An empty file masks a descriptor of the same name in a later directory (qemu's rule).
      if (text.trim() === '') continue;
      const d = descriptorOf(file, JSON.parse(text));
      if (d) scan.descriptors.push(d);
    } catch (err) {
      scan.skipped.push({ file, reason: (err as Error).message });
    }
  }
  return scan;
}

const strings = (v: unknown): string[] => (Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : []);
const record = (v: unknown): Record<string, unknown> => (v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, unknown>) : {});

/** The descriptor's x86_64 part; undefined for one of another architecture. Throws on a malformed one. */
export function descriptorOf(file: string, json: unknown): FirmwareDescriptor | undefined {
  const top = record(json);
  const targets = Array.isArray(top.targets) ? top.targets.map(record) : [];
  const machines = targets.filter((t) => t.architecture === 'x86_64').flatMap((t) => strings(t.machines));
  if (machines.length === 0) return undefined;
  const mapping = record(top.mapping);
  const device = mapping.device;
  const raw = (o: Record<string, unknown>, what: string): string => {
    if (typeof o.filename !== 'string' || !path.isAbsolute(o.filename)) throw new Error(`${what} has no absolute filename`);
    if (o.format !== undefined && o.format !== 'raw') throw new Error(`${what} is ${String(o.format)}, not raw`);
    return o.filename;
  };
  const base = { file, interfaceTypes: strings(top['interface-types']), machines, features: strings(top.features) };
  if (device === 'flash') {
    // "split" (code + variables) is the default mode; "combined" and "stateless" images have no separate store.
    if (mapping.mode !== undefined && mapping.mode !== 'split') throw new Error(`flash mode ${String(mapping.mode)} is not offered`);
    const template = mapping['nvram-template'] === undefined ? undefined : raw(record(mapping['nvram-template']), 'nvram-template');
    return { ...base, device, executable: raw(record(mapping.executable), 'executable'), ...(template ? { nvramTemplate: template } : {}) };
  }
  if (device === 'memory') return { ...base, device, executable: raw(mapping, 'mapping') };
  throw new Error(`mapping device ${String(device)} is not offered (flash or memory)`);
}

/** The directories of the firmware files the descriptors name: read-only firmware may come from there. */
export function firmwareDirs(descriptors: FirmwareDescriptor[]): string[] {
  return [...new Set(descriptors.flatMap((d) => [d.executable, ...(d.nvramTemplate ? [d.nvramTemplate] : [])]).map((f) => path.dirname(f)))];
}
