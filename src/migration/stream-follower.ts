import type { Logger } from '../log.js';
import { TERMINAL_STREAM_STATUSES, type MigrationInfo, type MigrationMonitor } from '../qemu/migration-monitor.js';
import { AUTO_CONVERGE_ENGAGED, postcopyArmed } from './params.js';
import { ConvergencePolicy, type ConvergenceAction } from './convergence.js';
import { EtaCountdown } from './forecast.js';
import { streamAddressOf } from './stream-sockets.js';
import { Wakeup } from './wakeup.js';
import type { JobRegistry, JobTimings, MigrationStats, SourceJob } from './jobs.js';

const POLL_MS = 250;
/**
 * A cancelled stream normally ends within a poll; one still going after this is blocked on a peer
 * that takes no bytes, and its connections are reset (resetStream).
 */
const CANCEL_SETTLE_MS = 5000;
/** qemu counts dirty pages of this size (x86's). */
const PAGE_BYTES = 4096;
/**
 * qemu 7.2 reports `completed` a moment before it has computed the stream's total time and
 * downtime (query-migrate then says 0 for both): asked again this often, this many times.
 */
const FIGURES_RETRY_MS = 5;
const FIGURES_RETRIES = 100;

/** How a completed stream ended, as the source saw it (ms since the epoch). */
export interface StreamCompletion {
  /** The source vCPUs stopped for the switch-over (qemu's STOP), if that happened during the stream. */
  stoppedAt?: number;
  /** The source saw the stream complete. */
  endedAt: number;
  /** query-migrate's answer that said so. */
  info: MigrationInfo;
}

