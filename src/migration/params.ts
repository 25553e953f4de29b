import { isIP } from 'node:net';
import { isUnspecified } from '../config.js';
import { AgentError, badRequest } from '../errors.js';
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
   * stream (the guest keeps running here; not_converging), `postcopy` switches the stream to
   * postcopy (needs allowPostcopy; the default when it is given). Absent: postcopy where the
   * stream is set up for it (the transport's `postcopy`), else abort (DEFAULT_DEADLINE_ACTION).
   */
  deadlineAction?: DeadlineAction;
  /**
   * The stream may switch to postcopy: the guest runs on at the destination at once and pulls
   * the pages it still lacks from the source. Convergence switches once the downtime schedule is
   * spent (instead of throttling the guest), at the deadline, or on POST /jobs/{id}/complete.
   * qemu 7.2 carries postcopy on one plain stream only (no multifd, no compression), and the
   * destination's qemu needs userfaultfd. `true`: one plain stream, and a destination that
   * cannot take postcopy refuses the migration (409 postcopy_unavailable). `false`: never.
   * Absent: where the stream is one plain stream anyway (see offerTransport) and the destination
   * can take it, the policy may switch to postcopy as its last resort (the transport's `postcopy`).
   */
  allowPostcopy?: boolean;
  /**
   * A postcopy stream that broke (both qemus pause, neither copy is whole) is recovered by the
   * agents, attempt after attempt, for this long from the break; then the job waits for an
   * operator's POST /jobs/{id}/recover. Neither qemu is ever ended meanwhile.
   */
  postcopyRecoverySeconds: number;
  /** `tcp://host:port`: the destination listens there instead of on a port from its range. */
  desturi?: string;
  /**
   * At most this many parallel stream connections (qemu's multifd); absent: the agent's choice
   * (see channelLimit). Both ends take the lower of the two agents' limits (see agreeTransport).
   */
  multifdChannels?: number;
  /** Compress the stream's pages (zstd, on the multifd channels; both ends must agree). */
  compression: StreamCompression;
  /** Send re-dirtied pages as deltas against a cache of what was sent (qemu's xbzrle; the source alone). */
  xbzrle: boolean;
}

export type StreamCompression = 'none' | 'zstd';

/** What may change while a job streams (PATCH /jobs/{id}). */
export type StreamTuning = Partial<Pick<MigrationOptions, 'bandwidthMiBps' | 'downtimeLimitMs'>>;

/** The qemu parameters a tuning sets. */
export function tuningParameters(t: StreamTuning): Record<string, number> {
  return {
    // qemu has a limit of its own for the pages a postcopy sends unasked (0: unlimited): the caller's limit holds there too.
    ...(t.bandwidthMiBps !== undefined ? { 'max-bandwidth': t.bandwidthMiBps * 1024 * 1024, 'max-postcopy-bandwidth': t.bandwidthMiBps * 1024 * 1024 } : {}),
    ...(t.downtimeLimitMs !== undefined ? { 'downtime-limit': t.downtimeLimitMs } : {}),
  };
}

export type DeadlineAction = 'pause' | 'abort' | 'postcopy';

/** At the deadline of a stream not set up for postcopy, unless the caller said otherwise: the guest is safe where it is. */
export const DEFAULT_DEADLINE_ACTION: DeadlineAction = 'abort';

export const DEFAULT_OPTIONS: MigrationOptions = {
  live: true,
  paused: false,
  persistDestination: true,
  undefineSource: false,
  autoConverge: true,
  // KubeVirt's default: long enough for any converging stream to make a new low.
  progressTimeoutSeconds: 150,
  compression: 'none',
  xbzrle: false,
  maxDowntimeMs: 1000,
  // KubeVirt's completionTimeoutPerGiB.
  completionTimeoutPerGiBSeconds: 150,
  postcopyRecoverySeconds: 300,
};

/**
 * A bandwidth cap at or below this is one plain stream's work: multifd gains nothing under it. One
 * stream carried 1.4 GiB/s on this project's 2-core test host (README, The transport); QEMU's
 * own figure for one stream is about 1.2 GiB/s (10 Gbit/s, CPU bound).
 */
export const ONE_STREAM_MIBPS = 512;

/**
 * The most channels a caller may ask for (qemu takes up to 255): each is a connection and a
 * thread on both ends, and an agent's own limit (channelLimit) caps what it uses anyway.
 */
