import { randomUUID } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { AgentError, conflict } from '../errors.js';
import type { DomainEntry } from '../agent/domain-manager.js';
import type { QmpClient } from '../qemu/qmp.js';
import { resumeAfterMigration } from '../qemu/resume.js';
import { SOURCE_OBLIGATIONS, unhandledPhase } from './phases.js';
import {
  DEFAULT_OPTIONS,
  ESCALATE_AFTER_MS,
  QEMU_DEFAULT_DOWNTIME_MS,
  sourceCapabilities,
  sourceParameters,
  parseDestUri,
  PeerProtocolError,
  streamUriFromPeer,
  type MigrationOptions,
} from './params.js';
import { PeerCertificateError, PeerRefusedError, PeerUnreachableError } from './peer-client.js';
import { useQemuTls } from '../agent/tls.js';
import { isLoopback, type AgentConfig } from '../config.js';
import { CRASHED_JOB_RETRY_MS, isSourceJob, type JobPatch, type SourceJob, type SourceJobRecord, type MigrationStats } from './jobs.js';
import { FINISH_TOKEN_PATTERN, type Finish2Request, type Finish2Response, type MigrationContext, type Prepare2Request, type Prepare2Response } from './protocol.js';

export interface PerformRequest {
  domain: string;
  /** The destination agent's base URL, e.g. http://hostB:7100. */
  destination: string;
  migrationId?: string;
  desturi?: string;
  options?: Partial<Omit<MigrationOptions, 'desturi'>>;
}

const POLL_MS = 250;
const TERMINAL_STREAM = new Set(['completed', 'failed', 'cancelled']);
/** Backoff while the destination cannot tell the outcome of Finish2: retry forever, never guess. */
const FINISH_RETRY_MS = [250, 500, 1000, 2000, 5000];
/**
 * How long a rollback may wait to run the source guest again: qemu finalizing the migration, or
 * the destination's qemu still holding the disks (until its lease, --incoming-timeout, ends it).
 */
const RESUME_TIMEOUT_MS = 5 * 60_000;
/** How long POST /jobs/{id}/resolve waits for the decision to be carried out before answering. */
const RESOLVE_WAIT_MS = 30_000;

class StreamEnded extends Error {
  readonly status: 'failed' | 'cancelled';
  readonly code: string;
  constructor(status: 'failed' | 'cancelled', code: string, message: string) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * The source's half of protocol v2, and the coordinator of the whole migration (Perform):
 * Prepare2 on the destination, `migrate` over QMP, follow the stream, then ALWAYS Finish2.
 * After the stream completed the source guest stays paused until the destination has said
 * who owns it; an unknown answer is asked again, never guessed.
 */
export class SourceSide {
  private readonly ctx: MigrationContext;
  private closed = false;
  /** Interrupts the Finish2 retries of a job when an operator resolves it. */
  private readonly finishWaits = new Map<string, AbortController>();

  constructor(ctx: MigrationContext) {
    this.ctx = ctx;
  }

