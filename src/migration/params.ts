import { isIP } from 'node:net';
import { isUnspecified } from '../config.js';
import { badRequest } from '../errors.js';
/**
 * Migration flags and tuning parameters: what the caller may ask for, and how each maps onto
 * qemu's migration capabilities and parameters (migrate-set-capabilities/-parameters).
 */
export interface MigrationOptions {
  /** Live (default): the guest runs while memory streams. Offline: paused first, then streamed. */
  live: boolean;
  /** Leave the guest paused on the destination instead of resuming it. */
  paused: boolean;
  /** Store the definition on the destination (otherwise it arrives as a transient domain). */
  persistDestination: boolean;
  /** Remove the definition from the source once the destination owns the guest. */
  undefineSource: boolean;
  /** Stream bandwidth limit in MiB/s; absent: unlimited. */
  bandwidthMiBps?: number;
  /** Longest pause the guest may see at switch-over, in ms (qemu's downtime-limit). */
  downtimeLimitMs?: number;
  /**
   * Convergence may throttle the guest's vCPUs (qemu's auto-converge) once the downtime schedule
   * is spent and the stream still stalls; false: never.
   */
  autoConverge: boolean;
  /** Cancel the stream (the guest stays on the source) when what remains has not reached a new low for this long; 0: never. */
  progressTimeoutSeconds: number;
  /**
   * Convergence: when the stream makes no progress, raise the downtime limit step by step (x2)
   * up to this many ms, so a busy guest can still switch over; at or below downtimeLimitMs the
   * limit never moves.
   */
  maxDowntimeMs?: number;
  /**
   * Convergence's throttle step as a dirty-rate limit (MiB/s per vCPU, qemu's
   * set-vcpu-dirty-limit) instead of auto-converge: only the vCPUs that write are slowed. qemu
   * 7.2 has it only under KVM with a dirty ring; where qemu refuses it, the step falls back to
   * auto-converge (the job's stats say why).
   */
  dirtyLimitMiBps?: number;
  /** The completion deadline: this many seconds per GiB of guest RAM from the stream's start; 0: none. */
  completionTimeoutPerGiBSeconds: number;
  /**
   * At the completion deadline: `pause` stops the guest so the rest of its memory copies without
   * being dirtied again (it runs on at the destination after a long pause), `abort` cancels the
   * stream (the guest keeps running here; not_converging). Postcopy is not offered yet.
   */
  deadlineAction: DeadlineAction;
  /** `tcp://host:port`: the destination listens there instead of on a port from its range. */
  desturi?: string;
}

export type DeadlineAction = 'pause' | 'abort';

export const DEFAULT_OPTIONS: MigrationOptions = {
  live: true,
  paused: false,
  persistDestination: true,
  undefineSource: false,
  autoConverge: true,
  // KubeVirt's default: long enough for any converging stream to make a new low.
  progressTimeoutSeconds: 150,
  maxDowntimeMs: 1000,
  // KubeVirt's completionTimeoutPerGiB.
  completionTimeoutPerGiBSeconds: 150,
  deadlineAction: 'abort',
};

/** JSON schema of the options, shared by /perform (caller) and /prepare2 (source agent). */
export const migrationOptionsSchema = {
  type: 'object',
  additionalProperties: false,
  properties: {
    live: { type: 'boolean', default: true },
    paused: { type: 'boolean', default: false, description: 'arrive paused on the destination' },
    persistDestination: { type: 'boolean', default: true },
    undefineSource: { type: 'boolean', default: false },
    bandwidthMiBps: { type: 'integer', minimum: 1, maximum: 1048576 },
    downtimeLimitMs: { type: 'integer', minimum: 1, maximum: 2000000 },
    autoConverge: { type: 'boolean', default: DEFAULT_OPTIONS.autoConverge, description: 'convergence may throttle the vCPUs (auto-converge) once the downtime schedule is spent' },
    progressTimeoutSeconds: { type: 'integer', minimum: 0, maximum: 86400, default: DEFAULT_OPTIONS.progressTimeoutSeconds },
    maxDowntimeMs: { type: 'integer', minimum: 1, maximum: 2000000, default: DEFAULT_OPTIONS.maxDowntimeMs, description: 'the top of the downtime-limit schedule' },
    dirtyLimitMiBps: { type: 'integer', minimum: 1, maximum: 1048576, description: 'throttle step as a per-vCPU dirty-rate limit (KVM with a dirty ring only; else auto-converge)' },
    completionTimeoutPerGiBSeconds: { type: 'integer', minimum: 0, maximum: 86400, default: DEFAULT_OPTIONS.completionTimeoutPerGiBSeconds },
    // 'postcopy' is the next value to come; until then the schema refuses it (400 invalid_request).
    deadlineAction: { type: 'string', enum: ['pause', 'abort'], default: DEFAULT_OPTIONS.deadlineAction },
    desturi: { type: 'string', pattern: '^tcp://[^/:]+:[0-9]{1,5}$' },
  },
} as const;