export const MAX_MULTIFD_CHANNELS = 64;

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
    deadlineAction: { type: 'string', enum: ['pause', 'abort', 'postcopy'], description: 'at the completion deadline; default postcopy where the stream is set up for it (allowPostcopy, or the transport armed it), else abort; postcopy needs allowPostcopy' },
    allowPostcopy: {
      type: 'boolean',
      description:
        'true: the stream may switch to postcopy (convergence, the deadline, POST /jobs/{id}/complete), on one plain stream (qemu 7.2 has no multifd postcopy), ' +
        'and a destination that cannot take it refuses (409 postcopy_unavailable); false: never; absent: postcopy is armed where the stream is one plain stream anyway ' +
        `(one channel, or bandwidthMiBps at most ${ONE_STREAM_MIBPS}) and the destination can take it (the job's transport.postcopy says whether it was)`,
    },
    postcopyRecoverySeconds: {
      type: 'integer',
      minimum: 1,
      maximum: 86400,
      default: DEFAULT_OPTIONS.postcopyRecoverySeconds,
      description: 'how long the agents try, by themselves, to recover a postcopy stream that broke; then POST /jobs/{id}/recover',
    },
    desturi: { type: 'string', pattern: '^tcp://[^/:]+:[0-9]{1,5}$' },
    multifdChannels: {
      type: 'integer',
      minimum: 1,
      maximum: MAX_MULTIFD_CHANNELS,
      description: 'at most this many parallel stream connections (multifd); absent: the agents choose (each end caps it at its own limit, GET /host migrationChannels); 1: one plain stream',
    },
    compression: { type: 'string', enum: ['none', 'zstd'], default: 'none', description: "zstd: compress the stream's pages on the multifd channels (both ends agree in Prepare2)" },
    xbzrle: { type: 'boolean', default: false, description: 'send re-dirtied pages as deltas (xbzrle); one plain stream, qemu 7.2 does not combine it with multifd' },
  },
} as const;

/** The options a source tells the destination in Prepare2: without the transport's, which travel as its offer. */
export const peerOptionsSchema = {
  ...migrationOptionsSchema,
  properties: Object.fromEntries(
    Object.entries(migrationOptionsSchema.properties).filter(([k]) => !['multifdChannels', 'compression', 'xbzrle'].includes(k)),
  ),
};

/** A StreamTransport: Prepare2's offer and answer, and the jobs' record of it. */
export const streamTransportSchema = {
  $id: 'StreamTransport',
  type: 'object',
  description: "how the stream is carried, as both ends set it: the source offers one in Prepare2, the destination answers what it set (the lower channel count of the two agents' limits), the source sets exactly that",
  required: ['multifd', 'channels', 'compression'],
  additionalProperties: false,
  properties: {
    multifd: { type: 'boolean', description: "qemu's multifd capability; false: one plain stream" },
    channels: { type: 'integer', minimum: 1, maximum: MAX_MULTIFD_CHANNELS },
    compression: { type: 'string', enum: ['none', 'zstd'] },
    postcopy: { type: 'boolean', description: 'both qemus have postcopy-ram on: the stream may switch to postcopy; in an offer, asked for (the answer says whether the destination could); absent: false' },
  },
} as const;

/** qemu's default downtime-limit, the starting point when the caller gives none. */
export const QEMU_DEFAULT_DOWNTIME_MS = 300;
/** How long without a new low before the downtime limit is raised (convergence). */
export const ESCALATE_AFTER_MS = 3000;

// qemu's own default is 32 MiB/s, far below any modern link; unlimited unless asked, as libvirt does.
const UNLIMITED_BYTES_PER_SEC = 1024 ** 4;

/**
 * How the stream is carried, as both ends set it: the source offers one in Prepare2, the
 * destination answers the one it set on its qemu, and the source sets exactly that on its own.
 * Both qemus must agree on every field, or the stream fails (multifd channels are refused by a
 * plain listener, compressed pages cannot be read by one that expects them raw).
 */
export interface StreamTransport {
  /** qemu's multifd: `channels` parallel connections; false: the one plain stream (channels 1). */
  multifd: boolean;
  channels: number;
  compression: StreamCompression;
  /**
   * Both qemus have postcopy-ram on: the stream may switch to postcopy. In an offer: asked for
   * (the destination answers whether it could); absent: false.
   */
  postcopy?: boolean;
}

/** What an agent older than the agreement streams: the destination's answer has no transport. */
export const PLAIN_STREAM: StreamTransport = { multifd: false, channels: 1, compression: 'none' };

/** KubeVirt's parallel migration connections, and where this project's measurements stopped gaining. */
const DEFAULT_CHANNEL_CAP = 8;