/** The stream left pre-copy for postcopy: the job goes on in phase `postcopy` (see postcopy.ts). */
export interface PostcopySwitch {
  postcopy: true;
  /** The source vCPUs stopped for the switch (qemu's STOP), when seen. */
  stoppedAt?: number;
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

/**
 * Follow the source's stream (query-migrate, woken early by MIGRATION events) until it ends,
 * carrying out the convergence policy; the job's timings get the first byte and qemu's own
 * figures. Throws StreamEnded when the stream did not complete, or completed after a cancel was
 * answered (the destination resumes only on Finish2 rc=0, which is then never sent). Returns a
 * PostcopySwitch once `switchToPostcopy` (the phase written, then qemu told) said it switched.
 */
export async function followStream(
  job: SourceJob,
  monitor: MigrationMonitor,
  deps: { jobs: JobRegistry; log: Logger; resetStream: (host: string, port: number) => Promise<void> },
  switchToPostcopy: () => Promise<boolean>,
): Promise<StreamCompletion | PostcopySwitch> {
  const { jobs, log } = deps;
  let cancelledAt: number | undefined;
  let connectionsReset = false;
  const policy = new ConvergencePolicy(job.record.options, Date.now(), postcopyArmed(job.record.options, job.record.transport));
  let tunedDowntimeMs = job.record.options.downtimeLimitMs;
  const countdown = new EtaCountdown();
  const wakeup = new Wakeup();
  let stoppedAt: number | undefined;
  let completing = false;
  const createdAt = Date.parse(job.record.createdAt);
  const streaming = () => {
    if (job.record.timings.firstByteMs === undefined) job.record.timings = { ...job.record.timings, firstByteMs: Date.now() - createdAt };
  };
  const unsubscribe = monitor.onMigrationEvent((e) => {
    if (e.kind === 'stopped') stoppedAt = e.atMs;
    else {
      if (e.status === 'active') streaming();
      wakeup.wake();
    }
  });
  try {
    for (;;) {
      let info: MigrationInfo;
      try {
        info = await monitor.queryMigrate();
      } catch (err) {
        if (monitor.isClosed) throw new StreamEnded('failed', 'source_qemu_ended', 'the source qemu ended during the stream');
        throw err;
      }
      // A cancelled or failed stream reports no RAM figures: keep the last ones seen.
      const previous = job.record.stats;
      // The policy's state as of the previous sample: what it does about this one shows at the next.
      const eta = info.status === 'active' && info.ram
        ? countdown.update({
            remainingBytes: info.ram.remainingBytes,
            dirtyRateBytesPerSec: info.ram.dirtyPagesRate * PAGE_BYTES,
            streamRateBytesPerSec: (info.ram.mbps * 1e6) / 8,
            downtimeLimitMs: policy.downtimeLimitMs,
          }, Date.now())
        : undefined;
      jobs.setStats(job, {
        ...statsOf(info, previous),
        downtimeLimitMs: policy.downtimeLimitMs,
        convergence: policy.state(),
        ...(eta !== undefined ? { etaMs: eta } : {}),
      });
      if (info.status === 'active') streaming();
      if (job.record.options.downtimeLimitMs !== tunedDowntimeMs && job.record.options.downtimeLimitMs !== undefined) {
        tunedDowntimeMs = job.record.options.downtimeLimitMs;
        policy.tuned(tunedDowntimeMs);
      }
      if (info.status === 'active' && info.ram) {
        const { remainingBytes, transferredBytes, totalBytes } = info.ram;
        let action = policy.observe({ remainingBytes, transferredBytes, totalBytes, ...(info.cpuThrottlePercent !== undefined ? { cpuThrottlePercent: info.cpuThrottlePercent } : {}) }, Date.now());
        const asked = job.record.completeRequested;
        if (asked && !completing) {
          // The caller's word comes before the policy's: it ends the ladder.
          completing = true;
          policy.completing(asked.mode);
          action = { kind: asked.mode };
          log.info({ migration: job.id, mode: asked.mode }, 'completing the stream as asked');
        }
        if (action.kind === 'postcopy') {
          // Written with the switch's phase: the policy's last step is the switch.
          if (job.record.stats) jobs.setStats(job, { ...job.record.stats, convergence: policy.state() });
          if (await switchToPostcopy()) return { postcopy: true, ...(stoppedAt !== undefined ? { stoppedAt } : {}) };
        } else await carryOut(action, policy, monitor, job, log);
      }
      if ((job.record.cancelRequested || policy.gaveUp) && cancelledAt === undefined) cancelledAt = Date.now();
      if (cancelledAt !== undefined && !connectionsReset && !TERMINAL_STREAM_STATUSES.has(info.status) && Date.now() - cancelledAt > CANCEL_SETTLE_MS && job.record.uri) {
        connectionsReset = true;
        log.warn({ migration: job.id, qemuStatus: info.status }, 'the cancelled stream does not end: its peer takes no bytes; resetting its connections');
        const { host, port } = streamAddressOf(job.record.uri);
        await deps.resetStream(host, port).catch((err: unknown) => log.error({ err, migration: job.id }, 'could not reset the stream\'s connections'));
      }
      if (TERMINAL_STREAM_STATUSES.has(info.status)) {
        if (info.status === 'completed' && !job.record.cancelRequested) {
          // The guest is paused until Finish2: qemu's figures are not waited for here (qemuFigures).
          return { ...(stoppedAt !== undefined ? { stoppedAt } : {}), endedAt: Date.now(), info };
        }
        if (policy.gaveUp && !job.record.cancelRequested) throw new StreamEnded('failed', 'not_converging', policy.notConvergingMessage());
        if (info.status === 'cancelled' || job.record.cancelRequested) throw new StreamEnded('cancelled', 'cancelled', 'the stream was cancelled');
        throw new StreamEnded('failed', 'stream_failed', `the stream failed: ${info.errorDesc ?? 'no reason given by qemu'}`);
      }
      await wakeup.sleep(POLL_MS);
    }
  } finally {
    unsubscribe();
    // The limit outlives the stream in qemu: a guest that stays here must run unthrottled again.
    if (policy.state().dirtyLimit?.state === 'applied') await monitor.cancelDirtyLimit().catch((err: unknown) => log.warn({ err, migration: job.id }, 'could not lift the dirty-rate limit'));
  }
}

/** Carry out one convergence action over the monitor (a dirty limit qemu refuses falls through to the policy's next step). */
async function carryOut(action: ConvergenceAction, policy: ConvergencePolicy, monitor: MigrationMonitor, job: SourceJob, log: Logger): Promise<void> {
  const migration = job.id;
  switch (action.kind) {
    case 'none':
      return;
    case 'raise-downtime':
      await monitor.setParameters({ 'downtime-limit': action.downtimeLimitMs });
      log.info({ migration, downtimeLimitMs: action.downtimeLimitMs }, 'stream not converging; downtime limit raised');
      return;
    case 'limit-dirty-rate':
      try {
        await monitor.limitDirtyRate(action.mibPerSec);
      } catch (err) {
        log.info({ migration, reason: (err as Error).message }, 'qemu refused the dirty-rate limit; the throttle step falls back');
        await carryOut(policy.dirtyLimitRefused((err as Error).message), policy, monitor, job, log);
        return;
      }
      policy.dirtyLimitApplied();
      log.info({ migration, dirtyLimitMiBps: action.mibPerSec }, 'stream not converging; vCPU dirty rate limited');
      return;
    case 'engage-auto-converge':
      await monitor.setParameters(AUTO_CONVERGE_ENGAGED);
      log.info({ migration }, 'stream not converging; auto-converge engaged');
      return;
    case 'pause':
      await monitor.pause();
      log.warn({ migration }, 'the guest is paused so the rest of its memory copies (pause and finish)');
      return;
    case 'postcopy':
      return; // carried out by followStream itself: the phase is written first
    case 'cancel':
      await monitor.cancelMigration();
      return;
  }
}

/**
 * qemu's figures of a completed stream for the job's timings, asked again while the total time
 * still reads 0 (see FIGURES_RETRY_MS). qemu computes the total time and the downtime in one step,
 * so once the total is there a downtime of 0 is real: a pause under a millisecond, which qemu
 * counts in whole ones. A total still 0 after the retries is left out of the record with its
 * downtime, never stored as 0. Asked while Finish2 is under way or after it, so the wait is not
 * part of the guest's pause.
 */
export async function qemuFigures(monitor: MigrationMonitor | undefined, info: MigrationInfo): Promise<Pick<JobTimings, 'qemuTotalMs' | 'qemuDowntimeMs' | 'qemuSetupMs'>> {
  let figures = info;
  for (let i = 0; monitor && i < FIGURES_RETRIES && !figures.totalTimeMs; i++) {
    await new Promise((r) => setTimeout(r, FIGURES_RETRY_MS));
    const again = await monitor.queryMigrate().catch(() => undefined);
    if (again?.status !== 'completed') break;
    figures = again;
  }
  const computed = (figures.totalTimeMs ?? 0) > 0;
  return {
    ...(computed ? { qemuTotalMs: figures.totalTimeMs } : {}),
    ...(computed && figures.downtimeMs !== undefined ? { qemuDowntimeMs: figures.downtimeMs } : {}),
    ...(figures.setupTimeMs !== undefined ? { qemuSetupMs: figures.setupTimeMs } : {}),
  };
}

/** The stats of a sample; one without RAM figures (a cancelled or failed stream reports none) keeps the last ones seen. */
export function statsOf(info: MigrationInfo, previous: MigrationStats | undefined): MigrationStats {
  return info.ram || !previous ? toStats(info) : { ...previous, qemuStatus: info.status };
}

function toStats(info: MigrationInfo): MigrationStats {
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
