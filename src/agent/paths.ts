import fsSync, { promises as fs } from 'node:fs';
import path from 'node:path';
import { DomainXmlError } from '../errors.js';
import type { FileRef } from '../domain/index.js';
import { ImageError, imageFileRefs, qcow2NamesOtherFiles } from '../qemu/image.js';

function isBelow(root: string, candidate: string): boolean {
  const rel = path.relative(root, candidate);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/**
 * realpath of the longest existing prefix, with the missing rest appended (a log file not yet
 * created). A missing component that is a symlink (dangling) is refused: qemu would follow it
 * and create its target wherever it points.
 */
async function resolveExisting(p: string, element: string): Promise<string> {
  const missing: string[] = [];
  // Not path.resolve: it folds `..` as text, where the kernel first follows a symlink before it.
  let current = path.isAbsolute(p) ? p : path.resolve(p);
  for (;;) {
    try {
      return path.join(await fs.realpath(current), ...missing.reverse());
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT') {
        throw new DomainXmlError('path_unresolvable', element, `${p} cannot be resolved (${code ?? (err as Error).message}): give an existing directory, without symlink loops`);
      }
      if (await fs.lstat(current).then((st) => st.isSymbolicLink(), () => false)) {
        throw new DomainXmlError('path_dangling_symlink', element, `${current} is a symlink to a file that does not exist; qemu would create it wherever the link points`);
      }
      const parent = path.dirname(current);
      if (parent === current) throw err;
      missing.push(path.basename(current));
      current = parent;
    }
  }
}

