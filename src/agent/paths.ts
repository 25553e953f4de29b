import { randomUUID } from 'node:crypto';
import fsSync, { promises as fs } from 'node:fs';
import path from 'node:path';
import { DomainXmlError } from '../errors.js';
import type { FileRef, ImageChain } from '../domain/index.js';
import { ImageError, imageFileRefs, type ImageFileRef } from '../qemu/image.js';
import type { QemuCredentials } from '../qemu/process.js';

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

/** Where guest files may come from, as the kernel resolves each directory. */
export interface PathRoots {
  /** --allow-path. */
  allow: string[];
  /** The agent's own state: never a guest's file. */
  forbidden: string[];
  /** The directories of the host's firmware images (qemu's descriptors name them): read-only firmware may come from there too. */
  firmware: string[];
}

interface ResolvedRoots {
  roots: string[];
  forbidden: string[];
  firmware: string[];
}

async function resolveRoots(r: PathRoots): Promise<ResolvedRoots> {
  const resolve = (dirs: string[], what: string) => Promise.all(dirs.map((d) => resolveExisting(d, what)));
  return { roots: await resolve(r.allow, '--allow-path'), forbidden: await resolve(r.forbidden, 'state directory'), firmware: await resolve(r.firmware, 'firmware directory') };
}

/** The roots a file may lie below: read-only firmware also in the host's firmware directories. */
const rootsFor = (r: ResolvedRoots, ref: FileRef) => (ref.firmware && !ref.writes ? [...r.roots, ...r.firmware] : r.roots);

/**
 * Every host path a guest touches must lie below an --allow-path root once symlinks and `..`
 * are resolved, so domain XML cannot make qemu read or write arbitrary host files. That includes
 * the files a qcow2 image names in its header (backing chain, external data file), which qemu
 * opens on its own.
 */
export async function checkAllowedPaths(refs: FileRef[], pathRoots: PathRoots): Promise<void> {
  const resolvedRoots = await resolveRoots(pathRoots);
  const { roots, forbidden } = resolvedRoots;
  for (const ref of refs) {
    if (!path.isAbsolute(ref.path)) {
      throw new DomainXmlError('path_not_absolute', ref.element, `${ref.kind} path must be absolute: ${ref.path}`);
    }
    const resolved = await checkOne(rootsFor(resolvedRoots, ref), forbidden, ref.path, `${ref.kind} path`, ref.element, ref.mustExist);
    if (ref.listens) {
      const st = await fs.lstat(resolved).catch(() => null);
      if (st && !st.isSocket()) {
        throw new DomainXmlError('path_not_a_socket', ref.element, `${ref.path} exists and is no socket: qemu removes what is at a listening socket's path before it binds`);
      }
    }
    if (ref.format === 'qcow2') await checkedImageFiles(roots, forbidden, ref, resolved);
  }
}

/**
 * The files a qcow2 disk's header chain names (backing files, data files), each checked like a
 * path of the XML before the next header is read, with the path each resolves to.
 */
