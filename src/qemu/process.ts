/**
 * qemu processes: started detached so that guests outlive the agent (a restart, a kill -9),
 * found again by pid + start time, and ended only by PID.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import type { UserfaultfdGrant } from './userfaultfd.js';
import { QmpClient, type QmpConnectOptions } from './qmp.js';

export interface QemuLaunch {
  binary: string;
  /**
   * The guest's command line. launchQemu appends `-pidfile pidfilePath` and a QMP monitor on
   * qmpSocketPath unless argv already has them (a `-pidfile` must then name pidfilePath).
   */
  argv: string[];
  /** qemu's stdout/stderr are appended here. */
  logPath: string;
  pidfilePath: string;
  qmpSocketPath: string;
  /** Until QMP answers; default 30 s. */
  startTimeoutMs?: number;
  /** Descriptors qemu gets as fd 3, 4, ... and, with -add-fd, as /dev/fdset/1, 2, ... */
  passFds?: number[];
  /** Descriptors qemu gets after passFds, without -add-fd (which closes the original). */
  plainFds?: number[];
  /** Whom qemu runs as; absent: the agent's own user. */
  credentials?: QemuCredentials;
  /** /dev/userfaultfd, opened, for a qemu that receives a postcopy (see userfaultfd.ts): given last, with its preload. */
  userfaultfd?: UserfaultfdGrant;
}

/** The ids a qemu is started with (set before exec, so qemu itself never changes user). */
export interface QemuCredentials {
  uid: number;
  gid: number;
}

/** What tells one process from a later one with the same pid. */
export type ProcessIdentity = Pick<QemuProcessRecord, 'pid' | 'startTime'>;

export interface QemuProcessRecord {
  pid: number;
  /** /proc/<pid>/stat field 22 (clock ticks after boot): tells our qemu from a reused pid. */
  startTime: number;
  qmpSocketPath: string;
  pidfilePath: string;
  binary: string;
  /** Whom it runs as, when not the agent's own user. */
  credentials?: QemuCredentials;
}

/** A process the agent starts (qemu, swtpm) did not come up; `logTail` is what it wrote meanwhile (its own error text). */
export class ProcessStartError extends Error {
  readonly logTail: string;
  constructor(message: string, logTail: string) {
    super(logTail ? `${message}: ${logTail}` : message);
    this.name = new.target.name;
    this.logTail = logTail;
  }
}

/** qemu did not come up. */
export class QemuStartError extends ProcessStartError {}

const DEFAULT_START_TIMEOUT_MS = 30_000;
const DEFAULT_GRACE_MS = 10_000;
// After SIGKILL only uninterruptible I/O (D state) delays the exit; libvirt waits about as long.
const KILL_WAIT_MS = 15_000;
// Exit polling: often done within milliseconds of the request (it is on the path of every
// migration's end), so look soon at first, then back off.
const EXIT_POLL_FIRST_MS = 2;
const EXIT_POLL_MAX_MS = 25;
/** Once its monitor socket closed, qemu is within a millisecond or two of gone. */
const EXIT_POLL_WOKEN_MS = 1;
const LOG_TAIL_BYTES = 4096;
const QMP_CHARDEV_ID = 'kvmm-qmp';