  async perform(req: PerformRequest): Promise<SourceJob> {
    const { domains, jobs, config } = this.ctx;
    let destination: URL;
    try {
      destination = new URL(req.destination);
      if (destination.protocol !== 'http:' && destination.protocol !== 'https:') throw new Error('not http(s)');
    } catch {
      throw new AgentError(400, 'invalid_destination', `destination must be an http(s) agent URL, got ${req.destination}`);
    }
    if (req.desturi) parseDestUri(req.desturi);
    checkKnownPeer(config, destination);
    const migrationId = req.migrationId ?? randomUUID();
    return jobs.locks.run(migrationId, async () => {
      const replay = jobs.get(migrationId);
      if (replay) {
        if (!isSourceJob(replay) || replay.record.domain !== req.domain) {
          throw conflict('migration_id_in_use', `migration id ${migrationId} belongs to another job here`, { job: migrationId });
        }
        return replay;
      }
      return domains.withLock(req.domain, async () => {
        const entry = domains.get(req.domain);
        // Checked and claimed in one step; a refusal before the job exists gives the claim back.
        const run = domains.beginOutgoing(entry, migrationId);
        let job: SourceJob;
        try {
          const runningBeforeMigration = await this.guestRunning(run.qmp);
          // No await between this count and jobs.create registering the job: concurrent Performs cannot all slip in.
          if (jobs.running('source').length >= config.maxOutgoing) {
            throw new AgentError(503, 'too_many_migrations', `this agent already sends ${config.maxOutgoing} migrations`, {
              retryAfterSeconds: 5,
            });
          }
          const options: MigrationOptions = { ...DEFAULT_OPTIONS, ...req.options, ...(req.desturi ? { desturi: req.desturi } : {}) };
          // A guest paused here arrives paused, whatever the flags say (as libvirt keeps it).
          if (!runningBeforeMigration) options.paused = true;
          job = await jobs.create(
            { id: migrationId, role: 'source', domain: entry.name, uuid: entry.uuid, options, peer: { url: destination.toString() }, runningBeforeMigration },
            'preparing',
          );
        } catch (err) {
          domains.release(entry);
          throw err;
        }
        // Errors are handled inside (a throw that escapes is carried on by settleCrash); this only keeps one from taking the agent down.
        void this.run(job, entry).catch((err: unknown) => this.ctx.log.error({ err, migration: job.id }, 'migration job crashed'));
        return job;
      });
    });
  }

