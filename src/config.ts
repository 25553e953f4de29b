import { isIP } from 'node:net';
import path from 'node:path';
import { HOLD_POINTS } from './migration/holds.js';
import { MAX_MULTIFD_CHANNELS } from './migration/params.js';
import type { TlsFiles } from './agent/tls.js';
import { DEFAULT_QEMU_UIDS, type QemuUserSetting, type UidRange } from './agent/qemu-user.js';

/** Everything an agent is told at start; one object so tests can build agents on port 0. */
export interface AgentConfig {
  listenHost: string;
  listenPort: number;
  stateDir: string;
  /** The operator credential; required (every route but /health demands it). */
  token?: string;
  /** Where this host's qemu listens for incoming migration streams. */
  migrationAddress: string;
  migrationPorts: { low: number; high: number };
  /** Disk images, kernels, serial/log files and sockets must lie below one of these (after realpath). */
  allowPaths: string[];
  accel: 'auto' | 'kvm' | 'tcg';
  /** Seconds a prepared destination waits for its stream to start, and for Finish2 after it ended. */
  incomingTimeoutSeconds: number;
  /**
   * Peer trust by certificates of the fleet's CA: HTTPS with mutual TLS, the protocol routes
   * only for a peer's certificate, qemu's stream over TLS. Without it, see `peers`.
   */
  tls?: TlsFiles;
  /**
   * Without TLS: the agent URLs this one may migrate to (origins). An agent on loopback may also
   * migrate to any loopback address (one machine, a test rig).
   */
  peers: string[];
  /** Domains the agent holds at most. */
  maxDomains: number;
  /** A guest's output file (serial log, chardev log) larger than this is truncated. */
  maxLogBytes: number;
  /** How often output files are measured (tests set it short). */
  logCheckIntervalMs?: number;
  /** Names (besides addresses, localhost and this host's name) callers may use in Host. */
  allowedHosts: string[];
  /** Receiving one request, headers and body, must end within this. */
  requestTimeoutMs: number;
  /** Largest request body, in bytes (domain XML included). */
  bodyLimitBytes: number;
  qemuBinary?: string;
  /** Whom qemu runs as (see src/agent/qemu-user.ts): dynamic (a user id per qemu), root, or an account. */
  qemuUser: QemuUserSetting;
  /** This host's qemus never receive a postcopy stream (none is handed userfaultfd): --no-postcopy. */
  refusePostcopy?: boolean;
  /** The user ids `dynamic` hands out. */
  qemuUids: UidRange;
  /** How many migrations may run at once on this agent, in each direction. */
  maxIncoming: number;
  maxOutgoing: number;
  /** The most multifd channels one migration uses here (the link's cap); absent: 8, with TLS one per core (at most 8). */
  migrationChannels?: number;
  /** Ended jobs kept per domain (newest first); older records are removed. */
  jobHistory: number;
  /** libvirt network name -> this host's bridge (`--network NAME=BRIDGE`), for `<interface type='network'>`. */
  networks?: Record<string, string>;
  /** Addresses a guest's VNC display may listen on besides loopback (`--graphics-listen`). */
  graphicsListen?: string[];
  /** Debug hold points for fault-injection rigs (see src/migration/holds.ts); empty in production. */
  debugHolds?: string[];
}

export const DEFAULTS = {
  listen: '127.0.0.1:7100',
  migrationPorts: '49152-49215',
  accel: 'auto' as const,
  incomingTimeoutSeconds: 60,
  bodyLimitBytes: 1024 * 1024,
  requestTimeoutMs: 30_000,
  maxDomains: 256,
  maxLogBytes: 64 * 1024 * 1024,
  maxIncoming: 4,
  maxOutgoing: 2,
  jobHistory: 20,
  qemuUser: 'dynamic' as QemuUserSetting,
  qemuUids: DEFAULT_QEMU_UIDS,
};

const NETWORK_NAME_RE = /^[A-Za-z0-9_.+-]{1,64}$/;
const BRIDGE_NAME_RE = /^[A-Za-z0-9_.:-]{1,15}$/;

/** `--network NAME=BRIDGE` values into the map (a name given twice is refused). */
export function parseNetworks(values: string[]): Record<string, string> {
  const map: Record<string, string> = {};
  for (const v of values) {
    const m = /^([^=]+)=([^=]+)$/.exec(v);
    if (!m || !NETWORK_NAME_RE.test(m[1]!) || !BRIDGE_NAME_RE.test(m[2]!)) throw new Error(`--network must be NAME=BRIDGE (a libvirt network name, a bridge's interface name), got ${JSON.stringify(v)}`);
    if (m[1]! in map) throw new Error(`--network ${m[1]} is given twice`);
    map[m[1]!] = m[2]!;
  }
  return map;
}