export async function launchQemu(l: QemuLaunch): Promise<{ record: QemuProcessRecord; qmp: QmpClient }> {
  const argv = [...l.argv, ...controlArgs(l)];
  await removeStaleFiles(l);

  const logFd = fs.openSync(l.logPath, 'a');
  let logStart: number;
  let child: ReturnType<typeof spawnDetached>;
  try {
    fs.writeSync(logFd, `${new Date().toISOString()} starting: ${[l.binary, ...argv].join(' ')}\n`);
    logStart = fs.fstatSync(logFd).size;
    const fds = [...(l.passFds ?? []), ...(l.plainFds ?? [])];
    // The preload finds the device by its number in qemu (stdio takes 0-2).
    const env = l.userfaultfd ? { LD_PRELOAD: l.userfaultfd.preload, KVM_MIGRATE_USERFAULTFD_FD: String(3 + fds.length) } : undefined;
    child = spawnDetached(l.binary, argv, logFd, l.userfaultfd ? [...fds, l.userfaultfd.deviceFd] : fds, l.credentials, env);
  } finally {
    // The child holds its own copy of the descriptor.
    fs.closeSync(logFd);
  }
  const pid = child.pid;
  if (pid === undefined) {
    const result = await child;
    throw new QemuStartError(`could not start ${l.binary}`, result.shortMessage ?? '');
  }

  const fail = async (message: string): Promise<never> => {
    // qemu is our child and unreaped until `child` settles, so this pid cannot have been reused.
    if (child.exitCode === null && child.signalCode === null) process.kill(pid, 'SIGKILL');
    await child;
    await removeFiles(l);
    throw new QemuStartError(message, await readLogTail(l.logPath, logStart));
  };

  const abort = new AbortController();
  let qmp: QmpClient;
  try {
    qmp = await Promise.race([
      QmpClient.connect(l.qmpSocketPath, { connectTimeoutMs: l.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS, signal: abort.signal }),
      child.then((r) => {
        throw new Error(`qemu exited during startup (${r.signal ? `signal ${r.signal}` : `exit code ${r.exitCode}`})`);
      }),
    ]);
  } catch (err) {
    abort.abort();
    return fail((err as Error).message);
  }
  const record = readProcessRecord(pid, l);
  if (typeof record === 'string') {
    await qmp.close();
    return fail(record);
  }
  // Only now: until here the child handle must keep the event loop alive for `fail`.
  child.unref();
  return { record, qmp };
}

/** True while the recorded qemu runs: the pid is alive (not a zombie) and started when recorded. */
export function processMatches(rec: ProcessIdentity): boolean {
  const st = readProcStat(rec.pid);
  return st !== null && isRunningState(st.state) && st.startTime === rec.startTime;
}

/** Re-attach to a qemu after an agent restart; null when the process is gone. */
export async function attachQemu(rec: QemuProcessRecord, opts?: QmpConnectOptions): Promise<QmpClient | null> {
  if (!processMatches(rec)) return null;
  try {
    return await QmpClient.connect(rec.qmpSocketPath, opts);
  } catch (err) {
    if (!processMatches(rec)) return null;
    throw err;
  }
}

/**
 * Asks qemu to quit (QMP `quit` when a live client is given, else SIGTERM), SIGKILLs it after
 * graceMs, waits until it is really gone, then removes its socket and pidfile.
 */
export async function killQemu(rec: QemuProcessRecord, opts?: { graceMs?: number; qmp?: QmpClient }): Promise<void> {
  const graceMs = opts?.graceMs ?? DEFAULT_GRACE_MS;
  if (processMatches(rec)) {
    const deadline = Date.now() + graceMs;
    const qmp = opts?.qmp;
    const quitSent =
      qmp !== undefined && !qmp.isClosed && (await qmp.execute('quit', undefined, { timeoutMs: Math.max(graceMs, 1) }).then(() => true, () => false));
    if (!quitSent) signal(rec, 'SIGTERM');
    if (!(await waitForExit(rec, Math.max(deadline - Date.now(), 0), qmp?.closed))) {
      signal(rec, 'SIGKILL');
      if (!(await waitForExit(rec, KILL_WAIT_MS))) throw new Error(`qemu pid ${rec.pid} is still alive ${KILL_WAIT_MS} ms after SIGKILL`);
    }
  }
  await removeQemuFiles(rec);
}

/**
 * Ends a process that is not qemu (no QMP to ask): SIGTERM, SIGKILL after graceMs, until it is
 * really gone. Each signal goes only to the very process recorded.
 */
export async function terminateProcess(rec: ProcessIdentity, graceMs: number): Promise<void> {
  if (!processMatches(rec)) return;
  signal(rec, 'SIGTERM');
  if (await waitForExit(rec, graceMs)) return;
  signal(rec, 'SIGKILL');
  if (!(await waitForExit(rec, KILL_WAIT_MS))) throw new Error(`pid ${rec.pid} is still alive ${KILL_WAIT_MS} ms after SIGKILL`);
}

