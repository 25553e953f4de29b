import type { Logger } from '../log.js';
import { TERMINAL_STREAM_STATUSES, type MigrationInfo, type MigrationMonitor } from '../qemu/migration-monitor.js';
import { ESCALATE_AFTER_MS, QEMU_DEFAULT_DOWNTIME_MS, type MigrationOptions } from './params.js';
import type { JobRegistry, MigrationStats, SourceJob } from './jobs.js';

const POLL_MS = 250;
/**
 * qemu 7.2 reports `completed` a moment before it has computed the stream's total time and
 * downtime (query-migrate then says 0): asked again this often, this many times.
 */
const FIGURES_RETRY_MS = 5;
const FIGURES_RETRIES = 100;

/** How a completed stream ended, as the source saw it (ms since the epoch). */
export interface StreamCompletion {
  /** The source vCPUs stopped for the switch-over (qemu's STOP), if that happened during the stream. */
  stoppedAt?: number;
  /** The source saw the stream complete. */
  endedAt: number;
}

/** The stream ended without completing: how the job ends, and why. */
export class StreamEnded extends Error {
  readonly status: 'failed' | 'cancelled';
  readonly code: string;
  constructor(status: 'failed' | 'cancelled', code: string, message: string) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export type ConvergenceAction = { kind: 'none' } | { kind: 'raise-downtime'; downtimeLimitMs: number } | { kind: 'cancel' };

/**
 * When a live stream is not converging, what to do about it. Progress is what remains reaching a
 * new low. Without progress for ESCALATE_AFTER_MS the downtime limit doubles, up to the caller's
 * maxDowntimeMs (a longer pause at switch-over, within what the caller accepted); without
 * progress for the progress timeout the stream is cancelled (the guest keeps running here)
 * instead of streaming for ever. Pure: the caller samples and carries the action out.
 */
export class ConvergencePolicy {
  downtimeLimitMs: number;
  lowestRemaining = Infinity;
  /** The policy cancelled the stream: it ends as not converging, not as cancelled by a caller. */
  gaveUp = false;
  private lastProgressAt: number;
  private readonly progressTimeoutMs: number;
  private readonly maxDowntimeMs?: number;

  constructor(options: Pick<MigrationOptions, 'progressTimeoutSeconds' | 'maxDowntimeMs' | 'downtimeLimitMs'>, now: number) {
    this.progressTimeoutMs = (options.progressTimeoutSeconds ?? 0) * 1000;
    if (options.maxDowntimeMs !== undefined) this.maxDowntimeMs = options.maxDowntimeMs;
    this.downtimeLimitMs = options.downtimeLimitMs ?? QEMU_DEFAULT_DOWNTIME_MS;
    this.lastProgressAt = now;
  }

  /** A sample of an active stream: `remaining` bytes at `now`. */
  observe(remaining: number, now: number): ConvergenceAction {
    const sinceProgress = now - this.lastProgressAt;
    if (remaining < this.lowestRemaining) {
      this.lowestRemaining = remaining;
      this.lastProgressAt = now;
      return { kind: 'none' };
    }
    if (this.maxDowntimeMs && this.downtimeLimitMs < this.maxDowntimeMs && sinceProgress > ESCALATE_AFTER_MS) {
      this.downtimeLimitMs = Math.min(this.downtimeLimitMs * 2, this.maxDowntimeMs);
      this.lastProgressAt = now;
      return { kind: 'raise-downtime', downtimeLimitMs: this.downtimeLimitMs };
    }
    if (this.progressTimeoutMs > 0 && !this.gaveUp && sinceProgress > this.progressTimeoutMs) {
      this.gaveUp = true;
      return { kind: 'cancel' };
    }
    return { kind: 'none' };
  }