async function checkedImageFiles(roots: string[], forbidden: string[], ref: FileRef, resolved: string): Promise<Array<{ file: ImageFileRef; resolved: string }>> {
  const checked = new Map<ImageFileRef, string>();
  try {
    const files = await imageFileRefs(resolved, 'qcow2', async (f) => {
      checked.set(f, await checkOne(roots, forbidden, f.path, `${f.role === 'backing' ? 'backing file' : 'data file'} of ${f.from}:`, ref.element, true));
    });
    return files.map((file) => ({ file, resolved: checked.get(file)! }));
  } catch (err) {
    if (err instanceof ImageError) throw new DomainXmlError(err.code, ref.element, err.message);
    throw err;
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
  /** Handed to qemu as fd sets (-add-fd: qemu keeps a duplicate and closes the descriptor itself). */
  fds: number[];
  /** Handed to qemu after `fds`, kept as they are: qemu reopens them by /proc/self/fd (kernel, initrd). */
  plainFds: number[];
  /** path as the XML names it -> `/dev/fdset/N` (N = index + 1), or `/proc/self/fd/M` for kernel and initrd */
  args: Map<string, string>;
  /** qcow2 disk path -> the files its header names, as qemu is told them (see ImageChain). */
  chains: Map<string, ImageChain>;
  /** The output files (chardev files, logs) among fds: the agent keeps these to cap their size. */
  outputs: number[];
  /** Closes every descriptor but those `keep` names. */
  close(keep?: number[]): void;
}

export interface OpenGuestFilesOptions {
  /** Only the output files, re-opened for the size cap after an agent restart. */
  outputsOnly?: boolean;
  /** qemu's user: a kernel or initrd it may not read is handed over as a copy it may. */
  qemuUser?: QemuCredentials;
  /** Where such a copy is made (and unlinked at once: only the descriptor remains). */
  scratchDir?: string;
  /** Files the agent keeps for the guest in its own state (the UEFI store it made): passed read-write, unchecked. */
  ownFiles?: string[];
}

/**
 * Opens every guest file qemu would open, and checks what was opened: the path is resolved and
 * checked, opened without following a last-component symlink, and the descriptor's own path
 * (/proc/self/fd) is checked again, so a symlink or directory swapped between the check and the
 * open is caught, and qemu gets the very file that was checked. A qcow2 image's backing chain and
 * data file are opened the same way and given to qemu as nodes of their own, so qemu opens no
 * file by a name it read from an image header.
 */
export async function openGuestFiles(refs: FileRef[], pathRoots: PathRoots, opts: OpenGuestFilesOptions = {}): Promise<PassedFiles> {
  const resolvedRoots = await resolveRoots(pathRoots);
  const { roots, forbidden } = resolvedRoots;
  const passed: PassedFiles = {
    fds: [],
    args: new Map(),
    chains: new Map(),
    outputs: [],
    plainFds: [],
    close(keep = []) {
      for (const fd of [...this.fds.splice(0), ...this.plainFds.splice(0)]) if (!keep.includes(fd)) fsSync.closeSync(fd);
    },
  };
  const c = fsSync.constants;
  const plainPaths: string[] = [];
  /** Opens a checked path for qemu; the argument qemu is given for it. */
  const pass = (ref: FileRef, shownPath: string, resolved: string, flags: number): string => {
    const fd = openChecked(rootsFor(resolvedRoots, ref), forbidden, ref, shownPath, resolved, flags);
    passed.fds.push(fd);
    return `/dev/fdset/${passed.fds.length}`;
  };
  try {
    for (const file of opts.ownFiles ?? []) {
      passed.fds.push(fsSync.openSync(file, c.O_RDWR | c.O_NOFOLLOW | c.O_NOCTTY));
      passed.args.set(file, `/dev/fdset/${passed.fds.length}`);
    }
    for (const ref of refs) {
      const output = ref.kind === 'serial' || ref.kind === 'console' || ref.kind === 'channel' || ref.kind === 'log';
      if (!ref.passable || passed.args.has(ref.path) || (opts.outputsOnly && !output)) continue;
      const resolved = await checkOne(rootsFor(resolvedRoots, ref), forbidden, ref.path, `${ref.kind} path`, ref.element, ref.mustExist);
      if (ref.loadsWhole) {
        // qemu loads these with fopen(), not qemu_open(): it gets /proc/self/fd/M, which reopens this very file.
        let fd = openChecked(rootsFor(resolvedRoots, ref), forbidden, ref, ref.path, resolved, c.O_RDONLY);
        if (opts.qemuUser && !mayRead(fsSync.fstatSync(fd), opts.qemuUser)) fd = copyForQemu(fd, opts.scratchDir);
        passed.plainFds.push(fd);
        plainPaths.push(ref.path);
        continue;
      }
      if (!output) {
        passed.args.set(ref.path, pass(ref, ref.path, resolved, ref.writes ? c.O_RDWR : c.O_RDONLY));
        if (ref.format === 'qcow2') passed.chains.set(ref.path, await openImageChain(roots, forbidden, ref, resolved, pass));
        continue;
      }
      // Output files always append, so a capped file (truncated under qemu) goes on from its start;
      // re-opened for the cap after an agent restart, they are neither created nor truncated.
      const outputFlags = c.O_WRONLY | c.O_APPEND | (opts.outputsOnly ? 0 : c.O_CREAT | (ref.append ? 0 : c.O_TRUNC));
      passed.args.set(ref.path, pass(ref, ref.path, resolved, outputFlags));
      passed.outputs.push(passed.fds[passed.fds.length - 1]!);
    }
  } catch (err) {
    passed.close();
    throw err;
  }
  // qemu gets them as fds 3, 4, ...: the fd sets' first, then these.
  plainPaths.forEach((p, j) => passed.args.set(p, `/proc/self/fd/${3 + passed.fds.length + j}`));
  return passed;
}

/** The backing chain and data files of a qcow2 disk, each checked and opened for qemu. */
async function openImageChain(
  roots: string[],
  forbidden: string[],
  ref: FileRef,
  resolved: string,
  pass: (ref: FileRef, shownPath: string, resolved: string, flags: number) => string,
): Promise<ImageChain> {
  const c = fsSync.constants;
  const chain: ImageChain = { backing: [] };
  let layer: { dataFile?: string } = chain;
  for (const { file, resolved: fileResolved } of await checkedImageFiles(roots, forbidden, ref, resolved)) {
    if (file.role === 'data-file') {
      // Only the top image's data is written; every layer below is read-only to qemu.
      layer.dataFile = pass(ref, file.path, fileResolved, layer === chain && ref.writes ? c.O_RDWR : c.O_RDONLY);
    } else {
      const next: ImageChain['backing'][number] = { file: pass(ref, file.path, fileResolved, c.O_RDONLY), format: file.format ?? 'raw' };
      chain.backing.push(next);
      layer = next;
    }
  }
  return chain;
}

function openChecked(roots: string[], forbidden: string[], ref: FileRef, shownPath: string, resolved: string, flags: number): number {
  const c = fsSync.constants;
  let fd: number;
  try {
    fd = fsSync.openSync(resolved, flags | c.O_NOFOLLOW | c.O_NOCTTY, 0o600);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // ELOOP with O_NOFOLLOW: the resolved file itself has become a symlink since the check.
    if (code === 'ELOOP') throw new DomainXmlError('path_changed', ref.element, `${shownPath} became a symlink after it was checked`);
    throw new DomainXmlError('path_unopenable', ref.element, `${shownPath} (${resolved}) cannot be opened for qemu: ${code ?? (err as Error).message}`);
  }
  const opened = fsSync.readlinkSync(`/proc/self/fd/${fd}`);
  if (!roots.some((root) => isBelow(root, opened)) || forbidden.some((dir) => isBelow(dir, opened))) {
    fsSync.closeSync(fd);
    throw new DomainXmlError('path_changed', ref.element, `${shownPath} turned out to be ${opened} when opened, outside every --allow-path root: it changed since it was checked`);
  }
  return fd;
}

/** Permission bits only: with an ACL the copy is made where it might not have been needed. */
function mayRead(st: fsSync.Stats, user: QemuCredentials): boolean {
  if (st.uid === user.uid) return (st.mode & 0o400) !== 0;
  if (st.gid === user.gid) return (st.mode & 0o040) !== 0;
  return (st.mode & 0o004) !== 0;
}

/**
 * A copy of the file behind `fd` that qemu's user may read through /proc/self/fd: an unlinked
 * file, so nothing of it is left behind. Closes `fd`.
 */
function copyForQemu(fd: number, scratchDir: string | undefined): number {
  if (!scratchDir) throw new Error('copyForQemu needs a scratch directory');
  const c = fsSync.constants;
  const copyPath = path.join(scratchDir, `.copy-${process.pid}-${randomUUID()}`);
  const copy = fsSync.openSync(copyPath, c.O_RDWR | c.O_CREAT | c.O_EXCL | c.O_NOFOLLOW, 0o644);
  try {
    fsSync.unlinkSync(copyPath);
    const buf = Buffer.allocUnsafe(1 << 20);
    for (let n; (n = fsSync.readSync(fd, buf, 0, buf.length, null)) > 0; ) fsSync.writeSync(copy, buf, 0, n);
    fsSync.fchmodSync(copy, 0o444);
  } catch (err) {
    fsSync.closeSync(copy);
    throw err;
  } finally {
    fsSync.closeSync(fd);
  }
  return copy;
}
