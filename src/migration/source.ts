import { randomUUID } from 'node:crypto';
import { AgentError, conflict } from '../errors.js';
import { POSTCOPY_STREAM_STATUSES, type MigrationMonitor } from '../qemu/migration-monitor.js';
import { SOURCE_OBLIGATIONS } from './phases.js';
import { agreedTransport, checkTransportOptions, migrationOptions, offerTransport, postcopyArmed, sourceCapabilities, sourceParameters, parseDestUri, PeerProtocolError, streamUriFromPeer, tuningParameters, type MigrationOptions, type StreamTuning } from './params.js';
import { PeerRefusedError } from './peer-client.js';
import { isLoopback, type AgentConfig } from '../config.js';
import { isSourceJob, settled, type JobPatch, type SourceJob } from './jobs.js';
import type { MigratingDomain } from './domains.js';
import { Finish2Exchange, guestResumedAt, sleep } from './finish2-exchange.js';
import { followStream, qemuFigures, StreamEnded, type PostcopySwitch, type StreamCompletion } from './stream-follower.js';
import { PostcopySource, type PostcopyEnd } from './postcopy.js';
import type { Finish2Response } from './protocol.js';
import { SourceRecovery } from './source-recovery.js';
import { buildForecast, lastStreamRate, type Forecast, type ForecastOptions } from './forecast.js';
import { FINISH_TOKEN_PATTERN, type MigrationContext, type Prepare2Request, type Prepare2Response } from './protocol.js';

export interface PerformRequest {
  domain: string;
  /** The destination agent's base URL, e.g. http://hostB:7100. */
  destination: string;
  migrationId?: string;
  desturi?: string;
  options?: Partial<Omit<MigrationOptions, 'desturi'>>;
}

/**
 * How long a rollback may wait to run the source guest again: qemu finalizing the migration, or
 * the destination's qemu still holding the disks (until its lease, --incoming-timeout, ends it).
 */
const RESUME_TIMEOUT_MS = 5 * 60_000;
/** How long POST /jobs/{id}/resolve waits for the decision to be carried out before answering. */
const RESOLVE_WAIT_MS = 30_000;
/** How long a forecast samples the guest's dirty rate. */
const FORECAST_SAMPLE_SECONDS = 1;


/**
 * The source's half of protocol v2, and the coordinator of the whole migration (Perform):
 * Prepare2 on the destination, `migrate` over QMP, follow the stream, then ALWAYS Finish2.
 * After the stream completed the source guest stays paused until the destination has said
 * who owns it; an unknown answer is asked again, never guessed.
 */
export class SourceSide {
  private readonly ctx: MigrationContext;
  private closed = false;
  private readonly finish2: Finish2Exchange;
  private readonly recovery: SourceRecovery;
  private readonly postcopy: PostcopySource;

