import { promises as fs } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * Changes applied per key in the order issued: each waits for the last one issued on its key.
 * Two overlapping writes would otherwise race (to their renames, or to one record's slots), and
 * the older content could land last (a job record going back a phase).
 */
export class ChangeQueue {
  private readonly pending = new Map<string, Promise<void>>();

  /** Runs `change` after every change issued on `key` before. */
  run(key: string, change: () => Promise<void>): Promise<void> {
    const previous = this.pending.get(key) ?? Promise.resolve();
    // A failed change fails its own caller; the next one runs all the same.
    const next = previous.catch(() => undefined).then(change);
    this.pending.set(key, next);
    const forget = () => {
      if (this.pending.get(key) === next) this.pending.delete(key);
    };
    next.then(forget, forget);
    return next;
  }

  /** Settles once every change issued so far has. */
  async idle(): Promise<void> {
    await Promise.allSettled([...this.pending.values()]);
  }
}

/** The files' changes, keyed by absolute path. */
const fileChanges = new ChangeQueue();

function inOrder(file: string, change: () => Promise<void>): Promise<void> {
  return fileChanges.run(path.resolve(file), change);
}

/**
 * Replace `file` with `data` so that a crash at any instant leaves either the old or the new
 * content, never a mix: write a temp file beside it, fsync it, rename over, fsync the directory.
 * Changes to one file are applied in the order issued, so the last one issued is what stays.
 */
export function writeFileAtomic(file: string, data: string | Buffer): Promise<void> {
  return inOrder(file, () => replaceFile(file, data));
}

async function replaceFile(file: string, data: string | Buffer): Promise<void> {
  const dir = path.dirname(file);
  const tmp = path.join(dir, `.${path.basename(file)}.${randomBytes(6).toString('hex')}.tmp`);
  await writeNewFileSynced(tmp, data);
  try {
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await syncDir(dir);
}

/** Create `file` (it must not exist) with `data`, and fsync it; its directory entry is the caller's to flush. */
export async function writeNewFileSynced(file: string, data: string | Buffer): Promise<void> {
  const handle = await fs.open(file, 'wx', 0o600);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export async function syncDir(dir: string): Promise<void> {
  const handle = await fs.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export function removeDurably(file: string): Promise<void> {
  return inOrder(file, async () => {
    await fs.rm(file, { force: true });
    await syncDir(path.dirname(file));
  });
}