/** The identity of a live process (not a zombie), or null. */
export function runningIdentity(pid: number): ProcessIdentity | null {
  const st = readProcStat(pid);
  return st !== null && isRunningState(st.state) ? { pid, startTime: st.startTime } : null;
}

/** Removes the socket and pidfile of an ended qemu (a killed one leaves them). */
export async function removeQemuFiles(rec: QemuProcessRecord): Promise<void> {
  // A newer qemu may have been started on the same paths since: its files are not ours to remove.
  if (pidfileOwner(rec.pidfilePath) === null) await removeFiles(rec);
}

/**
 * Ends, by pid, a qemu or swtpm that no record tracks but its pidfile names (the agent died
 * between starting it and writing its record). Only a live process started with this very
 * pidfile is ended, so a reused pid is left alone. The pid it ended, or null.
 */
export async function endPidfileOwner(pidfilePath: string): Promise<number | null> {
  const pid = pidfileOwner(pidfilePath);
  const owner = pid === null ? null : runningIdentity(pid);
  if (owner === null) return null;
  signal(owner, 'SIGKILL');
  if (!(await waitForExit(owner, KILL_WAIT_MS))) throw new Error(`pid ${owner.pid} (pidfile ${pidfilePath}) is still alive ${KILL_WAIT_MS} ms after SIGKILL`);
  return owner.pid;
}

/**
 * Polls /proc until the recorded qemu is gone; false if it still runs after timeoutMs. `wake`:
 * a sign the exit is near (qemu's monitor socket closing, which comes at its end): the polls
 * start again from the shortest.
 */
export async function waitForExit(rec: ProcessIdentity, timeoutMs: number, wake?: Promise<unknown>): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  let woken = false;
  const near = wake?.then(() => {
    woken = true;
  });
  for (let pollMs = EXIT_POLL_FIRST_MS; processMatches(rec); ) {
    if (Date.now() >= deadline) return false;
    const before = woken;
    await (near && !before ? Promise.race([sleep(pollMs), near]) : sleep(pollMs));
    pollMs = woken && !before ? EXIT_POLL_WOKEN_MS : Math.min(pollMs * 2, EXIT_POLL_MAX_MS);
  }
  return true;
}

/** Starts a process that outlives the agent, its output appended to logFd, as `credentials` when given. */
export function spawnDetached(binary: string, argv: string[], logFd: number, passFds: number[], credentials: QemuCredentials | undefined, env?: Record<string, string>) {
  // A raw descriptor, not execa's `{file}`: that pipes through this process, so qemu's output
  // (and qemu itself, on EPIPE) would depend on the agent staying alive. execa's types list
  // only descriptors up to 9, but any number is handed to spawn() unchanged.
  const fd = logFd as 3;
  const stdio = ['ignore', fd, fd, ...passFds] as unknown as ['ignore', 3, 3];
  // libuv drops the supplementary groups when it sets the ids: the group given is all qemu has.
  return execa(binary, argv, { detached: true, cleanup: false, stdio, reject: false, ...credentials, ...(env ? { env } : {}) });
}

function controlArgs(l: QemuLaunch): string[] {
  if (l.argv.includes('-daemonize')) throw new Error('qemu argv must not contain -daemonize: the agent tracks the pid it starts');
  const extra: string[] = [];
  (l.passFds ?? []).forEach((_, i) => extra.push('-add-fd', `fd=${3 + i},set=${i + 1}`));
  const p = l.argv.indexOf('-pidfile');
  if (p === -1) extra.push('-pidfile', l.pidfilePath);
  else if (l.argv[p + 1] !== l.pidfilePath) {
    throw new Error(`qemu argv has -pidfile ${l.argv[p + 1]}, but the launch names ${l.pidfilePath}`);
  }
  const sockOpt = `path=${l.qmpSocketPath.replaceAll(',', ',,')}`;
  const hasQmp = l.argv.some((a) => `,${a},`.includes(`,${sockOpt},`) || a.startsWith(`unix:${l.qmpSocketPath}`));
  if (!hasQmp) {
    extra.push('-chardev', `socket,id=${QMP_CHARDEV_ID},${sockOpt},server=on,wait=off`, '-mon', `chardev=${QMP_CHARDEV_ID},mode=control`);
  }
  return extra;
}

