/** Every host path a domain makes qemu open or create, for the caller's --allow-path checks. */
import type { CharLog, CharSource, DomainDef, FileRef } from './model.js';

export function domainFileRefs(def: DomainDef): FileRef[] {
  const refs: FileRef[] = [];
  if (def.os.kernel) refs.push({ kind: 'kernel', path: def.os.kernel, element: '/domain/os/kernel', mustExist: true, writes: false, passable: true, loadsWhole: true });
  if (def.os.initrd) refs.push({ kind: 'initrd', path: def.os.initrd, element: '/domain/os/initrd', mustExist: true, writes: false, passable: true, loadsWhole: true });
  const loader = def.os.loader;
  if (loader?.path !== undefined) {
    refs.push({
      kind: 'loader', path: loader.path, element: '/domain/os/loader', mustExist: true, writes: !loader.readonly, passable: true,
      ...(loader.type === 'rom' ? { loadsWhole: true } : {}),
      ...(loader.readonly ? { firmware: true } : {}),
    });
  }
  const nvram = def.os.nvram;
  // The store is made from its template when it does not exist yet (at start, by the host).
  if (nvram?.path !== undefined) refs.push({ kind: 'nvram', path: nvram.path, element: '/domain/os/nvram', mustExist: false, writes: true, passable: true });
  if (nvram?.template !== undefined) refs.push({ kind: 'nvram-template', path: nvram.template, element: '/domain/os/nvram/@template', mustExist: true, writes: false, firmware: true });
  for (const d of def.disks) {
    if (d.source === undefined) continue;
    refs.push({
      kind: 'disk',
      path: d.source,
      element: `${d.element}/source/@${d.type === 'file' ? 'file' : 'dev'}`,
      mustExist: true,
      format: d.format,
      writes: !d.readonly,
      passable: true,
      ...(d.shareable ? { shareable: true } : {}),
    });
  }
  const chardev = (kind: FileRef['kind'], element: string, source: CharSource, log: CharLog | undefined) => {
    if (source.type === 'file') refs.push({ kind, path: source.path, element: `${element}/source/@path`, mustExist: false, writes: true, passable: true, ...(source.append ? { append: true } : {}) });
    // qemu creates a listening socket; it connects to an existing one.
    // A socket without a path is the host's own, in the guest's run directory: no guest file.
    if (source.type === 'unix' && source.path !== undefined) {
      const listens = source.mode !== 'connect';
      refs.push({ kind, path: source.path, element: `${element}/source/@path`, mustExist: !listens, writes: listens, ...(listens ? { listens } : {}) });
    }
    if (log) refs.push({ kind: 'log', path: log.file, element: `${element}/log/@file`, mustExist: false, writes: true, passable: true, ...(log.append ? { append: true } : {}) });
  };
  for (const s of def.serials) chardev(s.origin, s.element, s.source, s.log);
  for (const c of def.consoles) chardev('console', c.element, c.source, c.log);
  for (const c of def.channels) chardev('channel', c.element, c.source, c.log);
  return refs;
}
