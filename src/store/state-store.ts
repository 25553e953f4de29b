import { promises as fs } from 'node:fs';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { writeFileAtomic, removeDurably } from './atomic.js';
import { RecordPool, readPoolDir } from './record-pool.js';
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
 *   runtime/              what is needed to find a running qemu again (pid, start time, socket), by domain
 *   jobs/                 migration job records, by job id
 *   taps/                 the taps the agent made for a domain's qemu, until it deleted them
 *                         (these three: record pools, see record-pool.ts; `<id>.json` of older agents is read too)
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

type RecordKind = 'runtime' | 'jobs' | 'taps';
const RECORD_KINDS: readonly RecordKind[] = ['runtime', 'jobs', 'taps'];

export class StateStore {
  readonly root: string;
  readonly quarantined: QuarantinedFile[] = [];
  private readonly pools = new Map<RecordKind, RecordPool>();

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
    for (const kind of RECORD_KINDS) {
      const pool = new RecordPool(this.dir(kind));
      for (const { file, reason } of await pool.load()) await this.quarantine(file, reason);
      this.pools.set(kind, pool);
    }
  }

  /** Finish the record writes under way and close the record files. */
  async close(): Promise<void> {
    await Promise.all([...this.pools.values()].map((pool) => pool.close()));
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

  // --- runtime records, jobs and taps: JSON values keyed by id, each write one flush ---
  saveRecord(kind: RecordKind, id: string, value: unknown): Promise<void> {
    return this.pool(kind).save(id, value);
  }
  removeRecord(kind: RecordKind, id: string): Promise<void> {
    return this.pool(kind).remove(id);
  }
  /** One record, or null when there is none (or it was set aside as not of the expected shape). */
  async loadRecord<T>(kind: RecordKind, id: string, valid: (v: unknown) => boolean): Promise<T | null> {
    return (await this.checked<T>(kind, id, valid)) ?? null;
  }
  /** Every record of `kind`; one not of the expected shape is set aside (quarantine) instead. */
  async loadRecords<T>(kind: RecordKind, valid: (v: unknown) => boolean): Promise<Array<{ id: string; value: T }>> {
    const out: Array<{ id: string; value: T }> = [];
    for (const id of this.pool(kind).ids()) {
      const value = await this.checked<T>(kind, id, valid);
      if (value !== undefined) out.push({ id, value });
    }
    return out;
  }

  private async checked<T>(kind: RecordKind, id: string, valid: (v: unknown) => boolean): Promise<T | undefined> {
    const pool = this.pool(kind);
    const value = pool.get(id);
    if (value === undefined || valid(value)) return value as T | undefined;
    const file = pool.fileOf(id)!;
    pool.forget(id);
    await this.quarantine(file, 'the record does not have the expected shape');
    return undefined;
  }

  private pool(kind: RecordKind): RecordPool {
    const pool = this.pools.get(kind);
    if (!pool) throw new Error(`state store: ${kind} records used before init()`);
    return pool;
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
  return (await readPoolDir(path.join(stateDir, 'runtime'))).flatMap(({ value }) => (isObject(value) ? [value as { process?: QemuProcessRecord; swtpm?: SwtpmRecord }] : []));
}

/** The records of one kind below a state directory, read without an agent: for tools and tests. */
export async function readRecords(stateDir: string, kind: RecordKind): Promise<Array<{ id: string; value: unknown }>> {
  return readPoolDir(path.join(stateDir, kind));
}

export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
