import { DEFAULT_DEADLINE_ACTION, DEFAULT_OPTIONS, ESCALATE_AFTER_MS, QEMU_DEFAULT_DOWNTIME_MS, type DeadlineAction, type MigrationOptions } from './params.js';
import type { JobRecord } from './jobs.js';

/**
 * Before a migration starts: how long it will take, how long the guest will pause, and whether a
 * pre-copy stream converges at all, from the guest's measured dirty rate and the stream rate
 * this agent expects to that destination. Nothing starts on the destination.
 */
export interface Forecast {
  domain: string;
  memoryBytes: number;
  /** qemu's calc-dirty-rate over `measuredForMs` (page sampling: any accelerator). */
  dirtyRateBytesPerSec: number;
  measuredForMs: number;
  /** The rate the stream is expected to run at, and where that figure comes from; absent when nothing tells. */
  streamRateBytesPerSec?: number;
  streamRateFrom: 'bandwidth-limit' | 'last-migration' | 'unknown';
  downtimeLimitMs: number;
  /** Absent when the stream rate is unknown. */
  precopy?: PrecopyForecast;
  /** What the convergence policy will end up doing (auto-converge's throttle is not modelled: it can only help). */
  strategy?: ForecastStrategy;
  /** What the migration will do, in words: precopy converging, or why it will not. */
  verdict: string;
}

export type ForecastStrategy =
  /** Pre-copy switches over within this downtime limit (the caller's, or one the schedule raises it to). */
  | { kind: 'precopy'; downtimeLimitMs: number }
  /** Pre-copy does not converge: the deadline action runs at `atMs` from the stream's start; pause and finish pauses the guest about `pauseMs`. */
  | { kind: 'deadline'; action: DeadlineAction; atMs: number; pauseMs?: number }
  /**
   * Pre-copy does not converge and postcopy is allowed: the stream switches after one pass and
   * the downtime schedule (`atMs`), and the rest of memory follows in about `postcopyMs` while the
   * guest runs at the destination.
   */
  | { kind: 'postcopy'; atMs: number; postcopyMs: number; predictedTotalMs: number }
  /** Nothing ends the stream but its progress timeout (no deadline): it is cancelled then. */
  | { kind: 'progress-timeout'; afterMs: number };

export interface PrecopyForecast {
  converges: boolean;
  /** Passes over memory until what is left fits the downtime limit (or the bound, when it never does). */
  iterations: number;
  predictedTotalMs?: number;
  predictedDowntimeMs?: number;
}

/** Passes a pre-copy stream is given in the model before it is declared not converging. */
const MAX_ITERATIONS = 30;

/**
 * The classic pre-copy model: the first pass sends all of memory; each next pass sends what the
 * guest dirtied while the previous one was under way (never more than all of memory); the stream
 * switches over when one pass fits the downtime limit. Pure.
 */
export function forecastPrecopy(p: { memoryBytes: number; dirtyRateBytesPerSec: number; streamRateBytesPerSec: number; downtimeLimitMs: number }): PrecopyForecast {
  let toSend = p.memoryBytes;
  let totalMs = 0;
  for (let iteration = 1; iteration <= MAX_ITERATIONS; iteration++) {
    const passMs = (toSend / p.streamRateBytesPerSec) * 1000;
    if (passMs <= p.downtimeLimitMs) return { converges: true, iterations: iteration, predictedTotalMs: Math.round(totalMs + passMs), predictedDowntimeMs: Math.round(passMs) };
    totalMs += passMs;
    toSend = Math.min(p.memoryBytes, (p.dirtyRateBytesPerSec * passMs) / 1000);
  }
  return { converges: false, iterations: MAX_ITERATIONS };
}

/**
 * While a stream runs: the time it has left, as a countdown that never rises. Each sample's
 * estimate is the pre-copy model's from what remains, the guest's dirty rate and the stream's
 * rate as qemu reports them; an estimate later than the countdown is not taken (a sawtooth of
 * pre-copy passes would make it jump), an earlier one is. Absent while the model says the stream
 * does not converge. Pure.
 */