  /** Why the stream ended after the policy cancelled it. */
  notConverging(): StreamEnded {
    return new StreamEnded(
      'failed',
      'not_converging',
      `no progress for ${this.progressTimeoutMs / 1000}s: the guest dirties memory faster than the stream carries it ` +
        `(never less than ${(this.lowestRemaining / 1048576).toFixed(1)} MiB left); try autoConverge, more bandwidth or a higher downtime limit`,
    );
  }
}

/**
 * Follow the source's stream (query-migrate, woken early by MIGRATION events) until it ends,
 * carrying out the convergence policy; the job's timings get the first byte and qemu's own
 * figures. Throws StreamEnded when the stream did not complete, or completed after a cancel was
 * answered (the destination resumes only on Finish2 rc=0, which is then never sent).
 */
export async function followStream(job: SourceJob, monitor: MigrationMonitor, deps: { jobs: JobRegistry; log: Logger }): Promise<StreamCompletion> {
  const { jobs, log } = deps;
  const policy = new ConvergencePolicy(job.record.options, Date.now());
  let wake: (() => void) | undefined;
  // An event that arrives while query-migrate is in flight must still cut the next wait short.
  let eventPending = false;
  let stoppedAt: number | undefined;
  const createdAt = Date.parse(job.record.createdAt);
  const streaming = () => {
    if (job.record.timings.firstByteMs === undefined) job.record.timings = { ...job.record.timings, firstByteMs: Date.now() - createdAt };
  };
  const unsubscribe = monitor.onMigrationEvent((e) => {
    if (e.kind === 'stopped') stoppedAt = e.atMs;
    else {
      if (e.status === 'active') streaming();
      eventPending = true;
      wake?.();
    }
  });
  try {
    for (;;) {
      eventPending = false;
      let info: MigrationInfo;
      try {
        info = await monitor.queryMigrate();
      } catch (err) {
        if (monitor.isClosed) throw new StreamEnded('failed', 'source_qemu_ended', 'the source qemu ended during the stream');
        throw err;
      }
      // A cancelled or failed stream reports no RAM figures: keep the last ones seen.
      const previous = job.record.stats;
      jobs.setStats(job, { ...(info.ram || !previous ? toStats(info) : { ...previous, qemuStatus: info.status }), downtimeLimitMs: policy.downtimeLimitMs });
      if (info.status === 'active') streaming();
      if (info.status === 'active' && info.ram) {
        const action = policy.observe(info.ram.remainingBytes, Date.now());
        if (action.kind === 'raise-downtime') {
          await monitor.setParameters({ 'downtime-limit': action.downtimeLimitMs });
          log.info({ migration: job.id, downtimeLimitMs: action.downtimeLimitMs }, 'stream not converging; downtime limit raised');
        } else if (action.kind === 'cancel') {
          await monitor.cancelMigration();
        }
      }
      if (TERMINAL_STREAM_STATUSES.has(info.status)) {
        if (info.status === 'completed' && !job.record.cancelRequested) {
          const endedAt = Date.now();
          const figures = await completedFigures(monitor, info);
          job.record.timings = {
            ...job.record.timings,
            ...(figures.totalTimeMs ? { qemuTotalMs: figures.totalTimeMs } : {}),
            ...(figures.downtimeMs ? { qemuDowntimeMs: figures.downtimeMs } : {}),
            ...(figures.setupTimeMs !== undefined ? { qemuSetupMs: figures.setupTimeMs } : {}),
          };
          return { ...(stoppedAt !== undefined ? { stoppedAt } : {}), endedAt };
        }
        if (policy.gaveUp && !job.record.cancelRequested) throw policy.notConverging();
        if (info.status === 'cancelled' || job.record.cancelRequested) throw new StreamEnded('cancelled', 'cancelled', 'the stream was cancelled');
        throw new StreamEnded('failed', 'stream_failed', `the stream failed: ${info.errorDesc ?? 'no reason given by qemu'}`);
      }
      if (eventPending) continue;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, POLL_MS);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  } finally {
    unsubscribe();
  }
}

/**
 * qemu's figures of a completed stream, asked again while they still read 0 (see
 * FIGURES_RETRY_MS); a figure still 0 after that is left out of the record, never stored as 0.
 */
async function completedFigures(monitor: MigrationMonitor, info: MigrationInfo): Promise<MigrationInfo> {
  let figures = info;
  for (let i = 0; i < FIGURES_RETRIES && !(figures.totalTimeMs && figures.downtimeMs); i++) {
    await new Promise((r) => setTimeout(r, FIGURES_RETRY_MS));
    const again = await monitor.queryMigrate().catch(() => undefined);
    if (again?.status !== 'completed') break;
    figures = again;
  }
  return figures;
}

export function toStats(info: MigrationInfo): MigrationStats {
  const ram = info.ram;
  const transferred = ram?.transferredBytes ?? 0;
  const total = ram?.totalBytes ?? 0;
  const remaining = ram?.remainingBytes ?? 0;
  return {
    qemuStatus: info.status,
    transferredBytes: transferred,
    remainingBytes: remaining,
    totalBytes: total,
    throughputBytesPerSec: Math.round(((ram?.mbps ?? 0) * 1e6) / 8),
    dirtyPagesRate: ram?.dirtyPagesRate ?? 0,
    iterations: ram?.iterations ?? 0,
    ...(info.expectedDowntimeMs !== undefined ? { expectedDowntimeMs: info.expectedDowntimeMs } : {}),
    percent: info.status === 'completed' ? 100 : total > 0 ? Math.min(99, Math.floor(((total - remaining) / total) * 100)) : 0,
  };
}
