/**
 * Who each qemu runs as. A qemu parses guest-controlled input all day (device emulation, the
 * migration stream), so it must not be root, nor share a user with its neighbours: a guest that
 * takes over its qemu could then reach another guest's monitor socket, memory or files. By
 * default each qemu gets a user id of its own from a range no account uses (as systemd's
 * DynamicUser does), so one qemu can touch nothing of another's. All of them share one group:
 * /dev/kvm's, when that group may open it, so KVM keeps working.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';
import type { QemuCredentials } from '../qemu/process.js';

/** `dynamic`: a user id of its own per qemu; `root`: the agent's own user; else an account name. */
export type QemuUserSetting = 'dynamic' | 'root' | (string & {});

export interface UidRange {
  first: number;
  last: number;
}

/** Above the ranges systemd hands out (dynamic users, containers), below 2^31. */
export const DEFAULT_QEMU_UIDS: UidRange = { first: 1_879_900_000, last: 1_879_965_535 };

export function parseUidRange(value: string): UidRange {
  const m = /^(\d+)-(\d+)$/.exec(value);
  const first = Number(m?.[1]);
  const last = Number(m?.[2]);
  if (!m || first < 1000 || last >= 2 ** 31 - 1 || first > last) {
    throw new Error(`--qemu-uids must be FIRST-LAST within 1000-2147483646, got ${JSON.stringify(value)}`);
  }
  return { first, last };
}

/** The ids a default agent's qemu would get: what a measurement of KVM must run as. */
export async function defaultQemuCredentials(): Promise<QemuCredentials | undefined> {
  return (await QemuUsers.resolve('dynamic', DEFAULT_QEMU_UIDS)).probeCredentials();
}

export class QemuUsers {
  /** Handed out by launches still under way (their qemu may not be visible in /proc yet). */
  private readonly pending = new Set<number>();

  private constructor(
    readonly mode: 'agent' | 'account' | 'dynamic',
    private readonly fixed: QemuCredentials | undefined,
    private readonly range: UidRange,
    readonly gid: number,
    /** One line for GET /host and the start-up log. */
    readonly description: string,
  ) {}

  static async resolve(setting: QemuUserSetting, range: UidRange): Promise<QemuUsers> {
    const agentIsRoot = process.getuid?.() === 0;
    if (setting === 'root' || (!agentIsRoot && setting === 'dynamic')) {
      const who = agentIsRoot ? 'root (--qemu-user root): a guest that takes over its qemu owns the host' : `the agent's own user (uid ${process.getuid?.()}), as the agent is not root`;
      return new QemuUsers('agent', undefined, range, process.getgid?.() ?? 0, `qemu runs as ${who}`);
    }
    if (!agentIsRoot) throw new Error(`--qemu-user ${setting} needs an agent running as root (it starts qemu as that user)`);
    const gid = kvmGroup() ?? range.first;
    if (setting === 'dynamic') {
      return new QemuUsers('dynamic', undefined, range, gid, `each qemu runs as a user of its own (uids ${range.first}-${range.last}), group ${gid}`);
    }
    const account = await lookupAccount(setting);
    return new QemuUsers('account', account, range, account.gid, `qemu runs as ${setting} (uid ${account.uid}, gid ${account.gid})`);
  }

  /**
   * qemu writes its pidfile and binds its monitor socket in run/<uuid>/ (swtpm keeps its state
   * in tpm/<uuid>/), so their user must be able to pass through every directory above (search
   * only: it lists none of them). The state directory and the directories below it given
   * (run/, tpm/) are the agent's, and made so; a parent that is not is named.
   */
  async makeReachable(stateDir: string, runDir: string, ...more: string[]): Promise<void> {
    if (this.mode === 'agent') return;
    for (const dir of [stateDir, runDir, ...more]) {
      const st = await fsp.stat(dir);
      await fsp.chmod(dir, (st.mode & 0o777) | 0o001);
    }
    for (let dir = path.dirname(stateDir); ; dir = path.dirname(dir)) {
      const st = await fsp.stat(dir);
      if ((st.mode & 0o001) === 0 && !(st.gid === this.gid && (st.mode & 0o010) !== 0)) {
        throw new Error(
          `qemu runs as another user (--qemu-user ${this.mode === 'dynamic' ? 'dynamic' : 'NAME'}) and must reach ${runDir}, but ${dir} is mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}: let others pass through it (chmod o+x ${dir}), or use another --state-dir`,
        );
      }
      if (dir === path.dirname(dir)) break;
    }
  }