/**
 * Clears a socket/pidfile left by a qemu that died without cleanup (SIGKILL, or a failed start,
 * which leaves the socket). Refuses when a live qemu still uses them: deleting its socket would
 * make that guest unreachable.
 */
async function removeStaleFiles(l: QemuLaunch): Promise<void> {
  const owner = pidfileOwner(l.pidfilePath);
  if (owner !== null) throw new Error(`qemu pid ${owner} is still running with pidfile ${l.pidfilePath}`);
  await removeFiles(l);
}

/** The pid the pidfile names, if that process is alive and was started with this pidfile. */
export function pidfileOwner(pidfilePath: string): number | null {
  let pid: number;
  try {
    pid = Number.parseInt(fs.readFileSync(pidfilePath, 'utf8'), 10);
  } catch {
    return null;
  }
  const st = readProcStat(pid);
  // qemu's `-pidfile PATH`, swtpm's `--pid file=PATH`.
  const named = readCmdline(pid).some((a) => a === pidfilePath || a === `file=${pidfilePath}`);
  return st !== null && isRunningState(st.state) && named ? pid : null;
}

async function removeFiles(f: { qmpSocketPath: string; pidfilePath: string }): Promise<void> {
  await Promise.all([fsp.rm(f.qmpSocketPath, { force: true }), fsp.rm(f.pidfilePath, { force: true })]);
}

/** The record of a qemu that just answered QMP, or why it cannot be trusted. */
function readProcessRecord(pid: number, l: QemuLaunch): QemuProcessRecord | string {
  const st = readProcStat(pid);
  if (st === null) return `qemu pid ${pid} vanished right after startup`;
  // qemu writes its pidfile before it creates the QMP socket, so it is there by now.
  let fromFile = '';
  try {
    fromFile = fs.readFileSync(l.pidfilePath, 'utf8').trim();
  } catch {
    // reported below
  }
  if (fromFile !== String(pid)) return `pidfile ${l.pidfilePath} holds '${fromFile}', expected qemu's pid ${pid}`;
  return { pid, startTime: st.startTime, qmpSocketPath: l.qmpSocketPath, pidfilePath: l.pidfilePath, binary: l.binary, ...(l.credentials ? { credentials: l.credentials } : {}) };
}

function signal(rec: ProcessIdentity, sig: NodeJS.Signals): void {
  // Checked right before sending so a pid reused since the last poll is never hit.
  if (!processMatches(rec)) return;
  try {
    process.kill(rec.pid, sig);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

function readProcStat(pid: number): { state: string; startTime: number } | null {
  // pid 0 or negative would address process groups in kill(); never treat them as a qemu.
  if (!Number.isSafeInteger(pid) || pid <= 1) return null;
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // comm (field 2) may contain spaces and parentheses; the fields after its last ')' are plain.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { state: fields[0] ?? '', startTime: Number(fields[19]) };
}

// A zombie has exited already; it only waits to be reaped by its parent.
function isRunningState(state: string): boolean {
  return state !== 'Z' && state !== 'X';
}

function readCmdline(pid: number): string[] {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return [];
  }
}

export async function readLogTail(logPath: string, from: number): Promise<string> {
  try {
    const fh = await fsp.open(logPath, 'r');
    try {
      const { size } = await fh.stat();
      const start = Math.max(from, size - LOG_TAIL_BYTES);
      const buf = Buffer.alloc(size - start);
      await fh.read(buf, 0, buf.length, start);
      return buf.toString('utf8').trim();
    } finally {
      await fh.close();
    }
  } catch {
    return '';
  }
}