/**
 * An agent's channel limit, for both directions, unless the operator set one
 * (--migration-channels: the link's cap, which no NIC speed tells: it is the path's). A plain
 * stream's channel mostly waits on its socket (qemu hands the kernel guest pages, no copy of its
 * own), so channels are not bound by cores: 8, which on a 2-core host streamed faster than 4,
 * 2 or 1 (README, The transport). Under TLS each channel encrypts on a core: one per core, at
 * most 8. A migration uses the lower of the two agents' limits (agreeTransport).
 */
export function channelLimit(cores: number, tls: boolean, configured?: number): number {
  return configured ?? (tls ? Math.max(1, Math.min(cores, DEFAULT_CHANNEL_CAP)) : DEFAULT_CHANNEL_CAP);
}

function transportOf(channels: number, compression: StreamCompression): StreamTransport {
  // Compression runs on the multifd channels, so it needs multifd even on one channel.
  return { multifd: channels > 1 || compression !== 'none', channels, compression };
}

/**
 * What the source offers: the caller's channels (or its limit), capped at its limit; xbzrle keeps
 * one plain stream. Postcopy: asked for with allowPostcopy, and, unless the caller said false,
 * wherever the stream is one plain stream anyway: on one channel, or under a bandwidth cap one
 * stream carries. There it costs nothing until the policy needs it, and it is what finishes a
 * guest that rewrites its memory faster than the link takes it (qemu 7.2 cannot combine it
 * with multifd, so a fast link keeps multifd and its policy has no postcopy).
 */
export function offerTransport(o: MigrationOptions, limit: number): StreamTransport {
  // qemu 7.2 sends multifd pages without xbzrle (with multifd on, xbzrle would cache and never
  // encode), and its postcopy runs on the one plain stream.
  if (o.allowPostcopy === true) return { ...transportOf(1, o.compression), postcopy: true };
  const slowLink = o.bandwidthMiBps !== undefined && o.bandwidthMiBps <= ONE_STREAM_MIBPS && o.multifdChannels === undefined;
  const channels = o.xbzrle || slowLink ? 1 : Math.min(o.multifdChannels ?? limit, limit);
  const offer = transportOf(channels, o.compression);
  return o.allowPostcopy === undefined && !offer.multifd ? { ...offer, postcopy: true } : offer;
}

/** The stream may switch to postcopy: asked for, or armed by the transport's agreement. */
export function postcopyArmed(o: Pick<MigrationOptions, 'allowPostcopy'>, t: StreamTransport | undefined): boolean {
  return o.allowPostcopy === true || t?.postcopy === true;
}

/** Options qemu 7.2 cannot combine, refused before anything is sent. */
export function checkTransportOptions(o: Partial<MigrationOptions>): void {
  if (o.xbzrle && (o.compression === 'zstd' || (o.multifdChannels ?? 1) > 1)) {
    throw badRequest('conflicting_options', 'xbzrle runs on one plain stream (qemu 7.2 sends multifd pages without it): it excludes compression and multifdChannels above 1');
  }
  if (o.allowPostcopy && (o.compression === 'zstd' || (o.multifdChannels ?? 1) > 1)) {
    throw badRequest('conflicting_options', 'postcopy runs on one plain stream (qemu 7.2 has no multifd postcopy): allowPostcopy excludes compression and multifdChannels above 1');
  }
  if (o.deadlineAction === 'postcopy' && !o.allowPostcopy) {
    throw badRequest('conflicting_options', 'deadlineAction postcopy needs allowPostcopy');
  }
}

/** The caller's options over the defaults: with allowPostcopy and no deadline action of its own, the deadline switches to postcopy. */
export function migrationOptions(asked: Partial<MigrationOptions>): MigrationOptions {
  return { ...DEFAULT_OPTIONS, ...(asked.allowPostcopy && asked.deadlineAction === undefined ? { deadlineAction: 'postcopy' as const } : {}), ...asked };
}

/**
 * The destination's answer to an offer: the lower channel count of the two agents, the offer's
 * compression; postcopy where offered and `postcopy` (this host's qemu can take it).
 */
export function acceptTransport(offer: StreamTransport, limit: number, postcopy: boolean): StreamTransport {
  const answer = transportOf(Math.min(offer.channels, limit), offer.compression);
  return offer.postcopy && !answer.multifd ? { ...answer, postcopy } : answer;
}

