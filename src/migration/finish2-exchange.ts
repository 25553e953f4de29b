import { setTimeout as delay } from 'node:timers/promises';
import { PeerCertificateError, PeerRefusedError, PeerUnreachableError } from './peer-client.js';
import type { SourceJob, SourceJobRecord } from './jobs.js';
import type { Finish2Request, Finish2Response, MigrationContext } from './protocol.js';

/** Backoff while the destination cannot tell the outcome of Finish2: retry forever, never guess. */
const FINISH_RETRY_MS = [250, 500, 1000, 2000, 5000];

export type Finish2Outcome = { answer: Finish2Response; finish: NonNullable<SourceJobRecord['finish']> };

/**
 * When the guest resumed at the destination, on this host's clock: the answer's arrival less how
 * long the guest had run there by then (a peer's figure, so never before the guest paused here).
 */
export function guestResumedAt(answeredAt: number, pausedAt: number, runningForMs: number | undefined): number {
  const ranFor = Number.isFinite(runningForMs) ? Math.max(0, runningForMs!) : 0;
  return Math.max(pausedAt, answeredAt - ranFor);
}

/**
 * The source's Finish2 calls: after a completed stream, asked until the destination answers
 * (the guest's owner is its word); after a failure, a few tries. A job waiting for an answer
 * can be woken by an operator's resolution.
 */
export class Finish2Exchange {
  private readonly ctx: MigrationContext;
  private readonly isClosed: () => boolean;
  /** The pause of each job waiting on the destination, cut short by interrupt(). */
  private readonly waits = new Map<string, AbortController>();

  constructor(ctx: MigrationContext, isClosed: () => boolean) {
    this.ctx = ctx;
    this.isClosed = isClosed;
  }

  /** Wakes the job's pending wait (an operator resolved it). */
  interrupt(jobId: string): void {
    this.waits.get(jobId)?.abort();
  }

  /** A pause of `ms` for a job waiting on the outcome, which interrupt() cuts short. */
  pause(jobId: string, ms: number): Promise<void> {
    return this.interruptible(jobId, (signal) => sleep(ms, signal));
  }

  /** Runs `wait` with a signal that interrupt(jobId) aborts. */
  private async interruptible<T>(jobId: string, wait: (signal: AbortSignal) => Promise<T>): Promise<T> {
    const interrupt = new AbortController();
    this.waits.set(jobId, interrupt);
    try {
      return await wait(interrupt.signal);
    } finally {
      this.waits.delete(jobId);
    }
  }

  /**
   * Finish2 until the destination answers (success or a definite refusal) or an operator
   * resolves the job: the answer and the exchange for the job record (the caller writes it with
   * the phase that acts on it); null if the agent closes first.
   */
  until(job: SourceJob, body: Finish2Request): Promise<Finish2Outcome | null> {
    return this.interruptible(job.id, (signal) => this.askUntilAnswered(job, body, signal));
  }

  private async askUntilAnswered(job: SourceJob, body: Finish2Request, signal: AbortSignal): Promise<Finish2Outcome | null> {
    const { jobs, log } = this.ctx;
    for (let attempt = 1; !this.isClosed(); attempt++) {
      const decided = job.record.resolution;
      if (decided) {
        const error = { code: 'operator_aborted', message: `an operator resolved the migration as aborted: ${decided.reason}` };
        const answer = { migrationId: job.id, outcome: decided.outcome, ...(decided.outcome === 'aborted' ? { error } : {}) };
        return { answer, finish: { rc: body.rc, attempts: attempt - 1, outcome: answer.outcome } };
      }
      try {
        const answer = await this.ctx.peers.call<Finish2Response>(job.record.peer.url!, 'POST', '/finish2', body, 120_000, signal);
        return { answer, finish: { rc: body.rc, attempts: attempt, outcome: answer.outcome } };
      } catch (err) {
        if (err instanceof PeerRefusedError && err.peerStatus === 404) {
          // The destination has no such migration: it never ran it, so it runs no copy of the guest.
          const answer: Finish2Response = { migrationId: job.id, outcome: 'aborted', error: { code: err.code, message: err.message } };
          return { answer, finish: { rc: body.rc, attempts: attempt, outcome: 'aborted' } };
        }
        if (job.record.resolution) continue;
        const message = (err as Error).message;
        const retryInMs = FINISH_RETRY_MS[Math.min(attempt - 1, FINISH_RETRY_MS.length - 1)]!;
        log.warn({ migration: job.id, attempt, err: message }, 'Finish2 outcome unknown; the guest stays paused; asking again');
        // 409 guest_active_here: the destination forgot the job but runs a guest with this UUID.
        const why = err instanceof PeerRefusedError && err.code === 'guest_active_here' ? 'the destination cannot tell' : 'outcome unknown';
        await jobs.update(job, {
          waiting:
            `Finish2 ${why} after ${attempt} attempt(s) (${message}); the guest stays paused here until the destination ` +
            `answers, or until an operator who checked the destination resolves the job (POST /jobs/${job.id}/resolve)`,
          finish: { rc: body.rc, attempts: attempt, lastError: message },
        });
        await sleep(retryInMs, signal);
      }
    }
    return null;
  }

  /** Finish2 after a failure: a few tries; if all fail, the destination's lease ends its qemu anyway. */
  async bestEffort(job: SourceJob, body: Finish2Request): Promise<void> {
    const { jobs, peers } = this.ctx;
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        await peers.call<Finish2Response>(job.record.peer.url!, 'POST', '/finish2', body, 30_000);
        await jobs.update(job, { finish: { rc: body.rc, attempts: attempt, outcome: 'aborted' } });
        return;
      } catch (err) {
        if (err instanceof PeerRefusedError) return; // 404: nothing was prepared there
        // A refused certificate stays refused: no point in trying again.
        if (!(err instanceof PeerUnreachableError) || err instanceof PeerCertificateError || attempt === 3) {
          await jobs.update(job, { finish: { rc: body.rc, attempts: attempt, lastError: (err as Error).message } });
          return;
        }
        await sleep(500 * attempt);
      }
    }
  }
}

/** Resolves after `ms`, or as soon as `signal` aborts; never keeps the process alive. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return delay(ms, undefined, { ref: false, signal }).catch(() => undefined);
}
