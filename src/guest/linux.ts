// The project's Linux test guest: Debian's own kernel and static busybox, fetched with apt at
// test time, and an initramfs whose /init (linux-init.sh, which documents what the guest
// prints, writes and serves) brings up each virtio device the agent gives a guest. Unlike the
// boot sector (image.ts), it runs real drivers, so it notices a device that is missing or wrong.
//
// What ensureLinuxGuest builds into a cache directory, once per version of the two packages
// (and of this recipe):
//   vmlinux     the kernel, uncompressed: qemu boots it through its PVH entry, which spares the
//               ~2.5 s that decompressing the bzImage takes under TCG
//   vmlinuz     the bzImage as Debian ships it: UEFI firmware boots it through its EFI stub
//   initrd.img  gzip'd cpio (newc, made by GNU cpio): busybox, the modules, /init
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, copyFile, mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { gzip } from 'node:zlib';
import { execa } from 'execa';
import { guestSourceDir } from './image.js';

export interface LinuxGuest {
  /** Uncompressed kernel (ELF with a PVH entry), for qemu -kernel. */
  kernel: string;
  /** The same kernel as a bzImage, for a guest that boots through UEFI (OVMF loads -kernel as an EFI program). */
  efiKernel: string;
  initrd: string;
  /** Debian version of the kernel package, e.g. 6.1.192-3. */
  version: string;
}

/** The packages could not be resolved or fetched (no apt, no mirror, stale lists): the guest cannot be built here. */
export class GuestPackagesUnavailableError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'GuestPackagesUnavailableError';
  }
}

/**
 * quiet: the console carries the guest's own lines, not ~300 of kernel log (which also cost
 * ~0.2 s of boot under TCG); panic=-1: a dead /init reboots at once, which -no-reboot makes an exit.
 */
export const LINUX_GUEST_CMDLINE = 'console=ttyS0 quiet panic=-1';
/** Modules /init loads; their dependencies (virtio, virtio_ring, failover, ...) come along. */
const LINUX_GUEST_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_net', 'virtio_console', 'virtio_rng', 'virtio_balloon', 'tpm_crb', 'tpm_tis'];
/** Modules /init loads only where they apply: efivarfs refuses to load on a guest without UEFI. */
const LINUX_GUEST_UEFI_MODULES = ['efivarfs'];
/** Devices /init reports on the console, each as `KMLINUX dev <name> ok|FAIL`. */
export const LINUX_GUEST_DEVICES = ['vda', 'net', 'rng', 'balloon', 'agent'];
/** Name of the virtio-serial port the guest answers guest-ping and guest-sync on. */
export const LINUX_GUEST_AGENT_PORT = 'org.qemu.guest_agent.0';
/** The guest's disk records are one per sector of this size. */
export const LINUX_GUEST_SECTOR = 512;

const KERNEL_METAPACKAGE = 'linux-image-amd64';
const BUSYBOX_PACKAGE = 'busybox-static';
const INIT_SCRIPT = 'linux-init.sh';
const APT_QUERY_TIMEOUT_MS = 30_000;
const DOWNLOAD_TIMEOUT_MS = 5 * 60_000;
const TOOL_TIMEOUT_MS = 2 * 60_000;
// Longer than any build can take with the timeouts above, so an older build dir is a dead one's.
const STALE_BUILD_MS = 60 * 60_000;
const BUILD_PREFIX = '.build-';

/** Where built guests are kept between test files and runs. */
function defaultGuestCacheDir(): string {
  return process.env.KVM_MIGRATE_GUEST_CACHE || join(tmpdir(), 'kvm-migrate-guest-cache');
}

/**
 * The kernel and initramfs of the Linux test guest, built on first use for the kernel that
 * `linux-image-amd64` currently points at, then taken from `cacheDir`. Throws
 * GuestPackagesUnavailableError when apt cannot name or fetch the packages.
 */