export function parseListen(value: string): { host: string; port: number } {
  const m = /^(?:\[([0-9a-fA-F:]+)\]|([^:]+)):(\d{1,5})$/.exec(value);
  if (!m) throw new Error(`--listen must be HOST:PORT, got ${JSON.stringify(value)}`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`--listen port out of range: ${port}`);
  return { host: m[1] ?? m[2]!, port };
}

export function parsePortRange(value: string): { low: number; high: number } {
  const m = /^(\d{1,5})-(\d{1,5})$/.exec(value);
  const low = Number(m?.[1]);
  const high = Number(m?.[2]);
  if (!m || low < 1 || high > 65535 || low > high) {
    throw new Error(`--migration-ports must be LOW-HIGH within 1-65535, got ${JSON.stringify(value)}`);
  }
  return { low, high };
}

export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}

/** 0.0.0.0, :: and the like: fine to listen on, meaningless to hand a peer. */
export function isUnspecified(host: string): boolean {
  const bare = host.replace(/^\[|\]$/g, '');
  return bare === '' || /^0+(\.0+){0,3}$/.test(bare) || /^[0:]*:[0:]*$/.test(bare);
}

/**
 * Checks that hold for every agent, whoever built the config: it demands a token, hands peers
 * an address they can reach, and the unix sockets under the state dir fit sun_path.
 */
export function validateConfig(config: AgentConfig): AgentConfig & { token: string } {
  // Loopback is no boundary: every local user, and any web page a local browser opens, reaches it.
  if (!config.token) {
    throw new Error('an agent needs an operator token: --token-file FILE (or KVM_MIGRATE_TOKEN / KVM_MIGRATE_TOKEN_FILE); e.g. (umask 077; head -c 32 /dev/urandom | base64 > /etc/kvm-migrate/token)');
  }
  if (isUnspecified(config.migrationAddress)) {
    throw new Error(
      `the migration address ${JSON.stringify(config.migrationAddress)} is no address a peer can reach (it is what Prepare2 hands the source to stream to); set --migration-address to this host's address on the migration network`,
    );
  }
  for (const peer of config.peers) {
    let url: URL | undefined;
    try {
      url = new URL(peer);
    } catch {
      // refused below
    }
    if (!url || (url.protocol !== 'http:' && url.protocol !== 'https:')) throw new Error(`--peer must be an agent URL (http://HOST:PORT), got ${peer}`);
  }
  if (!['auto', 'kvm', 'tcg'].includes(config.accel)) throw new Error(`--accel must be auto, kvm or tcg`);
  if (!(config.incomingTimeoutSeconds > 0)) throw new Error('--incoming-timeout must be a positive number of seconds');
  if (config.migrationChannels !== undefined && !(Number.isInteger(config.migrationChannels) && config.migrationChannels >= 1 && config.migrationChannels <= MAX_MULTIFD_CHANNELS)) {
    throw new Error(`--migration-channels must be a whole number from 1 to ${MAX_MULTIFD_CHANNELS}`);
  }
  for (const hold of config.debugHolds ?? []) {
    if (!(HOLD_POINTS as readonly string[]).includes(hold)) throw new Error(`--debug-hold must be one of ${HOLD_POINTS.join(', ')}`);
  }
  for (const [name, bridge] of Object.entries(config.networks ?? {})) {
    if (!NETWORK_NAME_RE.test(name) || !BRIDGE_NAME_RE.test(bridge)) throw new Error(`--network must be NAME=BRIDGE (a libvirt network name, a bridge's interface name), got ${name}=${bridge}`);
  }
  const stateDir = path.resolve(config.stateDir);
  // The longest socket below it, run/<uuid>/channelNNN.sock (a guest-agent channel without a
  // path; there are fewer than 1000 virtio-serial ports), must fit the 108-byte sun_path.
  if (Buffer.byteLength(path.join(stateDir, 'run', '0'.repeat(36), 'channel999.sock')) > 107) {
    throw new Error(`--state-dir path is too long for unix sockets below it: ${stateDir}`);
  }
  return { ...config, token: config.token, stateDir, allowPaths: config.allowPaths.map((p) => path.resolve(p)) };
}
