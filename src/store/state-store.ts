import { promises as fs } from 'node:fs';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { writeFileAtomic, removeDurably } from './atomic.js';
import type { QemuProcessRecord } from '../qemu/process.js';
import type { SwtpmRecord } from '../qemu/swtpm.js';

/** The directories below --state-dir, each the agent's alone. */
const STATE_KINDS = ['domains', 'runtime', 'jobs', 'taps', 'run', 'logs', 'quarantine', 'tls', 'nvram', 'tpm'] as const;
type StateKind = (typeof STATE_KINDS)[number];

/** A file found unreadable at load: set aside under quarantine/ and reported, never fatal. */
export interface QuarantinedFile {
  file: string;
  movedTo: string;
  reason: string;
}

/**
 * The agent's durable state below --state-dir:
 *   host.json             the host's persisted identity
 *   domains/<name>.xml    definitions (normalized XML)
 *   runtime/<name>.json   what is needed to find a running qemu again (pid, start time, socket)
 *   jobs/<id>.json        migration job records
 *   taps/<name>.json      the taps the agent made for a domain's qemu, until it deleted them
 *   run/                  QMP sockets and pidfiles
 *   logs/                 qemu logs
 *   quarantine/           corrupt files set aside at load
 *   tls/                  qemu's stream credentials, written at start when the agent runs with TLS
 *   nvram/<uuid>.fd       the UEFI variable store of each domain whose <nvram> names no file
 *   tpm/<uuid>/           a domain's TPM state (swtpm's), from its first start until it is undefined or leaves
 *   agent.lock            the flock that makes one agent per directory
 */
/** The records a job registry keeps: StateStore on disk, or the fast tier's in memory. */
export type RecordStore = Pick<StateStore, 'saveRecord' | 'removeRecord' | 'loadRecords'>;

export class StateStore {
  readonly root: string;
  readonly quarantined: QuarantinedFile[] = [];

  constructor(root: string) {
    this.root = root;
  }

  dir(kind: StateKind): string {
    return path.join(this.root, kind);
  }

  /** What belongs to the agent alone: no guest's file may lie here, whatever --allow-path says. */
  internalPaths(): string[] {
    return [
      ...STATE_KINDS.map((kind) => this.dir(kind)),
      path.join(this.root, 'host.json'),
      path.join(this.root, 'agent.lock'),
    ];
  }

  async init(): Promise<void> {
    for (const kind of STATE_KINDS) {
      await fs.mkdir(this.dir(kind), { recursive: true, mode: 0o700 });
    }
    // Temp files of a write interrupted by a crash are garbage by construction.
    for (const kind of ['domains', 'runtime', 'jobs', 'taps'] as const) {
      for (const entry of await fs.readdir(this.dir(kind))) {
        if (entry.startsWith('.') && entry.endsWith('.tmp')) await fs.rm(path.join(this.dir(kind), entry), { force: true });
      }
    }
  }

  async hostIdentity(): Promise<{ uuid: string }> {
    const file = path.join(this.root, 'host.json');
    const loaded = await this.readJson<{ uuid: string }>(file, (v) => isObject(v) && typeof v.uuid === 'string');
    if (loaded) return loaded;
    const identity = { uuid: randomUUID() };
    await writeFileAtomic(file, JSON.stringify(identity, null, 2) + '\n');
    return identity;
  }

  // --- definitions ---
  async saveDefinition(name: string, xml: string): Promise<void> {
    await writeFileAtomic(path.join(this.dir('domains'), `${name}.xml`), xml);
  }
  async removeDefinition(name: string): Promise<void> {
    await removeDurably(path.join(this.dir('domains'), `${name}.xml`));
  }
  async loadDefinitions(): Promise<Array<{ name: string; xml: string; file: string }>> {
    const out: Array<{ name: string; xml: string; file: string }> = [];
    for (const entry of (await fs.readdir(this.dir('domains'))).sort()) {
      // Not "skip hidden files": a name may start with a dot (libvirt allows it). Temp files end in .tmp.
      if (!entry.endsWith('.xml')) continue;
      const file = path.join(this.dir('domains'), entry);
      out.push({ name: entry.slice(0, -4), xml: await fs.readFile(file, 'utf8'), file });
    }
    return out;
  }

