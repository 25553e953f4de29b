import { promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { ChangeQueue, removeDurably, syncDir, writeNewFileSynced } from './atomic.js';

/**
 * The records of one kind (jobs, runtime, taps), each rewritten with a single flush.
 *
 * A record lives in a file of two equal slots; a save writes the slot that does not hold the
 * newest valid copy and fdatasyncs it. The file already has its full size, so the flush carries
 * data blocks only: no rename, no directory flush, no journal commit for a size change. A crash
 * at any instant leaves the other slot whole, and a torn slot fails its checksum, so a load finds
 * either the old content or the new, never a mix (as the temp-file-and-rename it replaces did,
 * with one flush instead of two and two event-loop hops instead of eight).
 *
 * Files are named at random, not by record: a new record takes a free file (a spare, or one
 * whose record was removed), so creating one is a single flush too; removing one writes a free
 * slot. Spares are made in the background. A record that outgrows its slots moves to a file with
 * bigger ones; its version tells which copy is newer if a crash leaves both.
 *
 * Slot layout: magic 'KMR1', payload length (u32), sequence (u64), CRC-32 of the length,
 * sequence and payload, 4 reserved bytes; then the payload, JSON:
 * `{"id", "version", "record"}` or `{"free": true}`.
 */
const MAGIC = 0x31524d4b;
const HEADER_BYTES = 24;
const MIN_SLOT_BYTES = 16 * 1024;
export const RECORD_FILE_SUFFIX = '.rec';
/** Free files kept ready so that a new record does not wait for a file to be made. */
const SPARES_WANTED = 2;
/** Free files beyond these are deleted. */
const SPARES_KEPT = 8;
/** Open handles kept between writes; the rest are opened per write. */
const HANDLES_KEPT = 32;
/** After a spare is taken: waiting this long keeps making one out of the writes that follow. */
const REFILL_DELAY_MS = 500;

type Payload = { id: string; version: number; record: unknown } | { free: true };

interface SlotCopy {
  index: 0 | 1;
  seq: bigint;
  payload: Payload;
}

/** What one record file holds, read from its bytes. */
export type RecordFileContent =
  /** A record (`newest`), or a free file when its newest slot says free. */
  | { kind: 'valid'; slotBytes: number; newest: SlotCopy }
  /** Never written (a spare, or one whose making was cut short): all zeros. */
  | { kind: 'blank'; slotBytes: number }
  /** Neither slot is whole and the file is not blank: set it aside. */
  | { kind: 'damaged'; reason: string };

export function parseRecordFile(bytes: Buffer): RecordFileContent {
  const slotBytes = bytes.length / 2;
  if (!Number.isInteger(slotBytes) || slotBytes < MIN_SLOT_BYTES) {
    return bytes.every((b) => b === 0) ? { kind: 'blank', slotBytes: 0 } : { kind: 'damaged', reason: `size ${bytes.length} is not two slots` };
  }
  const copies = ([0, 1] as const).flatMap((index) => {
    const copy = readSlot(bytes.subarray(index * slotBytes, (index + 1) * slotBytes), index);
    return copy ? [copy] : [];
  });
  if (copies.length === 0) {
    return bytes.every((b) => b === 0) ? { kind: 'blank', slotBytes } : { kind: 'damaged', reason: 'neither slot is whole' };
  }
  const newest = copies.reduce((a, b) => (b.seq > a.seq ? b : a));
  return { kind: 'valid', slotBytes, newest };
}

function readSlot(slot: Buffer, index: 0 | 1): SlotCopy | null {
  if (slot.readUInt32LE(0) !== MAGIC) return null;
  const length = slot.readUInt32LE(4);
  if (length > slot.length - HEADER_BYTES) return null;
  const payloadBytes = slot.subarray(HEADER_BYTES, HEADER_BYTES + length);
  if (crc32(payloadBytes, crc32(slot.subarray(4, 16))) !== slot.readUInt32LE(16)) return null;
  try {
    return { index, seq: slot.readBigUInt64LE(8), payload: JSON.parse(payloadBytes.toString('utf8')) as Payload };
  } catch {
    return null;
  }
}

function slotBytesOf(payload: Buffer, seq: bigint): Buffer {
  const out = Buffer.alloc(HEADER_BYTES + payload.length);
  out.writeUInt32LE(MAGIC, 0);
  out.writeUInt32LE(payload.length, 4);
  out.writeBigUInt64LE(seq, 8);
  payload.copy(out, HEADER_BYTES);
  out.writeUInt32LE(crc32(payload, crc32(out.subarray(4, 16))), 16);
  return out;
}

/** Slots big enough for `payloadLength` with room to grow: a power of two. */
function slotSizeFor(payloadLength: number): number {
  let size = MIN_SLOT_BYTES;
  while (size < 2 * (HEADER_BYTES + payloadLength)) size *= 2;
  return size;
}

/** A file in the pool and its slot holding the newest copy (`seq`, -1n when blank). */
interface PoolFile {
  file: string;
  slotBytes: number;
  newestIndex: 0 | 1;
  seq: bigint;
}

/** A record in the pool: its file, its version (which copy wins if two files hold it) and its value as JSON. */
interface Placed extends PoolFile {
  version: number;
  text: string;
}

/** A record an older agent wrote as `<id>.json` (temp file and rename): moved into the pool at its next save. */
interface Legacy {
  legacyFile: string;
  version: 0;
  text: string;
}

/** A file that cannot be read, for the caller to set aside. */
export interface DamagedFile {
  file: string;
  reason: string;
}

/** What a pool directory holds, read without changing anything. */
interface PoolDirContent {
  /** Each record's newest copy: in the pool, else an older agent's `<id>.json`. */
  records: Map<string, Placed | Legacy>;
  /** Older copies of a record (a crash while it moved to bigger slots): free to reuse. */
  superseded: PoolFile[];
  spares: PoolFile[];
  /** Blank files too short to be two slots (a crash while making one). */
  cutShort: string[];
  /** `<id>.json` files whose record is in the pool already (a crash before they were removed). */
  movedLegacy: string[];
  damaged: DamagedFile[];
}

/** A file's bytes, or null when it is gone (removed since the directory was listed: a reader beside a live agent). */
async function readIfPresent(file: string): Promise<Buffer | null> {
  try {
    return await fs.readFile(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

async function scanPoolDir(dir: string): Promise<PoolDirContent> {
  const content: PoolDirContent = { records: new Map(), superseded: [], spares: [], cutShort: [], movedLegacy: [], damaged: [] };
  const entries = (await fs.readdir(dir)).sort();
  for (const entry of entries.filter((e) => e.endsWith(RECORD_FILE_SUFFIX))) {
    const file = path.join(dir, entry);
    const bytes = await readIfPresent(file);
    if (!bytes) continue;
    const read = parseRecordFile(bytes);
    if (read.kind === 'damaged') {
      content.damaged.push({ file, reason: read.reason });
    } else if (read.kind === 'blank') {
      if (read.slotBytes >= MIN_SLOT_BYTES) content.spares.push({ file, slotBytes: read.slotBytes, newestIndex: 1, seq: -1n });
      else content.cutShort.push(file);
    } else {
      const at: PoolFile = { file, slotBytes: read.slotBytes, newestIndex: read.newest.index, seq: read.newest.seq };
      const { payload } = read.newest;
      if ('free' in payload) {
        content.spares.push(at);
        continue;
      }
      // Only pool records are in the map yet: legacy ones come after.
      const other = content.records.get(payload.id) as Placed | undefined;
      if (other && other.version >= payload.version) {
        content.superseded.push(at);
        continue;
      }
      if (other) content.superseded.push(other);
      content.records.set(payload.id, { ...at, version: payload.version, text: JSON.stringify(payload.record) });
    }
  }
  for (const entry of entries.filter((e) => e.endsWith('.json'))) {
    const id = entry.slice(0, -'.json'.length);
    const legacyFile = path.join(dir, entry);
    if (content.records.has(id)) {
      content.movedLegacy.push(legacyFile);
      continue;
    }
    const text = (await readIfPresent(legacyFile))?.toString('utf8');
    if (text === undefined) continue;
    try {
      JSON.parse(text);
    } catch (err) {
      content.damaged.push({ file: legacyFile, reason: `not valid JSON: ${(err as Error).message}` });
      continue;
    }
    content.records.set(id, { legacyFile, version: 0, text });
  }
  return content;
}

export class RecordPool {
  readonly dir: string;
  /** Each record's place and its value as last saved: what `get` answers without reading the disk. */
  private readonly placed = new Map<string, Placed | Legacy>();
  private readonly spares: PoolFile[] = [];
  /** Per record id: the last change issued stays. */
  private readonly changes = new ChangeQueue();
  private readonly handles = new Map<string, { handle: Promise<FileHandle>; busy: number }>();
  private refillTimer: NodeJS.Timeout | undefined;
  private refilling: Promise<void> | undefined;
  private closed = false;

  constructor(dir: string) {
    this.dir = dir;
  }

  /**
   * Index the directory (pool files and legacy `<id>.json` files), tidy what a crash left, and
   * return the files that cannot be read, for the caller to set aside.
   */
  async load(): Promise<DamagedFile[]> {
    const content = await scanPoolDir(this.dir);
    for (const [id, at] of content.records) this.placed.set(id, at);
    this.spares.push(...content.spares);
    for (const at of content.superseded) await this.free(at);
    for (const file of content.cutShort) await fs.rm(file, { force: true });
    for (const file of content.movedLegacy) await removeDurably(file);
    this.scheduleRefill();
    return content.damaged;
  }

  /** The record's value as last saved (a copy), or undefined. */
  get(id: string): unknown {
    const text = this.placed.get(id)?.text;
    return text === undefined ? undefined : JSON.parse(text);
  }

  ids(): string[] {
    return [...this.placed.keys()].sort();
  }

  /** The file holding record `id`: what to set aside when its value is not what the caller expects. */
  fileOf(id: string): string | undefined {
    const at = this.placed.get(id);
    return at && ('legacyFile' in at ? at.legacyFile : at.file);
  }

  /** Forget record `id`, whose file the caller moved away. */
  forget(id: string): void {
    const file = this.fileOf(id);
    this.placed.delete(id);
    if (file) void this.closeHandle(file);
  }

  /** Write `value` as record `id`, durably, after every change issued on `id` before. */
  save(id: string, value: unknown): Promise<void> {
    return this.changes.run(id, () => this.write(id, value));
  }

  /** Remove record `id` durably (a no-op when there is none). */
  remove(id: string): Promise<void> {
    return this.changes.run(id, async () => {
      const at = this.placed.get(id);
      if (!at) return;
      this.placed.delete(id);
      if ('legacyFile' in at) await removeDurably(at.legacyFile);
      else await this.free(at);
    });
  }

  /** Wait for the changes under way, stop making spares and close the files. */
  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.refillTimer);
    await Promise.allSettled([this.changes.idle(), this.refilling]);
    const handles = [...this.handles.values()];
    this.handles.clear();
    await Promise.allSettled(handles.map(async (h) => (await h.handle).close()));
  }

  private async write(id: string, value: unknown): Promise<void> {
    const at = this.placed.get(id);
    const version = (at?.version ?? 0) + 1;
    const text = JSON.stringify(value);
    const payload = Buffer.from(`{"id":${JSON.stringify(id)},"version":${version},"record":${text}}`);
    if (at && !('legacyFile' in at) && HEADER_BYTES + payload.length <= at.slotBytes) {
      this.placed.set(id, { ...(await this.writeSlot(at, payload)), version, text });
      return;
    }
    const target = this.takeSpare(payload.length);
    const written = target ? await this.writeSlot(target, payload) : await this.makeFile(payload);
    this.placed.set(id, { ...written, version, text });
    // The record is whole in its new file before its old one lets go of it.
    if (at && 'legacyFile' in at) await removeDurably(at.legacyFile);
    else if (at) await this.free(at);
  }

  /** Write `payload` into the slot of `at` that does not hold its newest copy, and flush it. */
  private async writeSlot<F extends PoolFile>(at: F, payload: Buffer): Promise<F> {
    const index = at.newestIndex === 0 ? 1 : 0;
    const seq = at.seq + 1n;
    const bytes = slotBytesOf(payload, seq);
    await this.withHandle(at.file, async (handle) => {
      await handle.write(bytes, 0, bytes.length, index * at.slotBytes);
      await handle.datasync();
    });
    return { ...at, newestIndex: index, seq };
  }

  /** Mark `at` free (one flush) and keep it as a spare, or delete it when there are enough. */
  private async free(at: PoolFile): Promise<void> {
    const { file, slotBytes, newestIndex, seq } = await this.writeSlot(at, Buffer.from(JSON.stringify({ free: true })));
    if (this.spares.length < SPARES_KEPT) {
      this.spares.push({ file, slotBytes, newestIndex, seq });
      return;
    }
    // Free on disk already: should the unlink be lost, the file comes back as a spare.
    await this.closeHandle(at.file);
    await fs.rm(at.file, { force: true });
  }

  private takeSpare(payloadLength: number): PoolFile | undefined {
    const index = this.spares.findIndex((s) => HEADER_BYTES + payloadLength <= s.slotBytes);
    if (index < 0) return undefined;
    const [spare] = this.spares.splice(index, 1);
    this.scheduleRefill();
    return spare;
  }

  /** Make a file for a record with nowhere to go: the payload is in its first slot from the start. */
  private async makeFile(payload: Buffer): Promise<PoolFile> {
    const slotBytes = slotSizeFor(payload.length);
    const file = await this.createFile(slotBytes, slotBytesOf(payload, 0n));
    return { file, slotBytes, newestIndex: 0, seq: 0n };
  }

  /** A new file of two slots, `first` in slot 0, flushed with its directory entry. */
  private async createFile(slotBytes: number, first?: Buffer): Promise<string> {
    const file = path.join(this.dir, `${randomBytes(8).toString('hex')}${RECORD_FILE_SUFFIX}`);
    const bytes = Buffer.alloc(2 * slotBytes);
    first?.copy(bytes, 0);
    await writeNewFileSynced(file, bytes);
    await syncDir(this.dir);
    return file;
  }

  private scheduleRefill(): void {
    if (this.closed || this.refillTimer || this.spares.length >= SPARES_WANTED) return;
    this.refillTimer = setTimeout(() => {
      this.refillTimer = undefined;
      this.refilling = this.refill().finally(() => {
        this.refilling = undefined;
      });
    }, REFILL_DELAY_MS);
    this.refillTimer.unref();
  }

  private async refill(): Promise<void> {
    while (!this.closed && this.spares.length < SPARES_WANTED) {
      try {
        this.spares.push({ file: await this.createFile(MIN_SLOT_BYTES), slotBytes: MIN_SLOT_BYTES, newestIndex: 1, seq: -1n });
      } catch {
        // A spare only saves time: a save with none makes its own file, and reports what fails then.
        return;
      }
    }
  }

  private async withHandle<T>(file: string, use: (handle: FileHandle) => Promise<T>): Promise<T> {
    let entry = this.handles.get(file);
    if (entry) {
      // Most recently used last: eviction takes from the front.
      this.handles.delete(file);
    } else {
      const handle = fs.open(file, 'r+');
      entry = { handle, busy: 0 };
      handle.catch(() => this.handles.get(file) === entry && this.handles.delete(file));
    }
    this.handles.set(file, entry);
    entry.busy++;
    try {
      return await use(await entry.handle);
    } finally {
      entry.busy--;
      await this.evictHandles();
    }
  }

  private async evictHandles(): Promise<void> {
    for (const [file, entry] of this.handles) {
      if (this.handles.size <= HANDLES_KEPT) return;
      if (entry.busy > 0) continue;
      this.handles.delete(file);
      await (await entry.handle).close().catch(() => undefined);
    }
  }

  private async closeHandle(file: string): Promise<void> {
    const entry = this.handles.get(file);
    if (!entry || entry.busy > 0) return;
    this.handles.delete(file);
    await (await entry.handle).close().catch(() => undefined);
  }
}

/** The records of a pool directory, read without a pool (and without changing anything). */
export async function readPoolDir(dir: string): Promise<Array<{ id: string; value: unknown }>> {
  const { records } = await scanPoolDir(dir).catch(() => ({ records: new Map<string, Placed | Legacy>() }));
  return [...records].map(([id, { text }]) => ({ id, value: JSON.parse(text) }));
}
