import { QEMU_DEFAULT_DOWNTIME_MS, type MigrationOptions } from './params.js';
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
  /** What the migration will do, in words: precopy converging, or why it will not. */
  verdict: string;
}

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

export function buildForecast(p: {
  domain: string;
  memoryBytes: number;
  dirtyRateBytesPerSec: number;
  measuredForMs: number;
  options: Pick<MigrationOptions, 'bandwidthMiBps' | 'downtimeLimitMs'>;
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
  const verdict = precopy.converges
    ? `pre-copy converges in ${precopy.iterations} pass(es): about ${precopy.predictedTotalMs} ms, the guest paused about ${precopy.predictedDowntimeMs} ms`
    : `pre-copy does not converge: the guest dirties ${mib(p.dirtyRateBytesPerSec)} MiB/s against a stream of ${mib(rate)} MiB/s within a ${downtimeLimitMs} ms downtime limit`;
  return { ...base, streamRateBytesPerSec: rate, precopy, verdict };
}