export class EtaCountdown {
  private etaAt: number | undefined;

  /** The time left in ms after this sample, or undefined when it cannot be told. */
  update(s: { remainingBytes: number; dirtyRateBytesPerSec: number; streamRateBytesPerSec: number; downtimeLimitMs: number }, now: number): number | undefined {
    if (s.streamRateBytesPerSec <= 0) return this.left(now);
    const model = forecastPrecopy({ memoryBytes: s.remainingBytes, dirtyRateBytesPerSec: s.dirtyRateBytesPerSec, streamRateBytesPerSec: s.streamRateBytesPerSec, downtimeLimitMs: s.downtimeLimitMs });
    if (!model.converges) {
      this.etaAt = undefined;
      return undefined;
    }
    const estimate = now + model.predictedTotalMs!;
    if (this.etaAt === undefined || estimate < this.etaAt) this.etaAt = estimate;
    return this.left(now);
  }

  private left(now: number): number | undefined {
    return this.etaAt === undefined ? undefined : Math.max(0, Math.round(this.etaAt - now));
  }
}

/**
 * The stream rate this agent saw on its last completed outgoing migration to `destination`
 * (bytes sent over qemu's stream time), if any.
 */
export function lastStreamRate(jobs: readonly JobRecord[], destination: string): number | undefined {
  const origin = new URL(destination).origin;
  const done = jobs
    .filter((j) => j.role === 'source' && j.status === 'completed' && j.peer.url && new URL(j.peer.url).origin === origin && j.stats && j.timings.qemuTotalMs)
    .sort((x, y) => (y.endedAt ?? '').localeCompare(x.endedAt ?? ''));
  const last = done[0];
  return last ? Math.round((last.stats!.transferredBytes / last.timings.qemuTotalMs!) * 1000) : undefined;
}

/** The options a forecast reads; the rest of a migration's do not change its prediction. */
export type ForecastOptions = Partial<Pick<MigrationOptions, 'bandwidthMiBps' | 'downtimeLimitMs' | 'maxDowntimeMs' | 'deadlineAction' | 'completionTimeoutPerGiBSeconds' | 'progressTimeoutSeconds' | 'allowPostcopy'>>;

/** The convergence policy's ladder (src/migration/convergence.ts) as the model sees it: the downtime schedule, then the deadline. */
function policyStrategy(p: { memoryBytes: number; dirtyRateBytesPerSec: number; options: ForecastOptions; postcopyArmed: boolean }, rate: number, precopy: PrecopyForecast): ForecastStrategy {
  const o = { ...DEFAULT_OPTIONS, ...p.options };
  const start = o.downtimeLimitMs ?? QEMU_DEFAULT_DOWNTIME_MS;
  if (precopy.converges) return { kind: 'precopy', downtimeLimitMs: start };
  const top = Math.max(start, o.maxDowntimeMs ?? start);
  if (forecastPrecopy({ memoryBytes: p.memoryBytes, dirtyRateBytesPerSec: p.dirtyRateBytesPerSec, streamRateBytesPerSec: rate, downtimeLimitMs: top }).converges) {
    return { kind: 'precopy', downtimeLimitMs: top };
  }
  if (p.postcopyArmed) {
    // The policy's rungs: the first pass, then a stall of ESCALATE_AFTER_MS before each doubling of the downtime limit and before the switch.
    const doublings = Math.max(0, Math.ceil(Math.log2(top / start)));
    const atMs = Math.round((p.memoryBytes / rate) * 1000 + (doublings + 1) * ESCALATE_AFTER_MS);
    // After the switch each page crosses once: at most all of memory.
    const postcopyMs = Math.round((p.memoryBytes / rate) * 1000);
    return { kind: 'postcopy', atMs, postcopyMs, predictedTotalMs: atMs + postcopyMs };
  }
  if (o.completionTimeoutPerGiBSeconds > 0) {
    const atMs = Math.round((o.completionTimeoutPerGiBSeconds * 1000 * p.memoryBytes) / 1024 ** 3);
    // Paused, the guest dirties nothing: the rest is at most all of its memory.
    return o.deadlineAction === 'pause' ? { kind: 'deadline', action: 'pause', atMs, pauseMs: Math.round((p.memoryBytes / rate) * 1000) } : { kind: 'deadline', action: o.deadlineAction ?? DEFAULT_DEADLINE_ACTION, atMs };
  }
  return { kind: 'progress-timeout', afterMs: o.progressTimeoutSeconds * 1000 };
}