/** qemu's default downtime-limit, the starting point when the caller gives none. */
export const QEMU_DEFAULT_DOWNTIME_MS = 300;
/** How long without a new low before the downtime limit is raised (convergence). */
export const ESCALATE_AFTER_MS = 3000;

// qemu's own default is 32 MiB/s, far below any modern link; unlimited unless asked, as libvirt does.
const UNLIMITED_BYTES_PER_SEC = 1024 ** 4;

/**
 * Auto-converge is a capability qemu takes only before the stream starts, but its throttle
 * bounds may change at any time: it is switched on held at 1% (no slower than an unthrottled
 * guest in practice) and engaged by the convergence policy when its turn comes. qemu throttles
 * after two dirty-sync iterations in which the guest dirtied more than half of what was sent.
 */
const AUTO_CONVERGE_HELD = { 'cpu-throttle-initial': 1, 'cpu-throttle-increment': 1, 'max-cpu-throttle': 1 };
export const AUTO_CONVERGE_ENGAGED = { 'cpu-throttle-initial': 20, 'cpu-throttle-increment': 10, 'max-cpu-throttle': 99 };

export function sourceCapabilities(o: MigrationOptions): Array<{ capability: string; state: boolean }> {
  return [
    { capability: 'events', state: true },
    { capability: 'auto-converge', state: o.autoConverge },
  ];
}

/** The destination needs `events` to report the stream's progress; nothing else must match here. */
export function destinationCapabilities(): Array<{ capability: string; state: boolean }> {
  return [{ capability: 'events', state: true }];
}

export function sourceParameters(o: MigrationOptions): Record<string, number> {
  return {
    'max-bandwidth': o.bandwidthMiBps ? o.bandwidthMiBps * 1024 * 1024 : UNLIMITED_BYTES_PER_SEC,
    ...(o.downtimeLimitMs ? { 'downtime-limit': o.downtimeLimitMs } : {}),
    ...(o.autoConverge ? AUTO_CONVERGE_HELD : {}),
  };
}

/**
 * The stream address from a destination's Prepare2 answer, and the only URI the source gives
 * qemu's `migrate`: rebuilt from a checked host and port, so nothing a peer writes (`exec:`,
 * `unix:`, `fd:`, `file:`, `rdma:`, options after the port) ever reaches qemu. `host` is the
 * address without brackets: what the destination's TLS certificate must name.
 */
export function streamUriFromPeer(answer: unknown): { uri: string; host: string } {
  const m = typeof answer === 'string' ? /^tcp:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$/.exec(answer) : null;
  const host = m?.[1] ?? '';
  const bare = host.replace(/^\[|\]$/g, '');
  const port = Number(m?.[2]);
  // An address literal must be a valid one; anything else must be a DNS name, not digits and dots.
  const validHost = host.startsWith('[') ? isIP(bare) === 6 : isIP(bare) === 4 || (/^[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$/.test(bare) && !/^[0-9.]+$/.test(bare));
  if (!m || !validHost || port < 1 || port > 65535 || isUnspecified(bare)) {
    throw new PeerProtocolError(`the destination answered a stream URI the source does not use: ${JSON.stringify(answer).slice(0, 120)} (only tcp:HOST:PORT)`);
  }
  return { uri: `tcp:${host}:${port}`, host: bare };
}

/** A peer that broke the protocol: its answer is refused, the migration fails on the source. */
export class PeerProtocolError extends Error {
  readonly code = 'bad_peer_answer';
  constructor(message: string) {
    super(message);
    this.name = 'PeerProtocolError';
  }
}

export function parseDestUri(desturi: string): { host: string; port: number } {
  const m = /^tcp:\/\/([^/:]+):(\d{1,5})$/.exec(desturi);
  const port = Number(m?.[2]);
  if (!m || port < 1 || port > 65535) throw badRequest('invalid_desturi', `desturi must be tcp://HOST:PORT with a port in 1-65535, got ${desturi}`);
  return { host: m[1]!, port };
}
