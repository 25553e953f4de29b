import { promises as fs } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * The last change issued to each file, still under way: the next one on that file waits for it.
 * Two overlapping writes would otherwise race to their renames, and the older content could land
 * last (a job record going back a phase).
 */
const pending = new Map<string, Promise<void>>();

/** Runs `change` on `file` after every change issued on it before, in the order issued. */
function inOrder(file: string, change: () => Promise<void>): Promise<void> {
  const key = path.resolve(file);
  const previous = pending.get(key) ?? Promise.resolve();
  // A failed change fails its own caller; the next one runs all the same.
  const next = previous.catch(() => undefined).then(change);
  pending.set(key, next);
  const forget = () => {
    if (pending.get(key) === next) pending.delete(key);
  };
  next.then(forget, forget);
  return next;
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
  const handle = await fs.open(tmp, 'wx', 0o600);
  try {
    await handle.writeFile(data);
    await handle.sync();
  } finally {
    await handle.close();
  }
  try {
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true });
    throw err;
  }
  await syncDir(dir);
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