export async function ensureLinuxGuest(cacheDir = defaultGuestCacheDir()): Promise<LinuxGuest> {
  const { kernel, busybox } = await resolvePackages();
  const initScript = await readFile(join(guestSourceDir(), INIT_SCRIPT));
  // The packages say what goes in; this module and /init say how it is put together.
  const recipe = createHash('sha256').update(await readFile(fileURLToPath(import.meta.url))).update(initScript).digest('hex');
  const key = [`${kernel.name}_${kernel.version}`, `${busybox.name}_${busybox.version}`, recipe.slice(0, 12)]
    .join('+')
    .replace(/[^A-Za-z0-9._+-]/g, '_');
  const dir = join(cacheDir, key);
  const guest = { kernel: join(dir, 'vmlinux'), efiKernel: join(dir, 'vmlinuz'), initrd: join(dir, 'initrd.img'), version: kernel.version };
  if (existsSync(guest.kernel) && existsSync(guest.efiKernel) && existsSync(guest.initrd)) return guest;

  await mkdir(cacheDir, { recursive: true });
  await removeStaleBuilds(cacheDir);
  // Built beside its final place and renamed there whole: a reader sees all of it or nothing.
  const work = await mkdtemp(join(cacheDir, BUILD_PREFIX));
  try {
    const out = join(work, 'out');
    await mkdir(out);
    await build(work, out, { kernel, busybox, initScript });
    await rename(out, dir).catch((err: NodeJS.ErrnoException) => {
      // Another process built the same guest meanwhile: theirs is as good.
      if (!((err.code === 'ENOTEMPTY' || err.code === 'EEXIST') && existsSync(guest.kernel) && existsSync(guest.initrd))) throw err;
    });
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  return guest;
}

interface Package {
  name: string;
  version: string;
}

async function build(work: string, out: string, pkgs: { kernel: Package; busybox: Package; initScript: Buffer }): Promise<void> {
  const debs = join(work, 'debs');
  await mkdir(debs);
  try {
    const pinned = [pkgs.kernel, pkgs.busybox].map((p) => `${p.name}=${p.version}`);
    await execa('apt-get', ['download', ...pinned], { cwd: debs, timeout: DOWNLOAD_TIMEOUT_MS });
  } catch (err) {
    const why = (err as Error).message;
    throw new GuestPackagesUnavailableError(`cannot fetch the packages (apt-get update may be needed): ${why}`, { cause: err });
  }
  const files = await readdir(debs);
  const deb = (pkg: Package) => {
    const file = files.find((f) => f.startsWith(`${pkg.name}_`) && f.endsWith('.deb'));
    if (!file) throw new Error(`apt-get download left no .deb of ${pkg.name} in ${debs}`);
    return join(debs, file);
  };
  const kernelTree = join(work, 'kernel');
  const busyboxTree = join(work, 'busybox');
  await Promise.all([
    execa('dpkg-deb', ['-x', deb(pkgs.kernel), kernelTree], { timeout: TOOL_TIMEOUT_MS }),
    execa('dpkg-deb', ['-x', deb(pkgs.busybox), busyboxTree], { timeout: TOOL_TIMEOUT_MS }),
  ]);
  const busybox = join(busyboxTree, 'bin', 'busybox');
  const releases = await readdir(join(kernelTree, 'lib', 'modules'));
  if (releases.length !== 1) throw new Error(`${pkgs.kernel.name} holds modules of ${releases.length} kernels: ${releases.join(', ')}`);
  const release = releases[0]!;

  await writeVmlinux(join(kernelTree, 'boot'), release, work, join(out, 'vmlinux'));
  await copyFile(join(kernelTree, 'boot', `vmlinuz-${release}`), join(out, 'vmlinuz'));

  // The package has no modules.dep (its postinst runs depmod); busybox's depmod makes one.
  await execa(busybox, ['depmod', '-b', kernelTree, release], { timeout: TOOL_TIMEOUT_MS });
  const moduleDir = join(kernelTree, 'lib', 'modules', release);
  const modules = await moduleClosure(moduleDir, LINUX_GUEST_MODULES);
  const uefiModules = await moduleClosure(moduleDir, LINUX_GUEST_UEFI_MODULES);

  const root = join(work, 'root');
  const rootModules = join(root, 'lib', 'modules', release);
  for (const d of ['bin', 'dev', 'etc', 'proc', 'sys', 'tmp']) await mkdir(join(root, d), { recursive: true });
  await copyFile(busybox, join(root, 'bin', 'busybox'));
  await chmod(join(root, 'bin', 'busybox'), 0o755);
  await writeFile(join(root, 'init'), pkgs.initScript, { mode: 0o755 });
  await writeFile(join(root, 'etc', 'kmlinux-modules'), modules.load.join(' ') + '\n');
  const depLines: string[] = [];
  for (const [path, deps] of new Map([...modules.files, ...uefiModules.files])) {
    const target = join(rootModules, uncompressedName(path));
    await mkdir(dirname(target), { recursive: true });
    // busybox insmod loads plain .ko files only.
    if (path.endsWith('.xz')) await execa('xz', ['-dc', join(moduleDir, path)], { stdout: { file: target }, timeout: TOOL_TIMEOUT_MS });
    else await copyFile(join(moduleDir, path), target);
    depLines.push(`${uncompressedName(path)}: ${deps.map(uncompressedName).join(' ')}`.trimEnd());
  }
  await writeFile(join(rootModules, 'modules.dep'), depLines.join('\n') + '\n');

  // Sorted, every directory comes before what it holds, as the kernel's unpacker needs.
  const entries = (await readdir(root, { recursive: true })).sort();
  const { stdout: cpio } = await execa('cpio', ['-o', '-H', 'newc', '-R', '0:0', '--reproducible', '--quiet'], {
    cwd: root,
    input: entries.join('\n') + '\n',
    encoding: 'buffer',
    timeout: TOOL_TIMEOUT_MS,
  });
  await writeFile(join(out, 'initrd.img'), await promisify(gzip)(cpio));
}

/**
 * The kernel inside the bzImage, uncompressed, via the payload fields of the x86 boot
 * protocol's setup header (Documentation/arch/x86/boot.rst).
 */
async function writeVmlinux(bootDir: string, release: string, work: string, target: string): Promise<void> {
  const config = await readFile(join(bootDir, `config-${release}`), 'utf8');
  if (!/^CONFIG_PVH=y$/m.test(config)) {
    throw new Error(`kernel ${release} has no PVH entry (CONFIG_PVH), so qemu cannot boot it uncompressed`);
  }
  const bzImage = await readFile(join(bootDir, `vmlinuz-${release}`));
  if (bzImage.toString('latin1', 0x202, 0x206) !== 'HdrS') throw new Error(`vmlinuz-${release} is not a bzImage`);
  const setupSectors = bzImage[0x1f1] || 4;
  const start = (setupSectors + 1) * 512 + bzImage.readUInt32LE(0x248);
  const payload = bzImage.subarray(start, start + bzImage.readUInt32LE(0x24c));
  if (!payload.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) {
    throw new Error(`vmlinuz-${release}: the kernel payload is not xz-compressed`);
  }
  const payloadPath = join(work, 'vmlinux.xz');
  await writeFile(payloadPath, payload);
  // The payload ends with the uncompressed size after the xz stream: --single-stream stops before it.
  await execa('xz', ['-dc', '--single-stream', payloadPath], { stdout: { file: target }, timeout: TOOL_TIMEOUT_MS });
  const file = await open(target);
  const elf = Buffer.alloc(4);
  await file.read(elf, 0, 4, 0).finally(() => file.close());
  if (elf.toString('latin1') !== '\x7fELF') throw new Error(`vmlinuz-${release}: the uncompressed payload is not an ELF kernel`);
}

/**
 * The modules `names` with everything they need, from modules.dep (which lists each
 * module's dependencies transitively): `load` the names to modprobe (those built in left
 * out), `files` each module's path with its dependencies.
 */
async function moduleClosure(moduleDir: string, names: string[]): Promise<{ load: string[]; files: Map<string, string[]> }> {
  const deps = new Map<string, string[]>();
  for (const line of (await readFile(join(moduleDir, 'modules.dep'), 'utf8')).split('\n')) {
    const m = /^([^:]+):\s*(.*)$/.exec(line);
    if (m) deps.set(m[1]!, m[2]!.split(/\s+/).filter(Boolean));
  }
  const byName = new Map([...deps.keys()].map((p) => [moduleName(p), p]));
  const builtin = new Set((await readFile(join(moduleDir, 'modules.builtin'), 'utf8')).split('\n').filter(Boolean).map(moduleName));
  const load: string[] = [];
  const files = new Map<string, string[]>();
  for (const name of names) {
    if (builtin.has(name)) continue;
    const path = byName.get(name);
    if (!path) throw new Error(`kernel module ${name} is neither in ${join(moduleDir, 'modules.dep')} nor built in`);
    load.push(name);
    for (const p of [path, ...deps.get(path)!]) {
      const pDeps = deps.get(p);
      if (!pDeps) throw new Error(`modules.dep names ${p} as a dependency but has no line for it`);
      files.set(p, pDeps);
    }
  }
  return { load, files };
}

/** What modprobe calls a module file: virtio-rng.ko.xz -> virtio_rng. */
function moduleName(path: string): string {
  return basename(path).replace(/\.ko(\.xz)?$/, '').replaceAll('-', '_');
}

function uncompressedName(path: string): string {
  return path.replace(/\.ko\.xz$/, '.ko');
}

/**
 * What apt would install now: the kernel package `linux-image-amd64` pins (the kernel of the
 * current ABI, e.g. linux-image-6.1.0-57-amd64 (= 6.1.192-3)) and busybox-static, in one
 * `apt-cache show` (each run costs apt ~0.4 s of loading its cache, on every cache hit too).
 */
async function resolvePackages(): Promise<{ kernel: Package; busybox: Package }> {
  const args = ['show', '--no-all-versions', KERNEL_METAPACKAGE, BUSYBOX_PACKAGE];
  let stdout: string;
  try {
    ({ stdout } = await execa('apt-cache', args, { timeout: APT_QUERY_TIMEOUT_MS }));
  } catch (err) {
    const why = (err as Error).message;
    throw new GuestPackagesUnavailableError(`apt cannot show the guest's packages (apt-get update may be needed): ${why}`, { cause: err });
  }
  const stanzas = new Map<string, Map<string, string>>();
  for (const stanza of stdout.split(/\n\s*\n/)) {
    const fields = new Map<string, string>();
    for (const m of stanza.matchAll(/^([A-Za-z0-9-]+):[ \t]*(.*)$/gm)) fields.set(m[1]!, m[2]!);
    const name = fields.get('Package');
    if (name) stanzas.set(name, fields);
  }
  const depends = stanzas.get(KERNEL_METAPACKAGE)?.get('Depends') ?? '';
  const kernel = /^\s*(linux-image-[^\s,(|]+)\s*\(=\s*([^)\s]+)\)/.exec(depends);
  if (!kernel) throw new GuestPackagesUnavailableError(`${KERNEL_METAPACKAGE} pins no linux-image package version: Depends "${depends}"`);
  const busyboxVersion = stanzas.get(BUSYBOX_PACKAGE)?.get('Version');
  if (!busyboxVersion) throw new GuestPackagesUnavailableError(`apt-cache shows no version of ${BUSYBOX_PACKAGE}`);
  return { kernel: { name: kernel[1]!, version: kernel[2]! }, busybox: { name: BUSYBOX_PACKAGE, version: busyboxVersion } };
}

/** Build dirs a killed process left behind (each holds the unpacked kernel, ~400 MB). */
async function removeStaleBuilds(cacheDir: string): Promise<void> {
  for (const entry of await readdir(cacheDir)) {
    if (!entry.startsWith(BUILD_PREFIX)) continue;
    const path = join(cacheDir, entry);
    const st = await stat(path).catch(() => null);
    if (st && Date.now() - st.mtimeMs > STALE_BUILD_MS) await rm(path, { recursive: true, force: true });
  }
}

// ---- what the guest reports --------------------------------------------------------

export interface LinuxSerialLog {
  /** Boot ids in order; more than one = the guest rebooted. */
  boots: string[];
  /** Every tick line, in order, with the boot id it carried. */
  ticks: { tick: number; bootId: string }[];
  /** Each device's last report: ok, and what the guest saw or why it failed. */
  devices: Record<string, { ok: boolean; detail: string }>;
  /** kmstate: each tick's report of the UEFI variable and PCR 16 (undefined where absent). */
  states: { efivar?: string; pcr16?: string }[];
  /** Any other KMLINUX line (a failed modprobe, a failed disk write). */
  problems: string[];
}

const BOOT_ID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}';