  constructor(ctx: MigrationContext) {
    this.ctx = ctx;
    this.finish2 = new Finish2Exchange(ctx, () => this.closed);
    this.postcopy = new PostcopySource(ctx, () => this.closed);
    this.recovery = new SourceRecovery(
      ctx,
      {
        confirm: (job, entry) => this.confirm(job, entry),
        rollBack: (job, entry, why) => this.rollBack(job, entry, why),
        finishCompleted: (job, entry) => this.finishCompleted(job, entry),
        followPostcopy: (job, entry) => this.followPostcopy(job, entry),
      },
      this.finish2,
      () => this.closed,
    );
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
    checkTransportOptions(req.options ?? {});
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
        let written: Promise<void>;
        try {
          const runningBeforeMigration = await run.monitor.guestRunning().catch(() => false);
          // No await between this count and jobs.create registering the job: concurrent Performs cannot all slip in.
          if (jobs.running('source').length >= config.maxOutgoing) {
            throw new AgentError(503, 'too_many_migrations', `this agent already sends ${config.maxOutgoing} migrations`, {
              retryAfterSeconds: 5,
            });
          }
          const options: MigrationOptions = { ...migrationOptions(req.options ?? {}), ...(req.desturi ? { desturi: req.desturi } : {}) };
          // A guest paused here arrives paused, whatever the flags say (as libvirt keeps it).
          if (!runningBeforeMigration) options.paused = true;
          // Prepare2 goes out while `preparing` is written: a destination prepared for a job that no
          // record here names (this agent died first) is ended by its lease, as one whose source vanished.
          ({ job, written } = jobs.begin(
            { id: migrationId, role: 'source', domain: entry.name, uuid: entry.uuid, options, peer: { url: destination.toString() }, runningBeforeMigration },
            'preparing',
          ));
        } catch (err) {
          domains.release(entry);
          throw err;
        }
        // Errors are handled inside (a throw that escapes is carried on by settleCrash); this only keeps one from taking the agent down.
        void this.run(job, entry, run.monitor, written).catch((err: unknown) => this.ctx.log.error({ err, migration: job.id }, 'migration job crashed'));
        // Answered once the job is on disk; if it cannot be written, its run rolls it back.
        await written;
        return job;
      });
    });
  }

  private async run(job: SourceJob, entry: MigratingDomain, monitor: MigrationMonitor, written: Promise<void>): Promise<void> {
    const { log } = this.ctx;
    let completion: StreamCompletion | PostcopySwitch;
    try {
      completion = await this.prepareAndStream(job, entry, monitor, written);
    } catch (err) {
      // Past the phase write the stream may be in postcopy (a throw after the switch): forward only.
      if (job.record.phase === 'postcopy') {
        await this.followPostcopy(job, entry).catch((crash: unknown) => this.settleCrash(job, crash));
        return;
      }
      const ended =
        err instanceof StreamEnded
          ? err
          : new StreamEnded('failed', (err as AgentError).code ?? 'migration_failed', (err as Error).message);
      log.warn({ migration: job.id, domain: entry.name, err: ended.message }, 'migration failed before the stream completed');
      await this.rollBack(job, entry, ended).catch((crash: unknown) => this.settleCrash(job, crash));
      return;
    }
    if ('postcopy' in completion) {
      await this.followPostcopy(job, entry).catch((crash: unknown) => this.settleCrash(job, crash));
      return;
    }
    await this.finishCompleted(job, entry, completion).catch((crash: unknown) => this.settleCrash(job, crash));
  }

  /**
   * Switch the stream to postcopy: the phase first (from it, nothing resumes the guest here),
   * then qemu. Shares its lock with cancel, so a cancel answered before the switch stops it, and
   * none comes after it. False when a cancel came first.
   */
  private switchToPostcopy(job: SourceJob, monitor: MigrationMonitor): Promise<boolean> {
    return this.ctx.jobs.locks.run(`stream:${job.id}`, async () => {
      if (job.record.cancelRequested) return false;
      const postcopy = { state: 'active' as const, startedAt: new Date().toISOString(), recoveries: 0, attempts: 0 };
      const before = job.record;
      try {
        await this.ctx.jobs.setPhase(job, 'postcopy', { ...(job.record.stats ? { stats: { ...job.record.stats, postcopy } } : {}) });
      } catch (err) {
        // Not on disk, so not taken: the job goes on (or rolls back) as streaming, and qemu is never told.
        job.record = before;
        throw err;
      }
      await this.ctx.hold('before-postcopy', job.id);
      await monitor.startPostcopy();
      this.ctx.log.warn({ migration: job.id, domain: job.record.domain }, 'stream switched to postcopy: the guest runs at the destination from now on');
      return true;
    });
  }

  /**
   * Phase `postcopy` (also after a restart or a crash): follow the stream to its end, recovering
   * it when it breaks; then the destination's word. `finished`: it owns the guest, the copy here
   * ends. `aborted` without having switched (the switch never reached its qemu): the copy here is
   * whole and the job rolls back. `aborted` after switching: the guest ran there and is lost with
   * the stream (endPostcopyLost). Nothing here resumes a guest the destination ran.
   */
  private async followPostcopy(job: SourceJob, entry: MigratingDomain | undefined): Promise<void> {
    const { log, domains } = this.ctx;
    let monitor = entry?.run?.monitor;
    let end: PostcopyEnd = { kind: 'monitor-closed' };
    // A closed monitor is not yet an ended qemu: the domain manager attaches again or finds it gone (bounded: it settles each time).
    for (let attach = 0; attach < 10 && end.kind === 'monitor-closed'; attach++) {
      if (attach > 0) {
        if (!(await domains.settled(job.record.domain))) return;
        monitor = domains.find(job.record.domain)?.run?.monitor;
      }
      if (!monitor || monitor.isClosed) break;
      end = await this.postcopy.follow(job, monitor);
    }
    if (end.kind === 'closing') return;
    // Whether the stream had completed before this qemu ended (this agent may have ended it, and
    // died before writing so), only the destination's qemu knows: it is told (rc=1) until it
    // answers, and answers from its qemu (completed, or the guest lost).
    const qemuGone = end.kind === 'monitor-closed';
    if (end.kind === 'monitor-closed') end = { kind: 'failed', code: 'source_qemu_ended', message: 'the source qemu ended during postcopy: the pages it had not sent yet are lost with it' };
    const body = { migrationId: job.id, uuid: job.record.uuid, finishToken: job.record.finishToken };
    let answer: Finish2Response;
    let finish: NonNullable<SourceJob['record']['finish']>;
    if (end.kind === 'completed' || qemuGone) {
      const outcome = await this.finish2.until(job, end.kind === 'completed' ? { ...body, rc: 0 } : { ...body, rc: 1, error: end.message });
      if (!outcome) return;
      ({ answer, finish } = outcome);
    } else {
      // The stream cannot complete from here: one report; a destination that switched keeps the guest whatever it is told.
      try {
        answer = await this.ctx.peers.call<Finish2Response>(job.record.peer.url!, 'POST', '/finish2', { ...body, rc: 1, error: end.message }, 30_000);
      } catch (err) {
        answer = { migrationId: job.id, outcome: 'aborted', postcopy: true, error: { code: end.code, message: `${end.message}; the destination did not answer (${(err as Error).message})` } };
      }
      finish = { rc: 1, attempts: 1, outcome: answer.outcome };
    }
    if (answer.outcome === 'finished') {
      const timings = end.kind === 'completed'
        ? { ...job.record.timings, postcopyMs: end.endedAt - Date.parse(job.record.stats?.postcopy?.startedAt ?? job.record.updatedAt), ...(await qemuFigures(monitor, end.info)) }
        : job.record.timings;
      return this.confirm(job, entry, { waiting: undefined, finish, timings });
    }
    if (!answer.postcopy) {
      // Its word that the guest never ran there makes the copy here the guest, if qemu can run it:
      // not from a paused postcopy (qemu 7.2 ends itself on migrate_cancel there), which is kept as it is.
      const status = monitor ? (await monitor.queryMigrate().catch(() => ({ status: 'none' }))).status : 'none';
      if (!POSTCOPY_STREAM_STATUSES.has(status)) {
        log.warn({ migration: job.id, error: answer.error }, 'the switch to postcopy never reached the destination, which aborted; resuming the source');
        const why = new StreamEnded('failed', answer.error?.code ?? 'destination_aborted', answer.error?.message ?? 'the destination aborted before switching to postcopy');
        return this.rollBack(job, entry, why, { waiting: undefined, finish });
      }
      const message =
        `${answer.error?.message ?? 'the destination aborted'} before it ran the guest, so the whole guest is in the qemu here; ` +
        `but its stream is ${status}, from which qemu 7.2 cannot run it again: the qemu is kept, paused`;
      return this.endPostcopyLost(job, entry, { ...answer, error: { code: 'postcopy_failed', message } }, finish);
    }
    log.error({ migration: job.id, err: answer.error }, 'the postcopy stream ended without completing');
    return this.endPostcopyLost(job, entry, end.kind === 'failed' ? { ...answer, error: { code: end.code, message: end.message } } : answer, finish);
  }

  /**
   * Past the switch to postcopy, the destination does not hold the whole guest: neither copy is
   * the guest any more. Nothing is resumed or ended here (an operator decides what is left); the
   * job fails and says so.
   */
  private async endPostcopyLost(job: SourceJob, entry: MigratingDomain | undefined, answer: Finish2Response, finish: NonNullable<SourceJob['record']['finish']>): Promise<void> {
    const error = {
      code: answer.error?.code ?? 'postcopy_failed',
      message:
        `${answer.error?.message ?? 'the destination did not complete the postcopy stream'}. The guest ran at the destination since the switch to postcopy ` +
        'and its memory was split between both hosts: the copy here stays paused and is not resumed (it is out of date); check the destination before ending either qemu',
    };
    // qemu runs a source guest again when its migration fails, if it ran before: never this out-of-date copy.
    const monitor = entry?.run?.monitor;
    if (monitor && (await monitor.guestRunning().catch(() => false))) await monitor.pause().catch((err: unknown) => this.ctx.log.error({ err, migration: job.id }, 'could not pause the out-of-date source copy'));
    await this.ctx.jobs.update(job, { finish, waiting: undefined });
    if (entry) this.ctx.domains.release(entry);
    await this.ctx.jobs.end(job, 'failed', error);
  }

  /** A throw escaped a job's own handling: carried on by its phase's crash rule (see SourceRecovery). Never rejects. */
  settleCrash(job: SourceJob, err: unknown): Promise<void> {
    return this.recovery.settleCrash(job, err);
  }

  /** After an agent restart: the job is driven by its phase's restart rule (see SourceRecovery). */
  recover(job: SourceJob): Promise<void> {
    return this.recovery.recover(job);
  }

  /** Prepare2, QMP set-up and the stream, to its completion. `written`: the job's first record, written meanwhile. */
  private async prepareAndStream(job: SourceJob, entry: MigratingDomain, monitor: MigrationMonitor, written: Promise<void>): Promise<StreamCompletion | PostcopySwitch> {
    const { jobs } = this.ctx;
    const { options, peer } = job.record;
    const started = Date.now();
    const self = this.ctx.hostInfo();
    const firmware = await this.ctx.domains.firmwareSizes(entry);
    const offer = offerTransport(options, self.migrationChannels);
    // The transport travels beside the options, not in them: a destination older than the
    // agreement refuses unknown options, and prepare2 below asks it again without the offer.
    const { multifdChannels: _channels, compression: _compression, xbzrle: _xbzrle, ...destinationOptions } = options;
    // The destination refuses a Prepare2 from itself (same_host) and any protocol but 2 (400).
    const prepared = await this.prepare2(job, {
      protocolVersion: 2,
      migrationId: job.id,
      xml: entry.xml,
      ...(options.desturi ? { desturi: options.desturi } : {}),
      options: destinationOptions,
      source: { hostUuid: self.uuid, hostname: self.hostname, accelerator: this.ctx.domains.accelOf(entry.def) },
      ...(firmware ? { firmware } : {}),
      transport: offer,
    });
    if (typeof prepared.finishToken !== 'string' || !new RegExp(FINISH_TOKEN_PATTERN).test(prepared.finishToken)) {
      throw new PeerProtocolError('the destination answered Prepare2 without a finishToken');
    }
    let stream: { uri: string; host: string };
    let transport: ReturnType<typeof agreedTransport>;
    try {
      stream = streamUriFromPeer(prepared.uri);
      transport = agreedTransport(offer, prepared.transport);
    } catch (err) {
      // A refused answer's Finish2 must carry the token, so that it ends the destination's qemu at once.
      await jobs.update(job, { finishToken: prepared.finishToken });
      throw err;
    }
    const { uri, host: streamHost } = stream;
    // Long written by now (Prepare2 starts a qemu); a job never recorded streams nothing, and its
    // rollback's Finish2 carries the token, which ends the destination's qemu at once.
    jobs.keep(job, { finishToken: prepared.finishToken });
    await written;
    // One write for both phases, made while qemu is set up: both precede the same action,
    // `migrate`, and both roll back alike (the set-up is qemu's own, local, state).
    const recorded = jobs.setPhase(job, 'streaming', {
      timings: { ...job.record.timings, prepare2Ms: Date.now() - Date.parse(job.record.createdAt) },
      uri,
      finishToken: prepared.finishToken,
      transport,
      peer: { ...peer, hostUuid: prepared.destination.hostUuid, hostname: prepared.destination.hostname },
    }, ['prepared']);
    const setUp = (async () => {
      // Sent together: qemu takes them in order, one round trip.
      await Promise.all([
        monitor.setCapabilities(sourceCapabilities(options, transport)),
        // Read again: a tuning (PATCH /jobs/{id}) may have come since the job started.
        monitor.setParameters(sourceParameters(job.record.options, transport)),
      ]);
      // The destination's qemu demands the stream over TLS; its certificate must name the host streamed to.
      if (this.ctx.streamTls) await monitor.useTls(await this.ctx.domains.qemuTlsDir(entry), 'client', streamHost);
      if (!options.live) await monitor.pause();
    })();
    await settled(recorded, setUp);
    // Only now, with the finishToken recorded: the rollback's Finish2 then ends the destination's qemu at once.
    if (job.record.cancelRequested) throw new StreamEnded('cancelled', 'cancelled', 'cancelled before the stream started');
    // Kept in memory, written with the next phase (as firstByteMs).
    job.record.timings = { ...job.record.timings, setupMs: Date.now() - started };
    await this.ctx.hold('before-migrate', job.id);
    await monitor.migrate(uri);
    // A cancel answered before this point found no stream to cancel: cancel it now.
    if (job.record.cancelRequested) await monitor.cancelMigration();
    return followStream(job, monitor, this.ctx, () => this.switchToPostcopy(job, monitor));
  }

  /**
   * Prepare2, retried while the destination says "not now" (503 + Retry-After), bounded. A
   * destination older than the transport agreement refuses the offer as an unknown property
   * (nothing was started there): it is asked once more without it, and its answer, without a
   * transport, means one plain stream (agreedTransport).
   */
  private async prepare2(job: SourceJob, body: Prepare2Request): Promise<Prepare2Response> {
    const deadline = Date.now() + 120_000;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.ctx.peers.call<Prepare2Response>(job.record.peer.url!, 'POST', '/prepare2', body, 60_000);
      } catch (err) {
        if (body.transport && err instanceof PeerRefusedError && err.unknownProperties.includes('transport')) {
          const { transport: _offer, ...older } = body;
          body = older;
          continue;
        }
        // An agent older than postcopy in the offer: asked again without it (the stream then has none, unless allowPostcopy asked for it).
        if (body.transport?.postcopy !== undefined && err instanceof PeerRefusedError && err.unknownProperties.includes('postcopy')) {
          const { postcopy: _postcopy, ...offer } = body.transport;
          body = { ...body, transport: offer };
          continue;
        }
        const retryAfter = err instanceof PeerRefusedError && err.peerStatus === 503 ? err.retryAfterSeconds ?? 5 : undefined;
        if (retryAfter === undefined || Date.now() + retryAfter * 1000 > deadline || job.record.cancelRequested) throw err;
        await this.ctx.jobs.update(job, { waiting: `destination busy (attempt ${attempt}); retrying Prepare2 in ${retryAfter}s` });
        await sleep(retryAfter * 1000);
      }
    }
  }

  /**
   * The stream completed: the source guest is paused; the destination decides who owns it.
   * `completion`: how this run saw the stream end (none after a restart), for the switch-over time
   * the guest saw and the time from the stream's end to the guest running there. `entry`,
   * here and in confirm and rollBack, is undefined when the domain is gone from this host (a
   * transient one whose qemu ended while the agent was down): the job still ends by its phase.
   */
  private async finishCompleted(job: SourceJob, entry: MigratingDomain | undefined, completion?: StreamCompletion): Promise<void> {
    const pausedAt = completion?.stoppedAt ?? completion?.endedAt ?? Date.now();
    const { jobs, log } = this.ctx;
    // One write while the guest is paused: both phases precede the same action, Finish2.
    if (job.record.phase !== 'asking-outcome') {
      await jobs.setPhase(job, 'asking-outcome', { finish: { rc: 0, attempts: 0 } }, job.record.phase === 'streaming' ? ['stream-completed'] : []);
    }
    await this.ctx.hold('before-finish2', job.id);
    // Asked while Finish2 is under way (they are for the record, never waited for before it), so
    // the job need not wait for them after the answer.
    const figures = completion && entry?.run ? qemuFigures(entry.run.monitor, completion.info) : undefined;
    const outcome = await this.finish2.until(job, { migrationId: job.id, rc: 0, uuid: job.record.uuid, finishToken: job.record.finishToken });
    if (!outcome) return; // agent shutting down: the job stays in `asking-outcome` for the next start
    const { answer, finish } = outcome;
    if (answer.outcome === 'finished') {
      const running = guestResumedAt(Date.now(), pausedAt, answer.runningForMs);
      const timings = {
        ...job.record.timings,
        switchoverMs: running - pausedAt,
        ...(completion ? { streamEndToRunningMs: Math.max(0, running - completion.endedAt), ...(await (figures ?? qemuFigures(undefined, completion.info))) } : {}),
      };
      await this.confirm(job, entry, { waiting: undefined, finish, timings });
    } else {
      log.warn({ migration: job.id, error: answer.error }, 'destination aborted after the stream completed; resuming the source');
      const why = new StreamEnded('failed', answer.error?.code ?? 'destination_aborted', answer.error?.message ?? 'the destination aborted');
      // The guest waits to run here again: qemu's figures as the stream's end gave them, not asked again.
      const timings = completion ? { ...job.record.timings, ...(await qemuFigures(undefined, completion.info)) } : job.record.timings;
      await this.rollBack(job, entry, why, { waiting: undefined, finish, timings });
    }
  }

  /**
   * The destination owns the guest: end the paused source copy, then one write, through
   * `confirmed` to `done`. After a crash before it, the phase on disk (`asking-outcome`,
   * `postcopy`) has its rule ask the destination again, whose answer stays `finished` (it is
   * durable there), and ending a copy already gone is a no-op. `answered`: the Finish2 exchange,
   * recorded with it.
   */
  private async confirm(job: SourceJob, entry: MigratingDomain | undefined, answered: JobPatch = {}): Promise<void> {
    const { jobs, domains, log } = this.ctx;
    if (entry) await domains.commitOutgoing(entry, { undefine: job.record.options.undefineSource });
    await jobs.end(job, 'completed', undefined, answered, undefined, ['confirmed']);
    log.info({ migration: job.id, domain: job.record.domain, timings: job.record.timings }, 'migration completed');
  }

  /**
   * The migration failed: tell the destination (Finish2 rc!=0, which ends its empty qemu) and
   * make sure the guest runs here again if it ran before the migration. When the stream never
   * completed, the destination cannot run the guest (it resumes only on rc=0), so resuming here is
   * safe without waiting for it. `answered`: the destination already answered Finish2 (the
   * exchange, recorded with the phase).
   */
  private async rollBack(job: SourceJob, entry: MigratingDomain | undefined, why: StreamEnded, answered?: JobPatch): Promise<void> {
    const { jobs, log } = this.ctx;
    await jobs.setPhase(job, 'rolling-back', { ...answered, error: { code: why.code, message: why.message } });
    if (!answered) {
      await this.finish2.bestEffort(job, { migrationId: job.id, rc: 1, error: why.message, cancelled: why.status === 'cancelled', uuid: job.record.uuid, finishToken: job.record.finishToken });
    }
    let message = why.message;
    const monitor = entry?.run?.monitor;
    // A record written before agents kept the run state holds none: resume, as they did.
    if (monitor && job.record.runningBeforeMigration !== false) {
      const notResumed = await monitor.resumeAfterMigration(RESUME_TIMEOUT_MS, (reason) =>
        jobs.update(job, { waiting: `the guest resumes here as soon as it can: ${reason}` }),
      );
      if (notResumed) {
        log.error({ err: notResumed, migration: job.id }, 'could not resume the source guest');
        message += `; the source guest stays paused, resume it by hand: ${notResumed.message}`;
      }
    }
    if (entry) this.ctx.domains.release(entry);
    else message += '; the guest\'s qemu here had already ended';
    await jobs.end(job, why.status, { code: why.code, message });
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
    // In postcopy: `finished` once the stream completed (only Finish2's answer is missing), `aborted` once recovery gave up.
    const postcopyResolvable =
      isSourceJob(job) && job.record.phase === 'postcopy' &&
      (outcome === 'finished' ? job.record.stats?.qemuStatus === 'completed' : job.record.stats?.postcopy?.gaveUp === true);
    if (!isSourceJob(job) || job.terminal || !(job.record.phase === 'asking-outcome' || postcopyResolvable) || !job.record.waiting || job.record.resolution) {
      throw conflict(
        'not_waiting_on_destination',
        `job ${id} is not a source job waiting for an unknown Finish2 outcome (status ${job.record.status}, phase ${job.record.phase})`,
        { job: id },
      );
    }
    await jobs.update(job, { resolution: { outcome, reason, at: new Date().toISOString() } });
    this.ctx.log.warn({ migration: id, outcome, reason }, 'an operator resolved the migration');
    this.finish2.interrupt(id);
    await jobs.waitForEnd(job, RESOLVE_WAIT_MS);
    return job;
  }

  /**
   * What migrating `domain` with `options` would do, from its dirty rate measured now and the
   * stream rate expected to `destination`; nothing starts on the destination.
   */
  async forecast(req: { domain: string; destination?: string; options?: ForecastOptions }): Promise<Forecast> {
    const { domains, jobs } = this.ctx;
    const entry = domains.get(req.domain);
    const monitor = entry.run?.monitor;
    if (!monitor) throw conflict('domain_not_running', `domain ${req.domain} is not running`, { domain: req.domain });
    const started = Date.now();
    const dirtyRateBytesPerSec = await monitor.measureDirtyRate(FORECAST_SAMPLE_SECONDS);
    return buildForecast({
      domain: entry.name,
      memoryBytes: entry.def.memoryKiB * 1024,
      dirtyRateBytesPerSec,
      measuredForMs: Date.now() - started,
      options: { ...req.options },
      // Where the destination can take it (its GET /host says whether).
      postcopyArmed: offerTransport(migrationOptions(req.options ?? {}), this.ctx.hostInfo().migrationChannels).postcopy === true,
      lastRateBytesPerSec: req.destination ? lastStreamRate(jobs.list().map((j) => j.record), req.destination) : undefined,
    });
  }

  /**
   * New stream limits for a running job: kept in its options (the stream's set-up and the
   * convergence policy read them from there) and, while qemu streams, applied to it at once.
   */
  async tune(id: string, tuning: StreamTuning): Promise<SourceJob> {
    const { jobs, domains } = this.ctx;
    const job = jobs.require(id);
    if (!isSourceJob(job)) throw conflict('not_tunable', 'only the source side of a migration sets its stream limits', { job: id });
    return jobs.locks.run(`tune:${id}`, async () => {
      if (job.terminal) throw conflict('job_ended', `job ${id} already ${job.record.status}`, { job: id });
      if (SOURCE_OBLIGATIONS[job.record.phase].decides !== 'source') {
        throw conflict('too_late_to_tune', `job ${id} is past the stream (phase ${job.record.phase})`, { job: id });
      }
      await jobs.update(job, { options: { ...job.record.options, ...tuning } });
      const monitor = domains.find(job.record.domain)?.run?.monitor;
      // Before the stream's set-up this is overwritten by the same values; during the stream it is what changes it.
      if (monitor) await monitor.setParameters(tuningParameters(tuning));
      this.ctx.log.info({ migration: id, ...tuning }, 'stream limits changed');
      return job;
    });
  }

  async cancel(id: string): Promise<SourceJob> {
    const job = this.ctx.jobs.require(id);
    if (!isSourceJob(job)) throw conflict('not_cancellable', 'only the source side of a migration can cancel it', { job: id });
    if (job.terminal) throw conflict('job_ended', `job ${id} already ${job.record.status}`, { job: id });
    if (SOURCE_OBLIGATIONS[job.record.phase].cancel === 'refused') {
      throw conflict('too_late_to_cancel', `job ${id} is past the stream (phase ${job.record.phase}); the destination decides now`, { job: id });
    }
    // Under the switch's lock: a stream switched to postcopy must never be cancelled (the guest would be lost).
    return this.ctx.jobs.locks.run(`stream:${id}`, async () => {
      if (SOURCE_OBLIGATIONS[job.record.phase].cancel === 'refused') {
        throw conflict('too_late_to_cancel', `job ${id} is past the stream (phase ${job.record.phase}); the destination decides now`, { job: id });
      }
      // Written before the answer: the stream's start and a restarted agent's recovery both honour it.
      await this.ctx.jobs.update(job, { cancelRequested: true });
      const entry = this.ctx.domains.find(job.record.domain);
      if (job.record.phase === 'streaming' && entry?.run) await entry.run.monitor.cancelMigration();
      return job;
    });
  }

  /**
   * Complete a running stream now (POST /jobs/{id}/complete): `postcopy` switches it to postcopy
   * (the migration must allow it), `pause` pauses the guest so the rest copies. Default: postcopy
   * where allowed, else pause. Carried out by the stream follower within a poll.
   */
  async complete(id: string, mode?: 'postcopy' | 'pause'): Promise<SourceJob> {
    const job = this.ctx.jobs.require(id);
    if (!isSourceJob(job)) throw conflict('not_completable', 'only the source side of a migration completes its stream', { job: id });
    if (job.terminal) throw conflict('job_ended', `job ${id} already ${job.record.status}`, { job: id });
    const armed = postcopyArmed(job.record.options, job.record.transport);
    const chosen = mode ?? (armed ? 'postcopy' : 'pause');
    if (chosen === 'postcopy' && !armed) {
      throw conflict('postcopy_not_allowed', `job ${id}'s stream is not set up for postcopy (transport ${JSON.stringify(job.record.transport ?? {})}; allowPostcopy arms it): use mode pause`, { job: id });
    }
    if (SOURCE_OBLIGATIONS[job.record.phase].decides !== 'source' || job.record.cancelRequested) {
      throw conflict('too_late_to_complete', `job ${id} is past the stream or cancelled (phase ${job.record.phase})`, { job: id });
    }
    if (!job.record.completeRequested) await this.ctx.jobs.update(job, { completeRequested: { mode: chosen, at: new Date().toISOString() } });
    return job;
  }

  /** An operator's POST /jobs/{id}/recover: the broken postcopy stream is recovered again, at once (its bound starts afresh). */
  async recoverPostcopy(id: string): Promise<SourceJob> {
    const job = this.ctx.jobs.require(id);
    if (!isSourceJob(job) || job.terminal || job.record.phase !== 'postcopy') {
      throw conflict('not_in_postcopy', `job ${id} is not a source job following a postcopy stream (status ${job.record.status}, phase ${job.record.phase})`, { job: id });
    }
    if (job.record.stats?.postcopy?.state === 'active' || !this.postcopy.recoverNow(id)) {
      throw conflict('postcopy_not_broken', `the postcopy stream of job ${id} is not broken (${job.record.stats?.postcopy?.state ?? 'unknown'}): nothing to recover`, { job: id });
    }
    this.ctx.log.warn({ migration: id }, 'postcopy recovery asked by an operator');
    return job;
  }

  close(): void {
    this.closed = true;
  }
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
