import { POSTCOPY_STREAM_STATUSES, TERMINAL_STREAM_STATUSES, type MigrationMonitor } from '../qemu/migration-monitor.js';
import { unhandledPhase } from './phases.js';
import { CRASHED_JOB_RETRY_MS, type SourceJob } from './jobs.js';
import type { MigratingDomain } from './domains.js';
import type { MigrationContext } from './protocol.js';
import type { Finish2Exchange } from './finish2-exchange.js';
import { StreamEnded } from './stream-follower.js';

/** The ways a source job ends, which recovery and crash handling drive it to (SourceSide's own steps). */
export interface SourceEndings {
  /** The destination owns the guest: end the paused copy here. */
  confirm(job: SourceJob, entry: MigratingDomain | undefined): Promise<void>;
  /** Tell the destination, run the guest here again if it ran before. */
  rollBack(job: SourceJob, entry: MigratingDomain | undefined, why: StreamEnded): Promise<void>;
  /** The stream completed: ask the destination who owns the guest. */
  finishCompleted(job: SourceJob, entry: MigratingDomain | undefined): Promise<void>;
  /** The stream runs in postcopy: follow it to its end (recovering it when it breaks), never resuming the guest here. */
  followPostcopy(job: SourceJob, entry: MigratingDomain | undefined): Promise<void>;
}

/**
 * A source job whose run did not end it: after an agent restart (recover) or after a throw that
 * escaped its handling (settleCrash). Each drives the job by the rule of the phase it reached
 * (SOURCE_OBLIGATIONS' restart and crash columns), in an exhaustive switch: a phase without a
 * rule does not compile.
 */
export class SourceRecovery {
  private readonly ctx: MigrationContext;
  private readonly endings: SourceEndings;
  private readonly finish2: Finish2Exchange;
  private readonly isClosed: () => boolean;

  constructor(ctx: MigrationContext, endings: SourceEndings, finish2: Finish2Exchange, isClosed: () => boolean) {
    this.ctx = ctx;
    this.endings = endings;
    this.finish2 = finish2;
    this.isClosed = isClosed;
  }

  /**
   * After an agent restart: before the stream completed -> cancel and resume; after -> ask the
   * destination. A domain gone from here (a transient one whose qemu ended while the agent was
   * down) follows the same rules: its job still ends, and past the stream the destination's copy
   * may be the guest.
   */
  async recover(job: SourceJob): Promise<void> {
    const { domains, log } = this.ctx;
    const entry = domains.find(job.record.domain);
    if (entry) domains.restoreClaim(entry, job.id, 'source');
    const phase = job.record.phase;
    log.warn({ migration: job.id, phase }, 'recovering source job after restart');
    switch (phase) {
      case 'confirmed':
        return this.endings.confirm(job, entry);
      case 'rolling-back':
        return this.endings.rollBack(job, entry, new StreamEnded('failed', job.record.error?.code ?? 'agent_restarted', job.record.error?.message ?? 'agent restarted'));
      case 'stream-completed':
      case 'asking-outcome':
        return this.endings.finishCompleted(job, entry);
      case 'postcopy':
        return this.endings.followPostcopy(job, entry);
      case 'preparing':
      case 'prepared':
      case 'streaming':
        return this.recoverBeforeStreamEnd(job, entry);
      case 'done':
        return;
      default:
        return unhandledPhase(phase);
    }
  }

  /** Before the stream's end was recorded: the stream may still run inside qemu without us. */
  private async recoverBeforeStreamEnd(job: SourceJob, entry: MigratingDomain | undefined): Promise<void> {
    const monitor = entry?.run?.monitor;
    // Without its qemu nothing here tells whether the stream completed; the destination does:
    // asked with rc=0 it takes over a completed stream only, and aborts any other.
    if (!monitor && job.record.phase === 'streaming' && !job.record.cancelRequested) return this.endings.finishCompleted(job, entry);
    let status = 'none';
    if (monitor) {
      status = await streamStatus(monitor);
      // Never cancelled: the destination runs the guest. (The phase is written before the switch, so only a record from a lost write gets here.)
      if (POSTCOPY_STREAM_STATUSES.has(status)) {
        await this.ctx.jobs.setPhase(job, 'postcopy');
        return this.endings.followPostcopy(job, entry);
      }
      if (status !== 'none' && !TERMINAL_STREAM_STATUSES.has(status)) {
        await monitor.cancelMigration().catch(() => undefined);
        status = await settledStreamStatus(monitor);
      }
    }
    if (job.record.cancelRequested) return this.endings.rollBack(job, entry, new StreamEnded('cancelled', 'cancelled', 'cancelled before the stream completed'));
    if (status === 'completed') return this.endings.finishCompleted(job, entry);
    return this.endings.rollBack(job, entry, new StreamEnded('failed', 'agent_restarted', 'the source agent restarted during the migration'));
  }

  /**
   * A throw escaped a job's own handling (a bug, a failed write, in its run or its recovery): the
   * job is carried on by the rule of the phase it reached, attempt after attempt until it ends,
   * never left running with its domain blocked. Before the stream completed the guest is the
   * source's: the job is rolled back (the destination told, the guest resumed here) and ends
   * failed, code `internal`. After it the outcome is the destination's: the guest stays paused,
   * Finish2 is asked again (or an operator's resolution applied), and a confirmed job ends its
   * copy here; nothing resumes it without the destination's word. Never rejects.
   */
  async settleCrash(job: SourceJob, err: unknown): Promise<void> {
    const { jobs, domains, log } = this.ctx;
    for (let attempt = 0; !job.terminal && !this.isClosed(); attempt++) {
      const { phase, error } = job.record;
      log.error({ err, migration: job.id, phase, attempt }, 'migration job crashed; carrying it on by its phase');
      const crashed = `internal error${phase === 'rolling-back' && error ? ` while rolling back (${error.code}: ${error.message})` : ''}: ${(err as Error).message}`;
      try {
        const entry = domains.find(job.record.domain);
        switch (phase) {
          case 'preparing':
          case 'prepared':
          case 'streaming':
          case 'rolling-back':
            await this.endings.rollBack(job, entry, new StreamEnded('failed', 'internal', crashed));
            break;
          case 'stream-completed':
          case 'asking-outcome':
            await this.endings.finishCompleted(job, entry);
            break;
          case 'confirmed':
            await this.endings.confirm(job, entry);
            break;
          case 'postcopy':
            await this.endings.followPostcopy(job, entry);
            break;
          case 'done':
            break;
          default:
            unhandledPhase(phase);
        }
        return;
      } catch (again) {
        err = again;
      }
      const retryInMs = CRASHED_JOB_RETRY_MS[Math.min(attempt, CRASHED_JOB_RETRY_MS.length - 1)]!;
      await jobs.update(job, { waiting: `${crashed}; carried on again in ${retryInMs / 1000}s` }).catch(() => undefined);
      // Past the stream the job waits as for an unknown Finish2: an operator may resolve it, which cuts the pause short.
      await this.finish2.pause(job.id, retryInMs);
    }
  }
}

async function streamStatus(monitor: MigrationMonitor): Promise<string> {
  return (await monitor.queryMigrate().catch(() => ({ status: 'none' }))).status;
}

/** The stream's status once qemu has settled it after a cancel (bounded: 10 s). */
async function settledStreamStatus(monitor: MigrationMonitor): Promise<string> {
  for (let i = 0; i < 100; i++) {
    const status = await streamStatus(monitor);
    if (TERMINAL_STREAM_STATUSES.has(status)) return status;
    await new Promise((r) => setTimeout(r, 100));
  }
  return 'unknown';
}