export function parseLinuxSerialLog(text: string): LinuxSerialLog {
  const log: LinuxSerialLog = { boots: [], ticks: [], devices: {}, states: [], problems: [] };
  const value = (v: string) => (v === '-' ? undefined : v);
  // Whole lines only: the last one may still be being written.
  for (const m of text.matchAll(/KMLINUX ([^\r\n]*)\r?\n/g)) {
    const line = m[1]!;
    let f: RegExpExecArray | null;
    if ((f = new RegExp(`^boot (${BOOT_ID})$`).exec(line))) log.boots.push(f[1]!);
    else if ((f = new RegExp(`^tick (\\d+) (${BOOT_ID})$`).exec(line))) log.ticks.push({ tick: Number(f[1]), bootId: f[2]! });
    else if ((f = /^dev (\S+) (ok|FAIL) ?(.*)$/.exec(line))) log.devices[f[1]!] = { ok: f[2] === 'ok', detail: f[3]! };
    else if ((f = /^state efivar=(.*) pcr16=(\S+)$/.exec(line))) {
      const efivar = value(f[1]!);
      const pcr16 = value(f[2]!);
      log.states.push({ ...(efivar !== undefined ? { efivar } : {}), ...(pcr16 !== undefined ? { pcr16 } : {}) });
    }
    else log.problems.push(line);
  }
  return log;
}

export interface LinuxDiskLog {
  /** Boot id in the header sector, or null when there is no header. */
  bootId: string | null;
  /** The records from sector 1 on, up to the first sector that holds none. */
  records: { tick: number; bootId: string }[];
}

export function parseLinuxGuestDisk(image: Buffer): LinuxDiskLog {
  const sector = (i: number) => image.toString('latin1', i * LINUX_GUEST_SECTOR, (i + 1) * LINUX_GUEST_SECTOR);
  const header = new RegExp(`^KMLINUX disk (${BOOT_ID})\n\0*$`).exec(sector(0));
  const records: LinuxDiskLog['records'] = [];
  const re = new RegExp(`^KMREC (\\d{8}) (${BOOT_ID})\n\0*$`);
  for (let i = 1; (i + 1) * LINUX_GUEST_SECTOR <= image.length; i++) {
    const m = re.exec(sector(i));
    if (!m) break;
    records.push({ tick: Number(m[1]), bootId: m[2]! });
  }
  return { bootId: header?.[1] ?? null, records };
}
