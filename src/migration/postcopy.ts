import type { MigrationInfo, MigrationMonitor } from '../qemu/migration-monitor.js';
import type { MigrationStats, PostcopyState, SourceJob } from './jobs.js';
import { streamUriFromPeer } from './params.js';
import { PeerRefusedError } from './peer-client.js';
import type { MigrationContext } from './protocol.js';
import { statsOf } from './stream-follower.js';
import { sleep } from './finish2-exchange.js';
import { Wakeup } from './wakeup.js';

const POLL_MS = 250;
/**
 * A postcopy stream that moves no byte for this long hangs on a dead link (a
 * frozen peer sends no RST: qemu would wait for TCP's own timeout, many minutes, with the guest
 * stalled on the pages it lacks). It is broken on purpose (migrate-pause) so that it can be recovered.
 */
export const POSTCOPY_STALL_MS = 10_000;
/** Pauses between recovery attempts of one break, the last one repeated until postcopyRecoverySeconds. */
const RECOVERY_RETRY_MS = [500, 1000, 2000, 5000, 10_000];
/**
 * query-migrate answers within milliseconds unless qemu's main loop is blocked, which a postcopy
 * stream hung on a dead link does (its writes hold the loop): then the stream is broken out of band.
 */
const QUERY_TIMEOUT_MS = 3000;
/** How long one recovery's calls may take: the destination's migrate-recover, then the source's resume. */
const RECOVER2_TIMEOUT_MS = 30_000;

/** How a followed postcopy stream ended, as the source saw it. */
export type PostcopyEnd =
  | { kind: 'completed'; info: MigrationInfo; endedAt: number }
  /** qemu reports the stream failed, or the source qemu is gone: what it had not sent is lost with it. */
  | { kind: 'failed'; code: string; message: string }
  /** The agent is stopping: the job stays in phase `postcopy` for its next start. */
  | { kind: 'closing' }
  /** The monitor connection closed: qemu ended, or the agent lost its monitor (it attaches again, or finds qemu gone). */
  | { kind: 'monitor-closed' };

export interface RecoverRequest {
  migrationId: string;
  finishToken?: string;
}

export interface RecoverResponse {
  migrationId: string;
  /** Where the destination's paused postcopy listens for the source to resume it (tcp:HOST:PORT). */
  uri: string;
}

/**
 * The source's half of a postcopy stream, from the switch to its end: the destination runs the
 * guest and pulls the pages it lacks from here, so nothing in this phase may cancel the stream,
 * resume the guest here or end either qemu. When the stream breaks (both qemus go to
 * postcopy-paused, the guest stalls on its first missing page), the agents recover it by
 * themselves: the destination listens anew (POST /recover2, migrate-recover) and this qemu
 * resumes the stream there (migrate with resume), attempt after attempt for
 * postcopyRecoverySeconds from the break; then the job says so and waits for an operator's
 * POST /jobs/{id}/recover. A stream that hangs without breaking is broken on purpose first.
 */
export class PostcopySource {
  private readonly ctx: MigrationContext;
  private readonly isClosed: () => boolean;
  /** Wakes a job's follower for an operator's recovery request. */
  private readonly wakers = new Map<string, () => void>();

  constructor(ctx: MigrationContext, isClosed: () => boolean) {
    this.ctx = ctx;
    this.isClosed = isClosed;
  }

  /** An operator's POST /jobs/{id}/recover: a fresh round of recovery attempts, at once. False when the job's follower is not waiting on a broken stream. */
  recoverNow(jobId: string): boolean {
    const wake = this.wakers.get(jobId);
    wake?.();
    return wake !== undefined;
  }