function describe(s: ForecastStrategy): string {
  switch (s.kind) {
    case 'precopy':
      return `the policy raises the downtime limit to ${s.downtimeLimitMs} ms, and it converges`;
    case 'deadline':
      return s.action === 'pause'
        ? `at the deadline (${s.atMs} ms) the guest is paused and the rest copied: a pause of up to ${s.pauseMs} ms`
        : `the migration is aborted at the deadline (${s.atMs} ms); the guest stays on the source`;
    case 'postcopy':
      return `the stream switches to postcopy after about ${s.atMs} ms and completes about ${s.postcopyMs} ms later, the guest running at the destination meanwhile`;
    case 'progress-timeout':
      return `the stream is cancelled after ${s.afterMs} ms without progress`;
  }
}

export function buildForecast(p: {
  domain: string;
  memoryBytes: number;
  dirtyRateBytesPerSec: number;
  measuredForMs: number;
  options: ForecastOptions;
  /** The stream would be set up for postcopy (see params.ts offerTransport); default: allowPostcopy. */
  postcopyArmed?: boolean;
  lastRateBytesPerSec?: number;
}): Forecast {
  const downtimeLimitMs = p.options.downtimeLimitMs ?? QEMU_DEFAULT_DOWNTIME_MS;
  const limit = p.options.bandwidthMiBps !== undefined ? p.options.bandwidthMiBps * 1048576 : undefined;
  // A limit caps what the link did last time; without either, nothing here knows the rate.
  const rate = limit !== undefined && p.lastRateBytesPerSec !== undefined ? Math.min(limit, p.lastRateBytesPerSec) : limit ?? p.lastRateBytesPerSec;
  const streamRateFrom = rate === undefined ? 'unknown' : rate === limit ? 'bandwidth-limit' : 'last-migration';
  const base = { domain: p.domain, memoryBytes: p.memoryBytes, dirtyRateBytesPerSec: p.dirtyRateBytesPerSec, measuredForMs: p.measuredForMs, streamRateFrom, downtimeLimitMs } as const;
  if (rate === undefined) {
    return { ...base, verdict: 'the stream rate is unknown: give bandwidthMiBps, or migrate once to this destination so its rate is known' };
  }
  const precopy = forecastPrecopy({ memoryBytes: p.memoryBytes, dirtyRateBytesPerSec: p.dirtyRateBytesPerSec, streamRateBytesPerSec: rate, downtimeLimitMs });
  const mib = (b: number) => (b / 1048576).toFixed(1);
  const strategy = policyStrategy({ ...p, postcopyArmed: p.postcopyArmed ?? p.options.allowPostcopy === true }, rate, precopy);
  const verdict = precopy.converges
    ? `pre-copy converges in ${precopy.iterations} pass(es): about ${precopy.predictedTotalMs} ms, the guest paused about ${precopy.predictedDowntimeMs} ms`
    : `pre-copy does not converge within a ${downtimeLimitMs} ms downtime limit: the guest dirties ${mib(p.dirtyRateBytesPerSec)} MiB/s against a stream of ${mib(rate)} MiB/s; ` +
      describe(strategy);
  return { ...base, streamRateBytesPerSec: rate, precopy, strategy, verdict };
}