  private async run(job: SourceJob, entry: DomainEntry): Promise<void> {
    const { log } = this.ctx;
    const qmp = entry.run!.qmp;
    let pausedAt: number | undefined;
    try {
      pausedAt = await this.prepareAndStream(job, entry, qmp);
    } catch (err) {
      const ended =
        err instanceof StreamEnded
          ? err
          : new StreamEnded('failed', (err as AgentError).code ?? 'migration_failed', (err as Error).message);
      log.warn({ migration: job.id, domain: entry.name, err: ended.message }, 'migration failed before the stream completed');
      await this.rollBack(job, entry, ended).catch((crash: unknown) => this.settleCrash(job, crash));
      return;
    }
    await this.finishCompleted(job, entry, pausedAt).catch((crash: unknown) => this.settleCrash(job, crash));
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
    for (let attempt = 0; !job.terminal && !this.closed; attempt++) {
      const { phase, error } = job.record;
      log.error({ err, migration: job.id, phase, attempt }, 'migration job crashed; carrying it on by its phase');
      const crashed = `internal error${phase === 'rolling-back' && error ? ` while rolling back (${error.code}: ${error.message})` : ''}: ${(err as Error).message}`;
      const interrupt = new AbortController();
      try {
        const entry = domains.find(job.record.domain);
        if (!entry) {
          await jobs.end(job, 'failed', { code: 'domain_gone', message: `the domain vanished; ${crashed}` });
          return;
        }
        // The rule of each phase (SOURCE_OBLIGATIONS[phase].crash); a phase without one does not compile.
        switch (phase) {
          case 'preparing':
          case 'prepared':
          case 'streaming':
          case 'rolling-back':
            await this.rollBack(job, entry, new StreamEnded('failed', 'internal', crashed));
            break;
          case 'stream-completed':
          case 'asking-outcome':
            await this.finishCompleted(job, entry);
            break;
          case 'confirmed':
            await this.confirm(job, entry);
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
      // Past the stream the job waits as for an unknown Finish2: an operator may resolve it, which cuts the pause short.
      this.finishWaits.set(job.id, interrupt);
      await jobs.update(job, { waiting: `${crashed}; carried on again in ${retryInMs / 1000}s` }).catch(() => undefined);
      await sleep(retryInMs, interrupt.signal);
      this.finishWaits.delete(job.id);
    }
  }

  /** Prepare2, QMP set-up and the stream; when the source vCPUs stopped for the switch-over, if qemu said. */
  private async prepareAndStream(job: SourceJob, entry: DomainEntry, qmp: QmpClient): Promise<number | undefined> {
    const { jobs } = this.ctx;
    const { options, peer } = job.record;
    const started = Date.now();
    const self = this.ctx.hostInfo();
    const firmware = await this.ctx.domains.firmwareSizes(entry);
    // The destination refuses a Prepare2 from itself (same_host) and any protocol but 2 (400).
    const prepared = await this.prepare2(job, {
      protocolVersion: 2,
      migrationId: job.id,
      xml: entry.xml,
      ...(options.desturi ? { desturi: options.desturi } : {}),
      options,
      source: { hostUuid: self.uuid, hostname: self.hostname, accelerator: this.ctx.domains.accelOf(entry.def) },
      ...(firmware ? { firmware } : {}),
    });
    const { uri, host: streamHost } = streamUriFromPeer(prepared.uri);
    if (typeof prepared.finishToken !== 'string' || !new RegExp(FINISH_TOKEN_PATTERN).test(prepared.finishToken)) {
      throw new PeerProtocolError('the destination answered Prepare2 without a finishToken');
    }
    await jobs.setPhase(job, 'prepared', {
      uri,
      finishToken: prepared.finishToken,
      peer: { ...peer, hostUuid: prepared.destination.hostUuid, hostname: prepared.destination.hostname },
    });
    if (job.record.cancelRequested) throw new StreamEnded('cancelled', 'cancelled', 'cancelled before the stream started');
    await qmp.execute('migrate-set-capabilities', { capabilities: sourceCapabilities(options) });
    await qmp.execute('migrate-set-parameters', sourceParameters(options));
    // The destination's qemu demands the stream over TLS; its certificate must name the host streamed to.
    if (this.ctx.streamTls) await useQemuTls(qmp, await this.ctx.domains.qemuTlsDir(entry), 'client', streamHost);
    if (!options.live) await qmp.execute('stop');
    await jobs.setPhase(job, 'streaming', { timings: { ...job.record.timings, setupMs: Date.now() - started } });
    await this.ctx.hold('before-migrate', job.id);
    await qmp.execute('migrate', { uri });
    // A cancel answered before this point found no stream to cancel: cancel it now.
    if (job.record.cancelRequested) await qmp.execute('migrate_cancel');
    return this.followStream(job, qmp);
  }

  /** Prepare2, retried while the destination says "not now" (503 + Retry-After), bounded. */
  private async prepare2(job: SourceJob, body: Prepare2Request): Promise<Prepare2Response> {
    const deadline = Date.now() + 120_000;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.ctx.peers.call<Prepare2Response>(job.record.peer.url!, 'POST', '/prepare2', body, 60_000);
      } catch (err) {
        const retryAfter = err instanceof PeerRefusedError && err.peerStatus === 503 ? err.retryAfterSeconds ?? 5 : undefined;
        if (retryAfter === undefined || Date.now() + retryAfter * 1000 > deadline || job.record.cancelRequested) throw err;
        await this.ctx.jobs.update(job, { waiting: `destination busy (attempt ${attempt}); retrying Prepare2 in ${retryAfter}s` });
        await sleep(retryAfter * 1000);
      }
    }
  }