  // --- runtime records and jobs: JSON documents keyed by a file-safe id ---
  async saveRecord(kind: 'runtime' | 'jobs' | 'taps', id: string, value: unknown): Promise<void> {
    await writeFileAtomic(path.join(this.dir(kind), `${id}.json`), JSON.stringify(value, null, 2) + '\n');
  }
  async removeRecord(kind: 'runtime' | 'jobs' | 'taps', id: string): Promise<void> {
    await removeDurably(path.join(this.dir(kind), `${id}.json`));
  }
  /** One record, or null when there is none (or it was set aside as unreadable). */
  loadRecord<T>(kind: 'runtime' | 'jobs' | 'taps', id: string, valid: (v: unknown) => boolean): Promise<T | null> {
    return this.readJson<T>(path.join(this.dir(kind), `${id}.json`), valid);
  }
  async loadRecords<T>(kind: 'runtime' | 'jobs' | 'taps', valid: (v: unknown) => boolean): Promise<Array<{ id: string; value: T }>> {
    const out: Array<{ id: string; value: T }> = [];
    for (const entry of (await fs.readdir(this.dir(kind))).sort()) {
      if (!entry.endsWith('.json')) continue;
      const value = await this.readJson<T>(path.join(this.dir(kind), entry), valid);
      if (value) out.push({ id: entry.slice(0, -5), value });
    }
    return out;
  }

  /** Set a file aside (e.g. a definition that no longer parses) so the agent can go on. */
  async quarantine(file: string, reason: string): Promise<void> {
    const movedTo = path.join(this.dir('quarantine'), `${path.basename(file)}.${Date.now()}`);
    await fs.rename(file, movedTo);
    this.quarantined.push({ file, movedTo, reason });
  }

  private async readJson<T>(file: string, valid: (v: unknown) => boolean): Promise<T | null> {
    let text: string;
    try {
      text = await fs.readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw err;
    }
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (err) {
      await this.quarantine(file, `not valid JSON: ${(err as Error).message}`);
      return null;
    }
    if (!valid(value)) {
      await this.quarantine(file, 'JSON does not have the expected shape');
      return null;
    }
    return value as T;
  }
}

/**
 * The qemu process records below a state directory, read without an agent (and without
 * quarantining anything): what a tool that started agents ends by pid when they are gone.
 */
export async function readQemuRecords(stateDir: string): Promise<QemuProcessRecord[]> {
  return (await readRuntimeRecords(stateDir)).flatMap((rec) => (rec.process && typeof rec.process.pid === 'number' ? [rec.process] : []));
}

/** The same for the swtpm processes of guests with a TPM. */
export async function readSwtpmRecords(stateDir: string): Promise<SwtpmRecord[]> {
  return (await readRuntimeRecords(stateDir)).flatMap((rec) => (rec.swtpm && typeof rec.swtpm.pid === 'number' ? [rec.swtpm] : []));
}

async function readRuntimeRecords(stateDir: string): Promise<Array<{ process?: QemuProcessRecord; swtpm?: SwtpmRecord }>> {
  const dir = path.join(stateDir, 'runtime');
  const out: Array<{ process?: QemuProcessRecord; swtpm?: SwtpmRecord }> = [];
  for (const f of await fs.readdir(dir).catch(() => [] as string[])) {
    if (!f.endsWith('.json')) continue;
    try {
      out.push(JSON.parse(await fs.readFile(path.join(dir, f), 'utf8')) as { process?: QemuProcessRecord; swtpm?: SwtpmRecord });
    } catch {
      // a record being rewritten, or not one
    }
  }
  return out;
}

export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
