/**
 * Host-side parts of a guest definition that depend on the host it starts on, not on the XML
 * alone: its hugetlbfs mount and free huge pages, and the host CPUs it is pinned to. Checked at
 * each start and each incoming migration (a destination is another host), never at define.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { AgentError, conflict } from '../errors.js';
import { formatCpuset, parseCpuset } from '../domain/cpuset.js';
import type { DomainDef } from '../domain/index.js';
import type { QmpClient } from '../qemu/qmp.js';
import type { QemuCredentials } from '../qemu/process.js';
import { makeQemuDir } from './qemu-user.js';

const execFileP = promisify(execFile);

/** The CPUs this agent (and so every qemu it starts) may run on: its own affinity. */
export async function hostCpus(): Promise<number[]> {
  const status = await fs.readFile('/proc/self/status', 'utf8');
  const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(status);
  const cpus = m ? parseCpuset(m[1]!, 1 << 20) : undefined;
  if (!cpus) throw new Error('cannot read Cpus_allowed_list of /proc/self/status');
  return cpus;
}

/** Every pinning of the definition names CPUs this host has (409 host_cpus_unavailable otherwise). */
export async function checkPinning(def: DomainDef, available?: number[]): Promise<void> {
  const tune = def.cputune;
  if (!tune) return;
  const have = new Set(available ?? (await hostCpus()));
  const sets: [string, number[] | undefined][] = [
    ['/domain/vcpu/@cpuset', tune.cpuset],
    ...tune.vcpupin.map((p, i): [string, number[]] => [`/domain/cputune/vcpupin[${i + 1}]/@cpuset`, p.cpus]),
    ['/domain/cputune/emulatorpin/@cpuset', tune.emulatorpin],
  ];
  for (const [element, cpus] of sets) {
    const missing = (cpus ?? []).filter((c) => !have.has(c));
    if (missing.length > 0) {
      throw conflict('host_cpus_unavailable', `${element} names CPUs ${formatCpuset(missing)}, which this host does not give its guests (it has ${formatCpuset([...have].sort((a, b) => a - b))})`, { element });
    }
  }
}

/** What each qemu thread was pinned to (for the log and the tests). */
export interface PinnedThread {
  tid: number;
  role: 'vcpu' | 'iothread' | 'emulator';
  cpus: string;
}

async function taskset(tid: number, cpus: number[]): Promise<void> {
  // util-linux's taskset: qemu's seccomp sandbox (resourcecontrol=deny) keeps qemu itself from
  // changing affinity, so the agent does it from outside, thread by thread.
  await execFileP('taskset', ['-p', '-c', formatCpuset(cpus), String(tid)]);
}

/**
 * libvirt's placement of qemu's threads, applied while the guest is still paused (-S): each
 * vCPU thread (QMP query-cpus-fast thread-id) to its vcpupin, else the <vcpu cpuset>; each
 * iothread to the <vcpu cpuset>; every other thread of the process (the main loop, RCU,
 * workers; threads made later inherit the main thread's) to the emulatorpin, else the cpuset.
 */
export async function applyPinning(def: DomainDef, pid: number, qmp: QmpClient): Promise<PinnedThread[]> {
  const tune = def.cputune;
  if (!tune) return [];
  const pinned: PinnedThread[] = [];
  const cpus = await qmp.execute<Array<{ 'cpu-index': number; 'thread-id': number }>>('query-cpus-fast');
  const special = new Set<number>();
  for (const c of cpus) {
    special.add(c['thread-id']);
    const set = tune.vcpupin.find((p) => p.vcpu === c['cpu-index'])?.cpus ?? tune.cpuset;
    if (!set) continue;
    await taskset(c['thread-id'], set);
    pinned.push({ tid: c['thread-id'], role: 'vcpu', cpus: formatCpuset(set) });
  }
  const iothreads = def.iothreads > 0 ? await qmp.execute<Array<{ 'thread-id': number }>>('query-iothreads') : [];
  for (const io of iothreads) {
    special.add(io['thread-id']);
    if (!tune.cpuset) continue;
    await taskset(io['thread-id'], tune.cpuset);
    pinned.push({ tid: io['thread-id'], role: 'iothread', cpus: formatCpuset(tune.cpuset) });
  }
  const emulator = tune.emulatorpin ?? tune.cpuset;
  if (emulator) {
    for (const name of await fs.readdir(`/proc/${pid}/task`)) {
      const tid = Number(name);
      if (special.has(tid)) continue;
      try {
        await taskset(tid, emulator);
      } catch (err) {
        // A short-lived worker may be gone already; the process's other threads are not.
        if (await fs.stat(`/proc/${pid}/task/${tid}`).then(() => true, () => false)) throw err;
        continue;
      }
      pinned.push({ tid, role: 'emulator', cpus: formatCpuset(emulator) });
    }
  }
  return pinned;
}