async function checkOne(roots: string[], forbidden: string[], p: string, describe: string, element: string, mustExist: boolean): Promise<string> {
  const resolved = await resolveExisting(p, element);
  if (!roots.some((root) => isBelow(root, resolved))) {
    throw new DomainXmlError('path_not_allowed', element, `${describe} ${p} (resolved ${resolved}) is not below any --allow-path root`);
  }
  if (forbidden.some((dir) => isBelow(dir, resolved))) {
    throw new DomainXmlError('path_not_allowed', element, `${describe} ${p} (resolved ${resolved}) is inside the agent's own state (sockets, records, logs): never a guest's file`);
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

/** The --allow-path roots and the agent's own paths, as the kernel resolves them. */
async function resolveRoots(allowRoots: string[], forbiddenRoots: string[]): Promise<{ roots: string[]; forbidden: string[] }> {
  return {
    roots: await Promise.all(allowRoots.map((r) => resolveExisting(r, '--allow-path'))),
    forbidden: await Promise.all(forbiddenRoots.map((r) => resolveExisting(r, 'state directory'))),
  };
}

/**
 * Every host path a guest touches must lie below an --allow-path root once symlinks and `..`
 * are resolved, so domain XML cannot make qemu read or write arbitrary host files. That includes
 * the files a qcow2 image names in its header (backing chain, external data file), which qemu
 * opens on its own.
 */
export async function checkAllowedPaths(refs: FileRef[], allowRoots: string[], forbiddenRoots: string[]): Promise<void> {
  const { roots, forbidden } = await resolveRoots(allowRoots, forbiddenRoots);
  for (const ref of refs) {
    if (!path.isAbsolute(ref.path)) {
      throw new DomainXmlError('path_not_absolute', ref.element, `${ref.kind} path must be absolute: ${ref.path}`);
    }
    const resolved = await checkOne(roots, forbidden, ref.path, `${ref.kind} path`, ref.element, ref.mustExist);
    if (ref.listens) {
      const st = await fs.lstat(resolved).catch(() => null);
      if (st && !st.isSocket()) {
        throw new DomainXmlError('path_not_a_socket', ref.element, `${ref.path} exists and is no socket: qemu removes what is at a listening socket's path before it binds`);
      }
    }
    if (ref.format !== 'qcow2') continue;
    try {
      await imageFileRefs(resolved, 'qcow2', async (file) => {
        await checkOne(roots, forbidden, file.path, `${file.role === 'backing' ? 'backing file' : 'data file'} of ${file.from}:`, ref.element, true);
      });
    } catch (err) {
      if (err instanceof ImageError) throw new DomainXmlError(err.code, ref.element, err.message);
      throw err;
    }
  }
}

/**
 * The first file this domain would share with another one where either writes it (a serial log
 * over a neighbour's disk truncates it); two <shareable/> disks may share. Paths as the kernel
 * resolves them; a file of the other domain that cannot be resolved now is passed over.
 */
export async function sharedWrittenFile(mine: FileRef[], others: Array<{ domain: string; refs: FileRef[] }>): Promise<{ ref: FileRef; domain: string; other: FileRef } | undefined> {
  const resolve = async (ref: FileRef) => resolveExisting(ref.path, ref.element).catch(() => undefined);
  const theirs: Array<{ domain: string; ref: FileRef; resolved: string }> = [];
  for (const o of others) {
    for (const ref of o.refs) {
      const resolved = await resolve(ref);
      if (resolved) theirs.push({ domain: o.domain, ref, resolved });
    }
  }
  for (const ref of mine) {
    const resolved = await resolve(ref);
    const clash = theirs.find((t) => t.resolved === resolved && (ref.writes || t.ref.writes) && !(ref.shareable && t.ref.shareable));
    if (clash) return { ref, domain: clash.domain, other: clash.ref };
  }
  return undefined;
}

/** Descriptors the agent opened for qemu, and what qemu is told in place of each path. */
export interface PassedFiles {
  fds: number[];
  /** path as the XML names it -> `/dev/fdset/N` (N = index + 1) */
  args: Map<string, string>;
  /** The output files (chardev files, logs) among fds: the agent keeps these to cap their size. */
  outputs: number[];
  /** Closes every descriptor but those `keep` names. */
  close(keep?: number[]): void;
}

/**
 * Opens every guest file qemu would open through qemu_open, and checks what was opened: the
 * path is resolved and checked, opened without following a last-component symlink, and the
 * descriptor's own path (/proc/self/fd) is checked again, so a symlink or directory swapped
 * between the check and the open is caught, and qemu gets the very file that was checked.
 */
export async function openGuestFiles(
  refs: FileRef[],
  allowRoots: string[],
  forbiddenRoots: string[],
  opts: { outputsOnly?: boolean } = {},
): Promise<PassedFiles> {
  const { roots, forbidden } = await resolveRoots(allowRoots, forbiddenRoots);
  const passed: PassedFiles = {
    fds: [],
    args: new Map(),
    outputs: [],
    close(keep = []) {
      for (const fd of this.fds.splice(0)) if (!keep.includes(fd)) fsSync.closeSync(fd);
    },
  };
  try {
    for (const ref of refs) {
      if (!ref.passable || passed.args.has(ref.path) || (opts.outputsOnly && ref.kind === 'disk')) continue;
      const resolved = await checkOne(roots, forbidden, ref.path, `${ref.kind} path`, ref.element, ref.mustExist);
      // qemu finds a relative backing file beside the image's name, which /dev/fdset/N is not:
      // a qcow2 that names other files keeps its (checked) path.
      if (ref.format === 'qcow2' && (await qcow2NamesOtherFiles(resolved))) continue;
      const c = fsSync.constants;
      // Output files always append, so a capped file (truncated under qemu) goes on from its start;
      // re-opened for the cap after an agent restart, they are neither created nor truncated.
      const output = c.O_WRONLY | c.O_APPEND | (opts.outputsOnly ? 0 : c.O_CREAT | (ref.append ? 0 : c.O_TRUNC));
      const flags = ref.kind === 'disk' ? (ref.writes ? c.O_RDWR : c.O_RDONLY) : output;
      let fd: number;
      try {
        fd = fsSync.openSync(resolved, flags | c.O_NOFOLLOW | c.O_NOCTTY, 0o600);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        // ELOOP with O_NOFOLLOW: the resolved file itself has become a symlink since the check.
        if (code === 'ELOOP') throw new DomainXmlError('path_changed', ref.element, `${ref.path} became a symlink after it was checked`);
        throw new DomainXmlError('path_unopenable', ref.element, `${ref.path} (${resolved}) cannot be opened for qemu: ${code ?? (err as Error).message}`);
      }
      passed.fds.push(fd);
      if (ref.kind !== 'disk') passed.outputs.push(fd);
      const opened = fsSync.readlinkSync(`/proc/self/fd/${fd}`);
      if (!roots.some((root) => isBelow(root, opened)) || forbidden.some((dir) => isBelow(dir, opened))) {
        throw new DomainXmlError('path_changed', ref.element, `${ref.path} turned out to be ${opened} when opened, outside every --allow-path root: it changed since it was checked`);
      }
      passed.args.set(ref.path, `/dev/fdset/${passed.fds.length}`);
    }
  } catch (err) {
    passed.close();
    throw err;
  }
  return passed;
}