  /**
   * Poll query-migrate (woken early by MIGRATION events) until the stream ends. Returns when
   * the source vCPUs stopped for the switch-over (qemu's STOP event), if that happened here.
   */
  private async followStream(job: SourceJob, qmp: QmpClient): Promise<number | undefined> {
    // Progress = what remains reaching a new low. A guest that dirties memory faster than the
    // stream carries it never gets there; past the progress timeout the stream is cancelled
    // (the guest keeps running here) instead of streaming for ever.
    const { options } = job.record;
    const progressTimeoutMs = (options.progressTimeoutSeconds ?? 0) * 1000;
    let downtimeLimitMs = options.downtimeLimitMs ?? QEMU_DEFAULT_DOWNTIME_MS;
    let lowestRemaining = Infinity;
    let lastProgressAt = Date.now();
    let stalled = false;
    let wake: (() => void) | undefined;
    // An event that arrives while query-migrate is in flight must still cut the next wait short.
    let eventPending = false;
    let stoppedAt: number | undefined;
    const unsubscribe = qmp.onEvent((e) => {
      if (e.event === 'STOP') stoppedAt = e.timestamp.seconds * 1000 + Math.floor(e.timestamp.microseconds / 1000);
      if (e.event === 'MIGRATION') {
        eventPending = true;
        wake?.();
      }
    });
    try {
      for (;;) {
        eventPending = false;
        let info: QueryMigrate;
        try {
          info = await qmp.execute<QueryMigrate>('query-migrate', {}, { timeoutMs: 10_000 });
        } catch (err) {
          if (qmp.isClosed) throw new StreamEnded('failed', 'source_qemu_ended', 'the source qemu ended during the stream');
          throw err;
        }
        // A cancelled or failed stream reports no RAM figures: keep the last ones seen.
        const previous = job.record.stats;
        this.ctx.jobs.setStats(job, {
          ...(info.ram || !previous ? toStats(info) : { ...previous, qemuStatus: info.status ?? 'none' }),
          downtimeLimitMs,
        });
        const status = info.status ?? 'none';
        const remaining = info.ram?.remaining;
        if (status === 'active' && remaining !== undefined) {
          const sinceProgress = Date.now() - lastProgressAt;
          if (remaining < lowestRemaining) {
            lowestRemaining = remaining;
            lastProgressAt = Date.now();
          } else if (options.maxDowntimeMs && downtimeLimitMs < options.maxDowntimeMs && sinceProgress > ESCALATE_AFTER_MS) {
            // Convergence: allow a longer pause at switch-over, within what the caller accepted.
            downtimeLimitMs = Math.min(downtimeLimitMs * 2, options.maxDowntimeMs);
            await qmp.execute('migrate-set-parameters', { 'downtime-limit': downtimeLimitMs });
            this.ctx.log.info({ migration: job.id, downtimeLimitMs }, 'stream not converging; downtime limit raised');
            lastProgressAt = Date.now();
          } else if (progressTimeoutMs > 0 && !stalled && sinceProgress > progressTimeoutMs) {
            stalled = true;
            await qmp.execute('migrate_cancel');
          }
        }
        if (TERMINAL_STREAM.has(status)) {
          // A cancel answered during the stream wins even if qemu completed it meanwhile: the
          // destination resumes only on Finish2(rc=0), which is then never sent.
          if (status === 'completed' && !job.record.cancelRequested) {
            job.record.timings = {
              ...job.record.timings,
              qemuTotalMs: info['total-time'],
              qemuDowntimeMs: info.downtime,
              qemuSetupMs: info['setup-time'],
            };
            return stoppedAt;
          }
          if (stalled && !job.record.cancelRequested) {
            throw new StreamEnded(
              'failed',
              'not_converging',
              `no progress for ${progressTimeoutMs / 1000}s: the guest dirties memory faster than the stream carries it ` +
                `(never less than ${(lowestRemaining / 1048576).toFixed(1)} MiB left); try autoConverge, more bandwidth or a higher downtime limit`,
            );
          }
          if (status === 'cancelled' || job.record.cancelRequested) throw new StreamEnded('cancelled', 'cancelled', 'the stream was cancelled');
          throw new StreamEnded('failed', 'stream_failed', `the stream failed: ${info['error-desc'] ?? 'no reason given by qemu'}`);
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
   * The stream completed: the source guest is paused; the destination decides who owns it.
   * `pausedAt`: when the source vCPUs stopped, for the switch-over time the guest saw.
   */
  private async finishCompleted(job: SourceJob, entry: DomainEntry, pausedAt = Date.now()): Promise<void> {
    const { jobs, log } = this.ctx;
    // One write while the guest is paused: both phases precede the same action, Finish2.
    if (job.record.phase !== 'asking-outcome') {
      await jobs.setPhase(job, 'asking-outcome', { finish: { rc: 0, attempts: 0 } }, job.record.phase === 'streaming' ? ['stream-completed'] : []);
    }
    await this.ctx.hold('before-finish2', job.id);
    const outcome = await this.finish2Until(job, { migrationId: job.id, rc: 0, uuid: job.record.uuid, finishToken: job.record.finishToken });
    if (!outcome) return; // agent shutting down: the job stays in `asking-outcome` for the next start
    const { answer, finish } = outcome;
    if (answer.outcome === 'finished') {
      await this.confirm(job, entry, { waiting: undefined, finish, timings: { ...job.record.timings, switchoverMs: Date.now() - pausedAt } });
    } else {
      log.warn({ migration: job.id, error: answer.error }, 'destination aborted after the stream completed; resuming the source');
      const why = new StreamEnded('failed', answer.error?.code ?? 'destination_aborted', answer.error?.message ?? 'the destination aborted');
      await this.rollBack(job, entry, why, { waiting: undefined, finish });
    }
  }

  /** The destination owns the guest: end the paused source copy. `answered`: the Finish2 exchange, recorded with the phase. */
  private async confirm(job: SourceJob, entry: DomainEntry, answered: JobPatch = {}): Promise<void> {
    const { jobs, domains, log } = this.ctx;
    await jobs.setPhase(job, 'confirmed', answered);
    await domains.commitOutgoing(entry, { undefine: job.record.options.undefineSource });
    await jobs.end(job, 'completed');
    log.info({ migration: job.id, domain: entry.name, timings: job.record.timings }, 'migration completed');
  }

  /**
   * The migration failed: tell the destination (Finish2 rc!=0, which ends its empty qemu) and
   * make sure the guest runs here again if it ran before the migration. When the stream never
   * completed, the destination cannot run the guest (it resumes only on rc=0), so resuming here is
   * safe without waiting for it. `answered`: the destination already answered Finish2 (the
   * exchange, recorded with the phase).
   */
  private async rollBack(job: SourceJob, entry: DomainEntry, why: StreamEnded, answered?: JobPatch): Promise<void> {
    const { jobs, log } = this.ctx;
    await jobs.setPhase(job, 'rolling-back', { ...answered, error: { code: why.code, message: why.message } });
    if (!answered) {
      await this.finish2BestEffort(job, { migrationId: job.id, rc: 1, error: why.message, cancelled: why.status === 'cancelled', uuid: job.record.uuid, finishToken: job.record.finishToken });
    }
    let message = why.message;
    const run = entry.run;
    // A record written before agents kept the run state holds none: resume, as they did.
    if (run && job.record.runningBeforeMigration !== false) {
      const notResumed = await resumeAfterMigration(run.qmp, RESUME_TIMEOUT_MS, (reason) =>
        jobs.update(job, { waiting: `the guest resumes here as soon as it can: ${reason}` }),
      );
      if (notResumed) {
        log.error({ err: notResumed, migration: job.id }, 'could not resume the source guest');
        message += `; the source guest stays paused, resume it by hand: ${notResumed.message}`;
      }
    }
    this.ctx.domains.release(entry);
    await jobs.end(job, why.status, { code: why.code, message });
  }

  /**
   * Finish2 until the destination answers (success or a definite refusal) or an operator
   * resolves the job: the answer and the exchange for the job record (the caller writes it with
   * the phase that acts on it); null if the agent closes first.
   */
  private async finish2Until(job: SourceJob, body: Finish2Request): Promise<{ answer: Finish2Response; finish: NonNullable<SourceJobRecord['finish']> } | null> {
    const { jobs, log } = this.ctx;
    const interrupt = new AbortController();
    this.finishWaits.set(job.id, interrupt);
    try {
      for (let attempt = 1; !this.closed; attempt++) {
        const decided = job.record.resolution;
        if (decided) {
          const error = { code: 'operator_aborted', message: `an operator resolved the migration as aborted: ${decided.reason}` };
          const answer = { migrationId: job.id, outcome: decided.outcome, ...(decided.outcome === 'aborted' ? { error } : {}) };
          return { answer, finish: { rc: body.rc, attempts: attempt - 1, outcome: answer.outcome } };
        }
        try {
          const answer = await this.ctx.peers.call<Finish2Response>(job.record.peer.url!, 'POST', '/finish2', body, 120_000, interrupt.signal);
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
          await sleep(retryInMs, interrupt.signal);
        }
      }
      return null;
    } finally {
      this.finishWaits.delete(job.id);
    }
  }

  /**
   * An operator's way out when the destination stays unreachable and the source guest paused:
   * `finished` (the guest runs on the destination: end the paused copy here) or `aborted` (it
   * does not: resume it here). Only while the source is asking Finish2 with no answer; the
   * operator must have checked the destination, since this decides who owns the guest.
   */
  async resolve(id: string, outcome: 'finished' | 'aborted', reason: string): Promise<SourceJob> {
    const { jobs } = this.ctx;
    const job = jobs.require(id);
    if (!isSourceJob(job) || job.terminal || job.record.phase !== 'asking-outcome' || !job.record.waiting || job.record.resolution) {
      throw conflict(
        'not_waiting_on_destination',
        `job ${id} is not a source job waiting for an unknown Finish2 outcome (status ${job.record.status}, phase ${job.record.phase})`,
        { job: id },
      );
    }
    await jobs.update(job, { resolution: { outcome, reason, at: new Date().toISOString() } });
    this.ctx.log.warn({ migration: id, outcome, reason }, 'an operator resolved the migration');
    this.finishWaits.get(id)?.abort();
    await jobs.waitForEnd(job, RESOLVE_WAIT_MS);
    return job;
  }

  /** Finish2 after a failure: a few tries; if all fail, the destination's lease ends its qemu anyway. */
  private async finish2BestEffort(job: SourceJob, body: Finish2Request): Promise<void> {
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        await this.ctx.peers.call<Finish2Response>(job.record.peer.url!, 'POST', '/finish2', body, 30_000);
        await this.ctx.jobs.update(job, { finish: { rc: body.rc, attempts: attempt, outcome: 'aborted' } });
        return;
      } catch (err) {
        if (err instanceof PeerRefusedError) return; // 404: nothing was prepared there
        // A refused certificate stays refused: no point in trying again.
        if (!(err instanceof PeerUnreachableError) || err instanceof PeerCertificateError || attempt === 3) {
          await this.ctx.jobs.update(job, { finish: { rc: body.rc, attempts: attempt, lastError: (err as Error).message } });
          return;
        }
        await sleep(500 * attempt);
      }
    }
  }

  async cancel(id: string): Promise<SourceJob> {
    const job = this.ctx.jobs.require(id);
    if (!isSourceJob(job)) throw conflict('not_cancellable', 'only the source side of a migration can cancel it', { job: id });
    if (job.terminal) throw conflict('job_ended', `job ${id} already ${job.record.status}`, { job: id });
    if (SOURCE_OBLIGATIONS[job.record.phase].cancel === 'refused') {
      throw conflict('too_late_to_cancel', `job ${id} is past the stream (phase ${job.record.phase}); the destination decides now`, { job: id });
    }
    // Written before the answer: the stream's start and a restarted agent's recovery both honour it.
    await this.ctx.jobs.update(job, { cancelRequested: true });
    const entry = this.ctx.domains.find(job.record.domain);
    if (job.record.phase === 'streaming' && entry?.run) await entry.run.qmp.execute('migrate_cancel');
    return job;
  }

  private async guestRunning(qmp: QmpClient): Promise<boolean> {
    try {
      return (await qmp.execute<{ running: boolean }>('query-status', {}, { timeoutMs: 5000 })).running;
    } catch {
      return false;
    }
  }

  /**
   * After an agent restart, drive a source job that was mid-flight to a safe end by the same
   * rules: before the stream completed -> cancel and resume; after -> ask the destination.
   */
  async recover(job: SourceJob): Promise<void> {
    const { domains, log } = this.ctx;
    const entry = domains.find(job.record.domain);
    if (!entry) {
      await this.ctx.jobs.end(job, 'failed', { code: 'domain_gone', message: 'the domain vanished while the agent was down' });
      return;
    }
    domains.restoreClaim(entry, job.id, 'source');
    const phase = job.record.phase;
    log.warn({ migration: job.id, phase }, 'recovering source job after restart');
    // The rule of each phase (SOURCE_OBLIGATIONS[phase].restart); a phase without one does not compile.
    switch (phase) {
      case 'confirmed':
        return this.confirm(job, entry);
      case 'rolling-back':
        return this.rollBack(job, entry, new StreamEnded('failed', job.record.error?.code ?? 'agent_restarted', job.record.error?.message ?? 'agent restarted'));
      case 'stream-completed':
      case 'asking-outcome':
        return this.finishCompleted(job, entry);
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
  private async recoverBeforeStreamEnd(job: SourceJob, entry: DomainEntry): Promise<void> {
    const qmp = entry.run?.qmp;
    let status = 'none';
    if (qmp) {
      status = (await qmp.execute<QueryMigrate>('query-migrate').catch(() => ({}) as QueryMigrate)).status ?? 'none';
      if (status !== 'none' && !TERMINAL_STREAM.has(status)) {
        await qmp.execute('migrate_cancel').catch(() => undefined);
        status = await this.settle(qmp);
      }
    }
    if (job.record.cancelRequested) return this.rollBack(job, entry, new StreamEnded('cancelled', 'cancelled', 'cancelled before the stream completed'));
    if (status === 'completed') return this.finishCompleted(job, entry);
    return this.rollBack(job, entry, new StreamEnded('failed', 'agent_restarted', 'the source agent restarted during the migration'));
  }

  private async settle(qmp: QmpClient): Promise<string> {
    for (let i = 0; i < 100; i++) {
      const status = (await qmp.execute<QueryMigrate>('query-migrate').catch(() => ({}) as QueryMigrate)).status ?? 'none';
      if (TERMINAL_STREAM.has(status)) return status;
      await sleep(100);
    }
    return 'unknown';
  }

  close(): void {
    this.closed = true;
  }
}

interface QueryMigrate {
  status?: string;
  'total-time'?: number;
  'setup-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  'error-desc'?: string;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    mbps: number;
    'dirty-pages-rate': number;
    'dirty-sync-count': number;
  };
}

function toStats(info: QueryMigrate): MigrationStats {
  const ram = info.ram;
  const transferred = ram?.transferred ?? 0;
  const total = ram?.total ?? 0;
  const remaining = ram?.remaining ?? 0;
  return {
    qemuStatus: info.status ?? 'none',
    transferredBytes: transferred,
    remainingBytes: remaining,
    totalBytes: total,
    throughputBytesPerSec: Math.round(((ram?.mbps ?? 0) * 1e6) / 8),
    dirtyPagesRate: ram?.['dirty-pages-rate'] ?? 0,
    iterations: ram?.['dirty-sync-count'] ?? 0,
    ...(info['expected-downtime'] !== undefined ? { expectedDowntimeMs: info['expected-downtime'] } : {}),
    percent: info.status === 'completed' ? 100 : total > 0 ? Math.min(99, Math.floor(((total - remaining) / total) * 100)) : 0,
  };
}

/** Resolves after `ms`, or as soon as `signal` aborts; never keeps the process alive. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return delay(ms, undefined, { ref: false, signal }).catch(() => undefined);
}

/**
 * A caller names the destination; before anything is sent to it, it must be a peer: with TLS an
 * https agent (its certificate is then checked against the fleet's CA and this host name), without
 * TLS a URL given with --peer, or, for an agent on loopback, another loopback address.
 */
function checkKnownPeer(config: AgentConfig, destination: URL): void {
  const refuse = (why: string) => {
    throw new AgentError(400, 'destination_not_a_peer', `${destination.origin} is not a known peer: ${why}`);
  };
  if (config.tls) {
    if (destination.protocol !== 'https:') refuse('this agent runs with TLS and speaks to peers over https only');
    return;
  }
  if (config.peers.some((p) => new URL(p).origin === destination.origin)) return;
  const host = destination.hostname.replace(/^\[|\]$/g, '');
  if (isLoopback(config.listenHost) && isLoopback(host)) return;
  refuse('give it with --peer, or run the agents with --tls-cert/--tls-key/--tls-ca');
}