interface HugetlbfsMount {
  dir: string;
  pageKiB: number;
}

async function defaultHugepageKiB(): Promise<number | undefined> {
  const meminfo = await fs.readFile('/proc/meminfo', 'utf8').catch(() => '');
  const m = /^Hugepagesize:\s+(\d+) kB$/m.exec(meminfo);
  return m ? Number(m[1]) : undefined;
}

/** hugetlbfs mounts of the host's default page size (`<hugepages/>` names no size). */
async function hugetlbfsMounts(): Promise<HugetlbfsMount[]> {
  const dflt = await defaultHugepageKiB();
  const mounts = await fs.readFile('/proc/mounts', 'utf8').catch(() => '');
  const found: HugetlbfsMount[] = [];
  for (const line of mounts.split('\n')) {
    const [, dir, type, options] = line.split(' ');
    if (type !== 'hugetlbfs' || !dir) continue;
    const size = /(?:^|,)pagesize=(\d+)([KMG])/.exec(options ?? '');
    const pageKiB = size ? Number(size[1]) * { K: 1, M: 1024, G: 1024 * 1024 }[size[2] as 'K' | 'M' | 'G'] : dflt;
    if (pageKiB !== undefined && pageKiB === dflt) found.push({ dir: dir.replace(/\\040/g, ' '), pageKiB });
  }
  return found;
}

async function readCount(file: string): Promise<number> {
  return Number((await fs.readFile(file, 'utf8').catch(() => '0')).trim()) || 0;
}

export const HUGEPAGES_ELEMENT = '/domain/memoryBacking/hugepages';

/**
 * For `<hugepages/>`: a directory of its own on the host's hugetlbfs mount (of the default page
 * size), owned by the guest's qemu user, where qemu creates its RAM file; refused (409
 * hugepages_unavailable) without such a mount or with fewer free pages than the guest's RAM.
 */
export async function prepareHugepages(def: DomainDef, uuid: string, credentials: QemuCredentials | undefined): Promise<string | undefined> {
  if (!def.hugepages) return undefined;
  const refuse = (why: string) => new AgentError(409, 'hugepages_unavailable', `the guest's memory is to come from huge pages, but ${why}`, { element: HUGEPAGES_ELEMENT });
  const [mount] = await hugetlbfsMounts();
  const pageKiB = await defaultHugepageKiB();
  if (!mount || pageKiB === undefined) throw refuse(`this host has no hugetlbfs mount${pageKiB ? ` of its default page size (${pageKiB} KiB)` : ''}`);
  const sys = `/sys/kernel/mm/hugepages/hugepages-${pageKiB}kB`;
  const free = (await readCount(`${sys}/free_hugepages`)) - (await readCount(`${sys}/resv_hugepages`));
  const need = Math.ceil(def.memoryKiB / pageKiB);
  if (free < need) throw refuse(`${mount.dir} has ${Math.max(free, 0)} free pages of ${pageKiB} KiB and the guest needs ${need}`);
  const dir = path.join(mount.dir, 'kvm-migrate', uuid);
  await makeQemuDir(dir, credentials);
  return dir;
}

/** The guest's directories on the hugetlbfs mounts, after its qemu ended (its RAM file with them). */
export async function releaseHugepages(uuid: string): Promise<void> {
  for (const mount of await hugetlbfsMounts()) await fs.rm(path.join(mount.dir, 'kvm-migrate', uuid), { recursive: true, force: true });
}

const CPU_VENDORS: Record<string, 'Intel' | 'AMD'> = { GenuineIntel: 'Intel', AuthenticAMD: 'AMD' };

/**
 * `<cpu><vendor>`: under KVM the guest sees the host's CPU vendor whatever the model says, so a
 * host of another vendor is refused at start and arrival, as libvirt's CPU check does. Under TCG
 * the named model is emulated as it is, vendor included: nothing to check.
 */
export async function checkCpuVendor(def: DomainDef, accel: 'kvm' | 'tcg', cpuinfo?: string): Promise<void> {
  const wanted = def.cpu?.vendor;
  if (!wanted || accel !== 'kvm') return;
  const text = cpuinfo ?? (await fs.readFile('/proc/cpuinfo', 'utf8'));
  const id = /^vendor_id\s*:\s*(\S+)/m.exec(text)?.[1] ?? 'unknown';
  if (CPU_VENDORS[id] !== wanted) {
    throw conflict('cpu_vendor_mismatch', `the guest's CPU is an ${wanted} model, this host's CPU is ${id}: under KVM the guest would see the host's vendor`, { element: '/domain/cpu/vendor' });
  }
}
