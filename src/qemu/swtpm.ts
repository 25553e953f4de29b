/**
 * swtpm, the TPM emulator behind a guest's `<tpm>`: started before its qemu and as qemu's own
 * user (qemu connects to its control socket), detached like qemu, found again by pid + start
 * time, and ended only by pid. It ends by itself too once qemu closes the control channel
 * (--terminate), whichever way qemu went.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { execa } from 'execa';
import type { TpmPcrBank, TpmVersion } from '../domain/index.js';
import { pidfileOwner, ProcessStartError, readLogTail, runningIdentity, spawnDetached, terminateProcess, type QemuCredentials } from './process.js';

export interface SwtpmLaunch {
  version: TpmVersion;
  /** The TPM's persistent state (prepareTpmState's stateDir). */
  stateDir: string;
  /** The control socket swtpm listens on and qemu connects to. */
  socketPath: string;
  pidfilePath: string;
  /** swtpm's and swtpm_setup's output is appended here. */
  logPath: string;
  credentials?: QemuCredentials;
  /**
   * The state is new: manufacture the TPM first (endorsement keys, NVRAM locked), as libvirt
   * has swtpm_setup do. Not for an incoming migration: qemu brings that TPM's state along.
   */
  manufacture?: { vmid: string };
  /** PCR banks to activate: at manufacture, or by reconfiguring an existing TPM 2.0 state. */
  pcrBanks?: TpmPcrBank[];
  /** Until the control socket is there; default 10 s. */
  startTimeoutMs?: number;
}

export interface SwtpmRecord {
  pid: number;
  /** /proc/<pid>/stat field 22: tells this swtpm from a later process with the same pid. */
  startTime: number;
  socketPath: string;
  pidfilePath: string;
}

/** swtpm or swtpm_setup failed. */
export class SwtpmStartError extends ProcessStartError {}

const SWTPM = 'swtpm';
const SWTPM_SETUP = 'swtpm_setup';
const DEFAULT_START_TIMEOUT_MS = 10_000;
const SETUP_TIMEOUT_MS = 60_000;
const GRACE_MS = 3000;
const POLL_MS = 10;
/** swtpm's state file names by version (tpm2-00.permall, tpm-00.permall): what tells a manufactured state. */
const STATE_FILE = { '2.0': 'tpm2-00.permall', '1.2': 'tpm-00.permall' } as const;

/**
 * A domain's TPM directory (`<state>/tpm/<uuid>`), with the state of each version in a
 * directory of its own, as libvirt keeps it (1.2 and 2.0 states are not interchangeable). Made
 * (0700) if missing and handed, with what is in it, to the user this start's swtpm runs as
 * (users are allocated per start). Where the state is, and whether it holds a TPM already.
 */
export async function prepareTpmState(domainDir: string, version: TpmVersion, credentials: QemuCredentials | undefined): Promise<{ stateDir: string; manufactured: boolean }> {
  const stateDir = path.join(domainDir, version === '2.0' ? 'tpm2' : 'tpm1.2');
  for (const dir of [domainDir, stateDir]) {
    await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
    await fsp.chmod(dir, 0o700);
  }
  if (credentials) await chownTree(domainDir, credentials.uid, credentials.gid);
  return { stateDir, manufactured: fs.existsSync(path.join(stateDir, STATE_FILE[version])) };
}

/**
 * Gives the state of a stopped TPM back to the agent's user: the uid that ran it may soon be
 * another guest's, which must not reach this one's TPM.
 */
export async function releaseTpmState(domainDir: string): Promise<void> {
  if (!fs.existsSync(domainDir)) return;
  await chownTree(domainDir, process.getuid?.() ?? 0, process.getgid?.() ?? 0);
}