  async follow(job: SourceJob, monitor: MigrationMonitor): Promise<PostcopyEnd> {
    const { jobs, log } = this.ctx;
    const recoveryMs = (job.record.options.postcopyRecoverySeconds ?? 300) * 1000;
    const pc: PostcopyState = job.record.stats?.postcopy ?? { state: 'active', startedAt: new Date().toISOString(), recoveries: 0, attempts: 0 };
    let lastTransferred = -1;
    let lastMovedAt = Date.now();
    let lastBreakAt = 0;
    const breakHung = async (why: string) => {
      if (Date.now() - lastBreakAt < POSTCOPY_STALL_MS) return;
      lastBreakAt = Date.now();
      log.warn({ migration: job.id }, `${why}: breaking the postcopy stream to recover it`);
      await monitor.pausePostcopy().catch((err: unknown) => log.warn({ err, migration: job.id }, 'qemu could not pause the hung postcopy stream; it goes on when the link does'));
    };
    let brokeAt: number | undefined;
    let nextAttemptAt = 0;
    const wakeup = new Wakeup();
    let operatorAsked = false;
    this.wakers.set(job.id, () => {
      operatorAsked = true;
      wakeup.wake();
    });
    const unsubscribe = monitor.onMigrationEvent((e) => {
      if (e.kind === 'status') wakeup.wake();
    });
    try {
      for (;;) {
        if (this.isClosed()) return { kind: 'closing' };
        const resolution = job.record.resolution;
        if (resolution?.outcome === 'aborted') {
          return { kind: 'failed', code: 'operator_aborted', message: `an operator gave the broken postcopy stream up: ${resolution.reason}` };
        }
        let info: MigrationInfo;
        try {
          info = await monitor.queryMigrate(QUERY_TIMEOUT_MS);
        } catch (err) {
          if (monitor.isClosed) return { kind: 'monitor-closed' };
          await breakHung(`qemu did not answer query-migrate within ${QUERY_TIMEOUT_MS / 1000}s (${(err as Error).message})`);
          // Never a busy loop: an error reply comes back at once.
          await sleep(POLL_MS);
          continue;
        }
        const now = Date.now();
        switch (info.status) {
          case 'completed':
            jobs.setStats(job, { ...statsOf(info, job.record.stats), ...policyFigures(job.record.stats), postcopy: { ...pc, state: 'active' } });
            return { kind: 'completed', info, endedAt: now };
          case 'failed':
          case 'cancelled':
            return { kind: 'failed', code: 'postcopy_failed', message: `the postcopy stream ${info.status}: ${info.errorDesc ?? 'no reason given by qemu'}` };
          case 'active':
            // The phase was written but qemu never got the switch (the agent stopped between the two).
            await monitor.startPostcopy();
            break;
          case 'postcopy-active':
          case 'postcopy-recover': {
            if (pc.state !== 'active' && info.status === 'postcopy-active') {
              pc.recoveries++;
              pc.attempts = 0;
              pc.state = 'active';
              delete pc.pausedSince;
              delete pc.gaveUp;
              brokeAt = undefined;
              await jobs.update(job, { waiting: undefined });
              log.warn({ migration: job.id, recoveries: pc.recoveries }, 'postcopy stream recovered');
            }
            const transferred = info.ram?.transferredBytes ?? 0;
            if (transferred !== lastTransferred) {
              lastTransferred = transferred;
              lastMovedAt = now;
            } else if (now - lastMovedAt > POSTCOPY_STALL_MS) {
              // Not even the last pages' writes end (what remains reads 0 once they are queued): a stream that is done completes.
              lastMovedAt = now;
              await breakHung(`the postcopy stream moved no byte for ${POSTCOPY_STALL_MS / 1000}s`);
            }
            break;
          }
          case 'postcopy-paused': {
            if (brokeAt === undefined || operatorAsked) {
              brokeAt = now;
              nextAttemptAt = now;
              pc.attempts = 0;
              delete pc.gaveUp;
              if (operatorAsked) log.warn({ migration: job.id }, 'an operator asked to recover the postcopy stream');
              operatorAsked = false;
            }
            pc.state = 'paused';
            pc.pausedSince ??= new Date(brokeAt).toISOString();
            if (!pc.gaveUp && now >= nextAttemptAt) {
              if (now - brokeAt > recoveryMs) {
                pc.gaveUp = true;
                const message =
                  `the postcopy stream broke at ${pc.pausedSince}; recovery gave up after ${pc.attempts} attempt(s) over ${recoveryMs / 1000}s` +
                  `${pc.lastError ? ` (last: ${pc.lastError})` : ''}. The guest waits paused at the destination for pages only this host has; ` +
                  `neither qemu is ended. Once the link is back: POST /jobs/${job.id}/recover`;
                log.error({ migration: job.id }, message);
                await jobs.update(job, { waiting: message });
              } else {
                pc.attempts++;
                pc.state = 'recovering';
                const error = await this.attemptRecovery(job, monitor);
                if (error instanceof PostcopyGone) return { kind: 'failed', code: 'postcopy_failed', message: error.message };
                // Also after a resume qemu took: one whose connection fails pauses again.
                nextAttemptAt = Date.now() + RECOVERY_RETRY_MS[Math.min(pc.attempts - 1, RECOVERY_RETRY_MS.length - 1)]!;
                if (typeof error === 'string') {
                  pc.state = 'paused';
                  pc.lastError = error;
                  log.warn({ migration: job.id, attempt: pc.attempts, err: error }, 'postcopy recovery attempt failed; trying again');
                  await jobs.update(job, { waiting: `the postcopy stream broke at ${pc.pausedSince}; recovering it (attempt ${pc.attempts} failed: ${error})` });
                }
              }
            }
            break;
          }
          default:
            break;
        }
        const previous = job.record.stats;
        jobs.setStats(job, { ...statsOf(info, previous), ...policyFigures(previous), postcopy: { ...pc } });
        await wakeup.sleep(POLL_MS);
      }
    } finally {
      unsubscribe();
      this.wakers.delete(job.id);
    }
  }

  /**
   * One recovery: the destination listens anew, this qemu resumes the stream there. The error's
   * words, undefined when qemu took the resume, or PostcopyGone when the destination's end of the
   * stream is gone for good (its job ended: its qemu is gone), which no attempt can mend.
   */
  private async attemptRecovery(job: SourceJob, monitor: MigrationMonitor): Promise<string | PostcopyGone | undefined> {
    try {
      const answer = await this.ctx.peers.call<RecoverResponse>(
        job.record.peer.url!,
        'POST',
        '/recover2',
        { migrationId: job.id, finishToken: job.record.finishToken } satisfies RecoverRequest,
        RECOVER2_TIMEOUT_MS,
      );
      // As for the first stream: only a tcp:HOST:PORT rebuilt from a checked answer reaches qemu.
      const { uri } = streamUriFromPeer(answer.uri);
      await monitor.resumePostcopy(uri);
      this.ctx.log.info({ migration: job.id, uri }, 'postcopy stream resuming');
      return undefined;
    } catch (err) {
      if (err instanceof PeerRefusedError && (err.peerStatus === 404 || err.code === 'not_in_postcopy')) {
        return new PostcopyGone(`the destination's end of the postcopy stream is gone: ${err.message}`);
      }
      return (err as Error).message;
    }
  }
}

class PostcopyGone extends Error {}

/** What the convergence policy left in the stats before the switch: kept beside the postcopy's own figures. */
function policyFigures(stats: MigrationStats | undefined): Pick<MigrationStats, 'convergence' | 'downtimeLimitMs'> {
  return {
    ...(stats?.convergence ? { convergence: stats.convergence } : {}),
    ...(stats?.downtimeLimitMs !== undefined ? { downtimeLimitMs: stats.downtimeLimitMs } : {}),
  };
}
