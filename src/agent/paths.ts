import { promises as fs } from 'node:fs';
import path from 'node:path';
import { DomainXmlError } from '../errors.js';
import type { FileRef } from '../domain/index.js';
import { ImageError, imageFileRefs } from '../qemu/image.js';

function isBelow(root: string, candidate: string): boolean {
  const rel = path.relative(root, candidate);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** realpath of the longest existing prefix, with the missing rest appended (a log file not yet created). */
async function resolveExisting(p: string): Promise<string> {
  const missing: string[] = [];
  let current = path.resolve(p);
  for (;;) {
    try {
      return path.join(await fs.realpath(current), ...missing.reverse());
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      const parent = path.dirname(current);
      if (parent === current) throw err;
      missing.push(path.basename(current));
      current = parent;
    }
  }
}

async function checkOne(roots: string[], p: string, describe: string, element: string, mustExist: boolean): Promise<string> {
  const resolved = await resolveExisting(p);
  if (!roots.some((root) => isBelow(root, resolved))) {
    throw new DomainXmlError('path_not_allowed', element, `${describe} ${p} (resolved ${resolved}) is not below any --allow-path root`);
  }
  if (mustExist) {
    try {
      await fs.access(resolved);
    } catch {
      throw new DomainXmlError('path_not_found', element, `${describe} ${p} does not exist`);
    }
  }
  return resolved;
}

/**
 * Every host path a guest touches must lie below an --allow-path root once symlinks and `..`
 * are resolved, so domain XML cannot make qemu read or write arbitrary host files. That includes
 * the files a qcow2 image names in its header (backing chain, external data file), which qemu
 * opens on its own.
 */
export async function checkAllowedPaths(refs: FileRef[], allowRoots: string[]): Promise<void> {
  const roots = await Promise.all(allowRoots.map((r) => resolveExisting(r)));
  for (const ref of refs) {
    if (!path.isAbsolute(ref.path)) {
      throw new DomainXmlError('path_not_absolute', ref.element, `${ref.kind} path must be absolute: ${ref.path}`);
    }
    const resolved = await checkOne(roots, ref.path, `${ref.kind} path`, ref.element, ref.mustExist);
    if (ref.format !== 'qcow2') continue;
    try {
      await imageFileRefs(resolved, 'qcow2', async (file) => {
        await checkOne(roots, file.path, `${file.role === 'backing' ? 'backing file' : 'data file'} of ${file.from}:`, ref.element, true);
      });
    } catch (err) {
      if (err instanceof ImageError) throw new DomainXmlError(err.code, ref.element, err.message);
      throw err;
    }
  }
}