/** Runs swtpm_setup when asked, then starts swtpm; resolves once its control socket exists. */
export async function launchSwtpm(l: SwtpmLaunch): Promise<SwtpmRecord> {
  for (const p of [l.stateDir, l.socketPath, l.pidfilePath]) {
    // swtpm's own option syntax has no escape for a comma.
    if (p.includes(',')) throw new Error(`swtpm cannot be given a path with a comma: ${p}`);
  }
  const owner = pidfileOwner(l.pidfilePath);
  if (owner !== null) throw new Error(`swtpm pid ${owner} is still running with pidfile ${l.pidfilePath}`);
  await removeFiles(l);

  const logFd = fs.openSync(l.logPath, 'a');
  let logStart: number;
  let child: ReturnType<typeof spawnDetached>;
  try {
    logStart = fs.fstatSync(logFd).size;
    await runSetup(l, logFd, logStart);
    const argv = swtpmArgv(l);
    fs.writeSync(logFd, `${new Date().toISOString()} starting: ${[SWTPM, ...argv].join(' ')}\n`);
    child = spawnDetached(SWTPM, argv, logFd, [], l.credentials);
  } finally {
    fs.closeSync(logFd);
  }
  const pid = child.pid;
  if (pid === undefined) {
    const result = await child;
    throw new SwtpmStartError(`could not start ${SWTPM}`, result.shortMessage ?? '');
  }
  const fail = async (message: string): Promise<never> => {
    // Our unreaped child until `child` settles: this pid cannot have been reused.
    if (child.exitCode === null && child.signalCode === null) process.kill(pid, 'SIGKILL');
    await child;
    await removeFiles(l);
    throw new SwtpmStartError(message, await readLogTail(l.logPath, logStart));
  };

  const deadline = Date.now() + (l.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS);
  // Not by connecting: a control connection that closes would end swtpm (--terminate).
  while (!(isSocket(l.socketPath) && readPid(l.pidfilePath) === pid)) {
    if (child.exitCode !== null || child.signalCode !== null) return fail(`swtpm exited during startup (${child.signalCode ? `signal ${child.signalCode}` : `exit code ${child.exitCode}`})`);
    if (Date.now() > deadline) return fail(`swtpm did not create ${l.socketPath} within ${l.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS} ms`);
    await sleep(POLL_MS);
  }
  const identity = runningIdentity(pid);
  if (identity === null) return fail(`swtpm pid ${pid} vanished right after startup`);
  child.unref();
  return { ...identity, socketPath: l.socketPath, pidfilePath: l.pidfilePath };
}

/** Ends the recorded swtpm (if it has not ended with its qemu already) and removes its socket and pidfile. */
export async function killSwtpm(rec: SwtpmRecord): Promise<void> {
  await terminateProcess(rec, GRACE_MS);
  if (pidfileOwner(rec.pidfilePath) === null) await removeFiles(rec);
}

/** libvirt's swtpm command line, in the foreground (the agent tracks the pid it starts). */
function swtpmArgv(l: SwtpmLaunch): string[] {
  return [
    'socket',
    '--ctrl', `type=unixio,path=${l.socketPath},mode=0600`,
    '--tpmstate', `dir=${l.stateDir},mode=0600`,
    // stdout is the log file, which the agent opened: swtpm's user may not write in logs/.
    '--log', 'fd=1',
    '--terminate',
    '--pid', `file=${l.pidfilePath}`,
    ...(l.version === '2.0' ? ['--tpm2'] : []),
  ];
}

/** swtpm_setup as swtpm's own user: manufacture a new TPM, or set the PCR banks of an existing TPM 2.0. */
async function runSetup(l: SwtpmLaunch, logFd: number, logStart: number): Promise<void> {
  const tpm2 = l.version === '2.0' ? ['--tpm2'] : [];
  const banks = l.pcrBanks && l.version === '2.0' ? ['--pcr-banks', l.pcrBanks.join(',')] : [];
  let args: string[];
  if (l.manufacture) {
    // No EK certificate: that needs a CA (swtpm_localca) whose key every guest's user could read.
    args = [...tpm2, '--tpm-state', l.stateDir, '--vmid', l.manufacture.vmid, '--createek', '--lock-nvram', '--not-overwrite', ...banks];
  } else if (banks.length > 0) {
    args = [...tpm2, '--tpm-state', l.stateDir, ...banks, '--reconfigure'];
  } else {
    return;
  }
  fs.writeSync(logFd, `${new Date().toISOString()} running: ${[SWTPM_SETUP, ...args].join(' ')}\n`);
  const fd = logFd as 3;
  const result = await execa(SWTPM_SETUP, args, {
    stdio: ['ignore', fd, fd] as unknown as ['ignore', 3, 3],
    reject: false,
    timeout: SETUP_TIMEOUT_MS,
    ...l.credentials,
    // No home of its own: swtpm_setup reads the host's /etc/swtpm_setup.conf, no user's.
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/nonexistent' },
    extendEnv: false,
  });
  if (result.exitCode !== 0) {
    throw new SwtpmStartError(`${SWTPM_SETUP} failed (${result.timedOut ? 'timed out' : result.signal ? `signal ${result.signal}` : `exit code ${result.exitCode}`})`, await readLogTail(l.logPath, logStart));
  }
}

/** Hands a TPM state directory and its files to uid:gid, never following a symlink in it. */
async function chownTree(dir: string, uid: number, gid: number): Promise<void> {
  await fsp.lchown(dir, uid, gid);
  for (const entry of await fsp.readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) await chownTree(full, uid, gid);
    else await fsp.lchown(full, uid, gid);
  }
}

function isSocket(p: string): boolean {
  try {
    return fs.lstatSync(p).isSocket();
  } catch {
    return false;
  }
}

function readPid(p: string): number | undefined {
  try {
    return Number.parseInt(fs.readFileSync(p, 'utf8'), 10);
  } catch {
    return undefined;
  }
}

async function removeFiles(f: { socketPath: string; pidfilePath: string }): Promise<void> {
  await Promise.all([fsp.rm(f.socketPath, { force: true }), fsp.rm(f.pidfilePath, { force: true })]);
}