  /** Credentials for one qemu about to start; release() them if it does not. undefined: as the agent. */
  allocate(): QemuCredentials | undefined {
    if (this.mode === 'agent') return undefined;
    if (this.fixed) return this.fixed;
    const taken = uidsInUse();
    for (let uid = this.range.first; uid <= this.range.last; uid++) {
      if (taken.has(uid) || this.pending.has(uid)) continue;
      this.pending.add(uid);
      return { uid, gid: this.gid };
    }
    throw new Error(`every qemu user id in ${this.range.first}-${this.range.last} is in use (--qemu-uids)`);
  }

  /** Whom a short check of this host's qemu (does KVM open?) runs as: the ids a guest's qemu would get. */
  probeCredentials(): QemuCredentials | undefined {
    if (this.mode === 'agent') return undefined;
    return this.fixed ?? { uid: this.range.first, gid: this.gid };
  }

  /** The launch is over (qemu runs, and shows in /proc, or it failed). */
  release(creds: QemuCredentials | undefined): void {
    if (creds) this.pending.delete(creds.uid);
  }
}

/**
 * A fresh temporary directory for agents' state: others may pass through it (not list it), as
 * qemu's own user must to reach its run/ directory below (see QemuUsers.makeReachable).
 */
export async function mkdtempForAgents(prefix: string): Promise<string> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), prefix));
  await fsp.chmod(dir, 0o711);
  return dir;
}

/** A directory that only qemu's user may enter (0700, its own); the agent's own user when none. */
export async function makeQemuDir(dir: string, credentials: QemuCredentials | undefined): Promise<void> {
  await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
  await fsp.chmod(dir, 0o700);
  if (credentials) await fsp.chown(dir, credentials.uid, credentials.gid);
}

/** /dev/kvm's group, where that group may open it read-write (udev's usual root:kvm 0660). */
function kvmGroup(): number | undefined {
  try {
    const st = fs.statSync('/dev/kvm');
    return st.gid !== 0 && (st.mode & 0o060) === 0o060 ? st.gid : undefined;
  } catch {
    return undefined;
  }
}

async function lookupAccount(name: string): Promise<QemuCredentials> {
  const r = await execa('getent', ['passwd', name], { reject: false, timeout: 10_000 });
  const fields = r.stdout.trim().split(':');
  const uid = Number(fields[2]);
  const gid = Number(fields[3]);
  if (r.exitCode !== 0 || fields.length < 7 || !Number.isInteger(uid) || !Number.isInteger(gid)) {
    throw new Error(`--qemu-user ${name}: no such account (getent passwd ${name} found none)`);
  }
  if (uid === 0) throw new Error(`--qemu-user ${name} is root (uid 0): say --qemu-user root to mean it`);
  return { uid, gid };
}

/** The real user ids of every live process: a uid still held (by a qemu of a lost record too) is not reused. */
function uidsInUse(): Set<number> {
  const uids = new Set<number>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const status = fs.readFileSync(`/proc/${entry}/status`, 'utf8');
      const uid = /^Uid:\s+(\d+)/m.exec(status)?.[1];
      // A zombie has ended; it only waits to be reaped.
      if (uid !== undefined && !/^State:\s+Z/m.test(status)) uids.add(Number(uid));
    } catch {
      // gone since the listing
    }
  }
  return uids;
}