/**
 * What the source sets, from the destination's answer to its offer: exactly what the destination
 * set, so the two qemus cannot disagree. No answer is a destination older than the agreement,
 * whose qemu listens plain: one plain stream, unless compression was asked (it needs both ends).
 * An answer the offer does not allow is a peer breaking the protocol.
 */
export function agreedTransport(offer: StreamTransport, answer: unknown): StreamTransport {
  if (answer === undefined) {
    if (offer.compression !== 'none') {
      throw new AgentError(409, 'compression_unsupported', `the destination does not agree on the stream's transport (an agent older than it): ${offer.compression} compression needs both ends`);
    }
    return PLAIN_STREAM;
  }
  const a = (typeof answer === 'object' && answer !== null ? answer : {}) as Partial<StreamTransport>;
  const channels = a.channels;
  const postcopyAllowed = a.postcopy === undefined || a.postcopy === false || (a.postcopy === true && offer.postcopy === true && channels === 1);
  if (typeof channels !== 'number' || !Number.isInteger(channels) || channels < 1 || channels > offer.channels || a.compression !== offer.compression || a.multifd !== transportOf(channels, offer.compression).multifd || !postcopyAllowed) {
    throw new PeerProtocolError(`the destination answered a stream transport its offer does not allow: ${JSON.stringify(answer).slice(0, 200)} (offered ${JSON.stringify(offer)})`);
  }
  const agreed = transportOf(channels, offer.compression);
  return offer.postcopy ? { ...agreed, postcopy: a.postcopy === true } : agreed;
}

/*
 * Capabilities and parameters, one row each: set on the source, the destination or both. A
 * capability is always set, on or off: a qemu that arrived with multifd on keeps it for its next
 * migration out otherwise.
 */
function transportCapabilities(t: StreamTransport): Array<{ capability: string; state: boolean }> {
  return [{ capability: 'multifd', state: t.multifd }];
}

function transportParameters(t: StreamTransport): Record<string, number | string> {
  return t.multifd ? { 'multifd-channels': t.channels, 'multifd-compression': t.compression } : {};
}

/**
 * Auto-converge is a capability qemu takes only before the stream starts, but its throttle
 * bounds may change at any time: it is switched on held at 1% (no slower than an unthrottled
 * guest in practice) and engaged by the convergence policy when its turn comes. qemu throttles
 * after two dirty-sync iterations in which the guest dirtied more than half of what was sent.
 */
const AUTO_CONVERGE_HELD = { 'cpu-throttle-initial': 1, 'cpu-throttle-increment': 1, 'max-cpu-throttle': 1 };
export const AUTO_CONVERGE_ENGAGED = { 'cpu-throttle-initial': 20, 'cpu-throttle-increment': 10, 'max-cpu-throttle': 99 };

export function sourceCapabilities(o: MigrationOptions, t: StreamTransport): Array<{ capability: string; state: boolean }> {
  return [
    { capability: 'events', state: true },
    // Set on both ends before the stream starts; the switch itself is migrate-start-postcopy.
    { capability: 'postcopy-ram', state: postcopyArmed(o, t) },
    { capability: 'auto-converge', state: o.autoConverge },
    // The destination reads xbzrle pages whatever its own capability says.
    { capability: 'xbzrle', state: o.xbzrle },
    ...transportCapabilities(t),
  ];
}

/** The destination needs `events` to report the stream's progress, and the transport the source streams with. */
export function destinationCapabilities(t: StreamTransport): Array<{ capability: string; state: boolean }> {
  return [{ capability: 'events', state: true }, ...transportCapabilities(t)];
}

/** Set on its own at the destination: it is the one capability a host may lack (qemu needs userfaultfd to receive postcopy). */
export const POSTCOPY_CAPABILITY = [{ capability: 'postcopy-ram', state: true }];

export function sourceParameters(o: MigrationOptions, t: StreamTransport): Record<string, number | string> {
  return {
    'max-bandwidth': o.bandwidthMiBps ? o.bandwidthMiBps * 1024 * 1024 : UNLIMITED_BYTES_PER_SEC,
    // qemu's limit for the pages a postcopy sends unasked; 0 (its default) is unlimited.
    'max-postcopy-bandwidth': o.bandwidthMiBps ? o.bandwidthMiBps * 1024 * 1024 : 0,
    ...(o.downtimeLimitMs ? { 'downtime-limit': o.downtimeLimitMs } : {}),
    ...transportParameters(t),
    ...(o.autoConverge ? AUTO_CONVERGE_HELD : {}),
  };
}

export function destinationParameters(t: StreamTransport): Record<string, number | string> {
  return transportParameters(t);
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
