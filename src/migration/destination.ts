import { AgentError, badRequest, conflict } from '../errors.js';
import { secretsMatch } from '../secrets.js';
import { POSTCOPY_STREAM_STATUSES, type MigrationMonitor } from '../qemu/migration-monitor.js';
import type { MigratingDomain } from './domains.js';
import { acceptTransport, DEFAULT_OPTIONS, postcopyArmed, destinationCapabilities, destinationParameters, parseDestUri, PLAIN_STREAM, POSTCOPY_CAPABILITY, type StreamTransport } from './params.js';
import type { RecoverRequest, RecoverResponse } from './postcopy.js';
import { Wakeup } from './wakeup.js';
import { pickPort, portIsFree } from './ports.js';
import { streamAddressOf } from './stream-sockets.js';
import { setTimeout as delay } from 'node:timers/promises';
import { CRASHED_JOB_RETRY_MS, isDestinationJob, settled, type DestinationJob } from './jobs.js';
import { DESTINATION_OBLIGATIONS, unhandledPhase, type DestinationPhase } from './phases.js';
import { newFinishToken, type Finish2Request, type Finish2Response, type MigrationContext, type Prepare2Request, type Prepare2Response } from './protocol.js';

/** Finish2(rc=0) before the incoming side completed: how often qemu is asked again when no MIGRATION event comes. */
const INCOMING_TAIL_POLL_MS = 100;

/** Beyond the source's own recovery bound: how long a destination waits for a recovery before it ends its job. */
const POSTCOPY_GRACE_MS = 60_000;
/** Finish2 rc!=0 in postcopy: how long the stream may still complete from what is in flight. */
const SOURCE_ENDED_TAIL_MS = 2000;
/** query-migrate on a destination whose main loop may wait for a page: its answer is not waited for longer. */
const RECOVER_QUERY_TIMEOUT_MS = 3000;

/** Phases in which a repeated Prepare2 is answered again: the incoming qemu is there and waits. */
const ACTIVE_INCOMING_PHASES = new Set<DestinationPhase>(['listening', 'receiving', 'received']);

/**
 * The destination's half of protocol v2: Prepare2 starts an empty qemu waiting for the stream,
 * Finish2 either hands the guest over to this host or ends that qemu. The destination never
 * resumes a guest except on Finish2(rc=0); that single rule is what lets the source decide
 * safely whether to resume its own copy.
 */
export class DestinationSide {
  private readonly ctx: MigrationContext;
  private closed = false;
  /** Each running job's bound on its phase: a lease (listening, received) or the stream watch (receiving). */
  private readonly leases = new Map<string, NodeJS.Timeout>();
  /**
   * Prepare2s admitted but not yet answered, with the port each has picked: they count against
   * --max-incoming and hold their port before their job record names it (see reservedPorts).
   */
  private readonly inFlight = new Map<string, number | undefined>();

  constructor(ctx: MigrationContext) {
    this.ctx = ctx;
  }

  async prepare(req: Prepare2Request): Promise<Prepare2Response> {
    const { jobs } = this.ctx;
    return jobs.locks.run(req.migrationId, async () => {
      const existing = jobs.get(req.migrationId);
      if (existing && !isDestinationJob(existing)) throw new AgentError(400, 'same_host', `migration ${existing.id} is an outgoing one on this agent`);
      if (existing) return this.replayPrepare(existing);
      return this.prepareNew(req);
    });
  }

  private replayPrepare(job: DestinationJob): Prepare2Response {
    const { record } = job;
    if (record.status === 'running' && record.uri && ACTIVE_INCOMING_PHASES.has(record.phase)) {
      return this.prepareAnswer(record.id, record.uri, record.finishToken!, record.transport);
    }
    throw conflict('migration_ended', `migration ${record.id} is ${record.status} (phase ${record.phase}) here`, {
      job: record.id,
      ...(record.error ? { cause: record.error } : {}),
    });
  }

  /** `transport`: what this qemu is set to; a record older than the agreement holds none, and its qemu listens plain. */
  private prepareAnswer(migrationId: string, uri: string, finishToken: string, transport: StreamTransport | undefined): Prepare2Response {
    const host = this.ctx.hostInfo();
    return { migrationId, uri, destination: { hostUuid: host.uuid, hostname: host.hostname }, finishToken, ...(transport ? { transport } : {}) };
  }

  private async prepareNew(req: Prepare2Request): Promise<Prepare2Response> {
    const { config, jobs } = this.ctx;
    if (req.source.hostUuid === this.ctx.hostInfo().uuid) {
      throw new AgentError(400, 'same_host', 'source and destination are the same agent');
    }
    // Counted synchronously with the prepares still in flight, so concurrent Prepare2s cannot all
    // slip in; a prepare whose job record exists already is in both, and counts once.
    const admitted = new Set([...jobs.running('destination').map((j) => j.id), ...this.inFlight.keys()]);
    if (admitted.size >= config.maxIncoming) {
      throw new AgentError(503, 'too_many_migrations', `this agent already receives ${config.maxIncoming} migrations`, {
        retryAfterSeconds: 5,
      });
    }
    this.inFlight.set(req.migrationId, undefined);
    try {
      return await this.prepareAdmitted(req);
    } finally {
      this.inFlight.delete(req.migrationId);
    }
  }

  private async prepareAdmitted(req: Prepare2Request): Promise<Prepare2Response> {
    const { domains, jobs, log } = this.ctx;
    const { xml, def } = await domains.validate(req.xml);
    const accelerator = domains.accelOf(def);
    if (req.source.accelerator && req.source.accelerator !== accelerator) {
      throw conflict('accelerator_mismatch', `the guest runs on ${req.source.accelerator} at the source but would run on ${accelerator} here`);
    }
    await domains.checkFirmwareSizes({ uuid: def.uuid, def }, req.firmware);
    const postcopy = this.ctx.userfaultfd;
    // Asked for by the caller: refused before any qemu starts where this host cannot take it.
    if (req.options.allowPostcopy && postcopy.via === 'none') throw postcopyUnavailable(postcopy.reason);
    // A source older than the agreement offers nothing and streams plain.
    let transport = req.transport ? acceptTransport(req.transport, this.ctx.hostInfo().migrationChannels, postcopy.via !== 'none') : PLAIN_STREAM;
    const receivesPostcopy = postcopyArmed(req.options, transport);
    const entry = domains.beginIncoming(xml, def, req.migrationId);
    let job: DestinationJob | undefined;
    try {
      const listen = await this.choosePort(req.migrationId, req.desturi);
      const listenUri = `tcp:${listen.host}:${listen.port}`;
      // One write, through starting-incoming to listening, before qemu starts: the phase precedes
      // its action (qemu listening, then the answer). A restart that finds it with no qemu ends the
      // job at once; one that finds qemu not yet listening waits under a lease that ends it all the same.
      const created = jobs.create(
        {
          id: req.migrationId,
          role: 'destination',
          domain: def.name,
          uuid: def.uuid,
          options: { ...DEFAULT_OPTIONS, ...req.options, compression: transport.compression },
          peer: { hostUuid: req.source.hostUuid, hostname: req.source.hostname },
          finishToken: newFinishToken(),
          transport,
          uri: listenUri,
        },
        'listening',
        ['starting-incoming'],
      );
      // The record precedes qemu's start, which waits for its write; the host-side preparation
      // (the guest's files opened and checked) runs meanwhile.
      const launched = domains.launch(entry, { incoming: true, after: created, postcopy: receivesPostcopy, recordLater: true });
      const [recordWritten, qemuStarted] = await Promise.allSettled([created, launched]);
      if (recordWritten.status === 'rejected') throw recordWritten.reason;
      job = recordWritten.value;
      if (qemuStarted.status === 'rejected') throw qemuStarted.reason;
      const { run: { monitor }, recorded } = qemuStarted.value;
      const setUp = (async () => {
        // Before migrate-incoming: qemu opens its multifd listeners with it. Sent together: qemu
        // takes them in order, one round trip.
        const postcopySet = receivesPostcopy ? this.enablePostcopy(monitor, req.options.allowPostcopy === true) : undefined;
        const transportSet = Promise.all([
          monitor.setCapabilities(destinationCapabilities(transport)),
          postcopySet,
          monitor.setParameters(destinationParameters(transport)),
        ]);
        if (this.ctx.streamTls || receivesPostcopy) {
          // What may be refused for a reason of its own (postcopy, the TLS files) is, before qemu listens.
          await transportSet;
          if ((await postcopySet) === false) {
            // Only offered: the stream goes on without postcopy, and the record says so before the answer does.
            transport = { ...transport, postcopy: false };
            await jobs.update(job!, { transport });
          }
          if (this.ctx.streamTls) await monitor.useTls(await domains.qemuTlsDir(entry), 'server');
          await monitor.listenIncoming(listenUri);
        } else {
          await Promise.all([transportSet, monitor.listenIncoming(listenUri)]);
        }
      })();
      this.followIncoming(job, entry);
      // Its runtime record is written meanwhile: the answer waits for both.
      await settled(setUp, recorded);
      this.armBound(job);
      await this.ctx.hold('prepare2', job.id);
      log.info({ migration: job.id, domain: def.name, uri: listenUri }, 'prepared incoming migration');
      return this.prepareAnswer(job.id, listenUri, job.record.finishToken!, transport);
    } catch (err) {
      if (job) await this.abort(job, entry, { code: 'prepare_failed', message: (err as Error).message });
      else domains.release(entry);
      if (err instanceof AgentError) throw err;
      throw new AgentError(500, 'prepare_failed', `could not prepare the incoming qemu: ${(err as Error).message}`);
    }
  }

  /**
   * A source that may switch to postcopy needs this qemu to take it. Asked for (`required`): refused
   * before the stream, with qemu's reason. Only offered: false, and the stream goes on without it.
   */
  private async enablePostcopy(monitor: MigrationMonitor, required: boolean): Promise<boolean> {
    try {
      await monitor.setCapabilities(POSTCOPY_CAPABILITY);
      return true;
    } catch (err) {
      if (required) throw postcopyUnavailable(`qemu: ${(err as Error).message}`);
      this.ctx.log.warn({ err: (err as Error).message }, 'this qemu cannot take postcopy: the stream is offered without it');
      return false;
    }
  }

  /** Ports of running incoming jobs (from their URIs) and of prepares still in flight. */
  private reservedPorts(): Set<number> {
    const ofJobs = this.ctx.jobs
      .running('destination')
      .flatMap((j) => [j.record.uri, j.record.recoveryUri].flatMap((uri) => (uri ? [streamAddressOf(uri).port] : [])));
    const ofPrepares = [...this.inFlight.values()].filter((p): p is number => p !== undefined);
    return new Set([...ofJobs, ...ofPrepares]);
  }

  private async choosePort(migrationId: string, desturi?: string): Promise<{ host: string; port: number }> {
    const { config } = this.ctx;
    const reserved = this.reservedPorts();
    if (desturi) {
      const wanted = parseDestUri(desturi);
      // A caller may pick the port, never another address or a port outside the range.
      const { low, high } = config.migrationPorts;
      if (wanted.host !== config.migrationAddress || wanted.port < low || wanted.port > high) {
        throw badRequest('desturi_not_allowed', `desturi must be tcp://${config.migrationAddress}:PORT with PORT in ${low}-${high} (--migration-address, --migration-ports), got ${desturi}`);
      }
      if (reserved.has(wanted.port) || !(await portIsFree(wanted.host, wanted.port))) {
        throw conflict('port_in_use', `port ${wanted.port} on ${wanted.host} is in use`);
      }
      this.inFlight.set(migrationId, wanted.port);
      return wanted;
    }
    // Reserved before the first await returns control, so a concurrent Prepare2 skips it.
    const port = await pickPort(config.migrationAddress, config.migrationPorts, reserved, (p) => this.inFlight.set(migrationId, p));
    if (port === null) {
      throw new AgentError(503, 'no_migration_port', `no free port in ${config.migrationPorts.low}-${config.migrationPorts.high}`, {
        retryAfterSeconds: 5,
      });
    }
    return { host: config.migrationAddress, port };
  }

  /** Follow the incoming stream through qemu's MIGRATION events and the qemu's own exit. */
  private followIncoming(job: DestinationJob, entry: MigratingDomain): void {
    const { domains, jobs } = this.ctx;
    const stopEvents = entry.run!.monitor.onMigrationEvent((e) => {
      if (e.kind !== 'status' || job.terminal) return;
      const { status } = e;
      void jobs.locks
        .run(job.id, async () => {
          if (job.terminal) return;
          const phase = job.record.phase;
          if (phase === 'postcopy-active') {
            await this.postcopyEvent(job, status);
          } else if (status === 'postcopy-active' && (phase === 'listening' || phase === 'receiving')) {
            await this.takeOverPostcopy(job, entry);
          } else if (status === 'active' && phase === 'listening') {
            await jobs.setPhase(job, 'receiving');
            this.armBound(job);
          } else if (status === 'completed' && (phase === 'listening' || phase === 'receiving')) {
            await jobs.setPhase(job, 'received');
            this.armBound(job);
          } else if (status === 'failed') {
            await this.abort(job, entry, { code: 'stream_failed', message: 'the incoming stream failed' });
          }
        })
        .catch((err: unknown) => this.settleCrash(job, err));
    });
    // Listeners of this job only: they leave with it (the arrived guest's qemu may run on for ever).
    const stopFollowing = () => {
      stopExits();
      stopEvents();
    };
    const onExit = (name: string) => {
      if (name !== entry.name) return;
      stopFollowing();
      void jobs.locks
        .run(job.id, async () => {
          if (job.terminal || job.record.phase === 'taking-over') return;
          if (job.record.phase === 'postcopy-active') return this.postcopyGuestEnded(job, 'its qemu ended during postcopy');
          await this.abort(job, entry, { code: 'destination_qemu_ended', message: 'the incoming qemu ended before Finish2' });
        })
        .catch((err: unknown) => this.settleCrash(job, err));
    };
    const stopExits = domains.onExit(onExit);
    job.once('end', stopFollowing);
  }

  async finish(req: Finish2Request): Promise<Finish2Response> {
    const { jobs } = this.ctx;
    return jobs.locks.run(req.migrationId, async () => {
      const job = jobs.get(req.migrationId);
      if (!job || !isDestinationJob(job)) {
        // No record (never prepared here, or removed as old history). "Never ran here" is what the
        // source will conclude, so say it only when no qemu of this guest runs here.
        const active = req.uuid ? this.ctx.domains.list().find((d) => d.uuid === req.uuid && this.ctx.domains.isActive(d)) : undefined;
        if (active) {
          throw conflict(
            'guest_active_here',
            `no record of migration ${req.migrationId} here, but domain ${active.name} (uuid ${req.uuid}) runs here: the outcome cannot be told`,
            { domain: active.name },
          );
        }
        throw new AgentError(404, 'migration_not_found', `no incoming migration ${req.migrationId} here`);
      }
      requireSourceToken(job, req.finishToken, 'finish2_not_from_source', `Finish2 for migration ${req.migrationId}`, 'end it');
      if (job.record.finish?.outcome) return this.finishAnswer(job);
      if (job.record.phase === 'postcopy-active' && !job.terminal) return this.finishPostcopy(job, req);
      const entry = this.ctx.domains.find(job.record.domain);
      if (job.terminal || !entry?.run) {
        if (!job.terminal) await this.settlingOnThrow(job, this.abort(job, entry, { code: 'destination_qemu_ended', message: 'the incoming qemu is gone' }));
        // The incoming side already ended on its own (its qemu exits when the stream breaks);
        // the source's word tells why, so the record says cancelled when it was.
        const cancelled = req.cancelled === true && job.record.status === 'failed';
        await jobs.update(job, {
          finish: { rc: req.rc, attempts: 1, outcome: 'aborted' },
          ...(cancelled ? { status: 'cancelled' as const, error: { code: 'cancelled', message: req.error ?? 'cancelled by the source' } } : {}),
        });
        return this.finishAnswer(job);
      }
      if (req.rc !== 0) {
        await this.settlingOnThrow(job, this.abort(
          job,
          entry,
          { code: req.cancelled ? 'cancelled' : 'source_failed', message: req.error ?? `the source reported rc=${req.rc}` },
          req.cancelled ? 'cancelled' : 'failed',
          req.rc,
        ));
        return this.finishAnswer(job);
      }
      await this.settlingOnThrow(job, this.handOver(job, entry));
      return this.finishAnswer(job);
    });
  }

  /** A step Finish2 takes on a job: a throw is answered (the source asks again) and the job carried on by settleCrash meanwhile. */
  private async settlingOnThrow(job: DestinationJob, step: Promise<void>): Promise<void> {
    try {
      await step;
    } catch (err) {
      void this.settleCrash(job, err);
      throw err;
    }
  }

  private finishAnswer(job: DestinationJob): Finish2Response {
    const { record } = job;
    const resumedAt = record.resumedAt === undefined ? undefined : Date.parse(record.resumedAt);
    const outcome = record.finish?.outcome ?? (record.status === 'completed' ? 'finished' : 'aborted');
    return {
      migrationId: record.id,
      outcome,
      ...(outcome === 'finished' ? { state: record.options.paused ? 'paused' : 'running' } : {}),
      ...(record.phaseHistory.some((h) => h.phase === 'postcopy-active') ? { postcopy: true } : {}),
      ...(resumedAt !== undefined ? { runningForMs: Date.now() - resumedAt } : {}),
      ...(record.error ? { error: record.error } : {}),
    };
  }

  /** Finish2(rc=0): wait for the stream's tail, take ownership durably, resume the guest, answer. */
  private async handOver(job: DestinationJob, entry: MigratingDomain): Promise<void> {
    const { jobs, config, log } = this.ctx;
    const status = await this.waitIncomingComplete(job, entry.run!.monitor, config.incomingTimeoutSeconds * 1000);
    if (status !== 'completed') {
      await this.abort(job, entry, { code: 'incoming_incomplete', message: `the source said the stream completed, but here it is ${status}` }, 'failed', 0);
      return;
    }
    this.clearLease(job);
    await jobs.setPhase(job, 'taking-over', { finish: { rc: 0, attempts: 1 } });
    await this.ctx.hold('finish2', job.id);
    const arrival = await this.commitArrival(job, entry);
    if (!arrival) return;
    // Answered once the guest runs: the source may end its copy now. The job says `done` in
    // memory at once; on disk `taking-over` stays until the arrival's records are written (its
    // rule writes them after a restart), then `done` follows, and the history's pruning.
    this.closeHandOver(job, entry, arrival.stored).catch((err: unknown) => log.error({ err, migration: job.id }, 'could not record the finished hand-over; a restart completes it'));
  }

  /** From phase `taking-over` (also after a restart): the guest is this host's; start it and close the job. */
  async completeHandOver(job: DestinationJob, entry: MigratingDomain): Promise<void> {
    const arrival = await this.commitArrival(job, entry);
    if (arrival) await this.closeHandOver(job, entry, arrival.stored);
  }

  /**
   * The guest runs here, so the outcome is `finished`, kept in memory at once (the job's next
   * write carries it); `stored` resolves once the arrival is recorded (commitIncoming makes a
   * failed write again). Undefined when it could not run and the job was aborted.
   */
  private async commitArrival(job: DestinationJob, entry: MigratingDomain): Promise<{ stored: Promise<void> } | undefined> {
    const { domains, jobs, log } = this.ctx;
    const { options } = job.record;
    let stored: Promise<void>;
    try {
      ({ stored } = await domains.commitIncoming(entry, { persist: options.persistDestination, paused: options.paused }));
    } catch (err) {
      // No running copy exists here, so aborting is safe and tells the source to resume its own.
      log.error({ err, migration: job.id }, 'hand-over failed');
      await this.abort(job, entry, { code: 'resume_failed', message: (err as Error).message }, 'failed', 0);
      return undefined;
    }
    jobs.keep(job, { finish: { rc: 0, attempts: 1, outcome: 'finished' }, ...(!options.paused && !job.record.resumedAt ? { resumedAt: new Date().toISOString() } : {}) });
    return { stored };
  }

  /** The job's record says `done` in memory before this returns its promise (JobRegistry.end); on disk once `stored` is. */
  private closeHandOver(job: DestinationJob, entry: MigratingDomain, stored: Promise<void>): Promise<void> {
    // The outcome is the record's already (commitArrival).
    const ended = this.ctx.jobs.end(job, 'completed', undefined, {}, stored);
    return ended.then(() => this.ctx.log.info({ migration: job.id, domain: entry.name }, 'incoming migration finished; guest owned here'));
  }

  private async waitIncomingComplete(job: DestinationJob, monitor: MigrationMonitor, timeoutMs: number): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    // The tail is usually loaded within milliseconds of the source finishing: qemu's MIGRATION
    // event asks again at once; the pause only bounds the wait for one that does not come.
    const wakeup = new Wakeup();
    const stopEvents = monitor.onMigrationEvent((e) => {
      if (e.kind === 'status') wakeup.wake();
    });
    try {
      for (;;) {
        if (job.record.phase === 'received') return 'completed';
        let status: string;
        try {
          status = (await monitor.queryMigrate(5000)).status;
        } catch {
          return 'gone';
        }
        if (status === 'completed' || status === 'failed') return status;
        if (Date.now() > deadline) return `still ${status}`;
        await wakeup.sleep(INCOMING_TAIL_POLL_MS);
      }
    } finally {
      stopEvents();
    }
  }

  /**
   * End the empty qemu, put the entry back as it was, and close the job. `entry` is undefined
   * when the arrival's domain is already gone (its qemu ended while the agent was down).
   */
  async abort(
    job: DestinationJob,
    entry: MigratingDomain | undefined,
    error: { code: string; message: string },
    status: 'failed' | 'cancelled' = 'failed',
    rc?: number,
  ): Promise<void> {
    const { jobs, domains, log } = this.ctx;
    this.clearLease(job);
    await jobs.setPhase(job, 'aborting', {
      error,
      ...(rc !== undefined ? { finish: { rc, attempts: 1, outcome: 'aborted' as const } } : {}),
    });
    if (entry?.run) await domains.stopQemu(entry, 'failed');
    if (entry) domains.release(entry);
    await jobs.end(job, status, error);
    log.warn({ migration: job.id, domain: job.record.domain, error }, 'incoming migration aborted; its qemu is gone');
  }

  /** The bound the job's phase obliges (DESTINATION_OBLIGATIONS), armed afresh. */
  private armBound(job: DestinationJob): void {
    const bound = DESTINATION_OBLIGATIONS[job.record.phase].bound;
    if (bound.kind === 'lease') this.armLease(job, bound.why);
    else if (bound.kind === 'stream-watch') this.armStallWatch(job);
    else this.clearLease(job);
  }

  private armLease(job: DestinationJob, why: string): void {
    this.clearLease(job);
    const timer = setTimeout(() => {
      this.leases.delete(job.id);
      void this.boundExpired(job, 'lease', { code: 'incoming_timeout', message: `lease of ${this.ctx.config.incomingTimeoutSeconds}s expired: ${why}` })
        .catch((err: unknown) => this.settleCrash(job, err));
    }, this.ctx.config.incomingTimeoutSeconds * 1000);
    timer.unref();
    this.leases.set(job.id, timer);
  }

  /**
   * While the stream is under way: a source host that vanished (power loss, a partition that
   * never heals: no FIN, no RST, no Finish2) would leave qemu waiting on its socket for ever. When
   * no byte arrives for --incoming-timeout, the empty qemu is ended. Safe: until the stream
   * completed here, the source has not handed the guest over, so its copy is the one.
   */
  private armStallWatch(job: DestinationJob): void {
    this.clearLease(job);
    const boundMs = this.ctx.config.incomingTimeoutSeconds * 1000;
    const { host, port } = streamAddressOf(job.record.uri!);
    let bytes: number | undefined;
    let lastArrival = Date.now();
    let checking = false;
    const check = async () => {
      const now = await this.ctx.incomingBytes(host, port).catch((err: unknown) => {
        this.ctx.log.warn({ err, migration: job.id }, 'could not read the incoming stream\'s byte count');
        return bytes;
      });
      if (now !== undefined && now !== bytes) {
        bytes = now;
        lastArrival = Date.now();
        return;
      }
      if (Date.now() - lastArrival < boundMs) return;
      this.clearLease(job);
      await this.boundExpired(job, 'stream-watch', {
        code: 'stream_stalled',
        message: `no byte of the stream arrived for ${this.ctx.config.incomingTimeoutSeconds}s (${bytes ?? 0} bytes in all): the source host or the link is gone`,
      });
    };
    const timer = setInterval(() => {
      if (checking) return;
      checking = true;
      void check()
        .catch((err: unknown) => this.settleCrash(job, err))
        .finally(() => (checking = false));
    }, Math.min(5000, Math.max(250, boundMs / 4)));
    timer.unref();
    this.leases.set(job.id, timer);
  }

  /** A bound ran out: the empty qemu is ended, unless the job has moved on to a phase without that bound meanwhile. */
  private boundExpired(job: DestinationJob, kind: 'lease' | 'stream-watch', error: { code: string; message: string }): Promise<void> {
    return this.ctx.jobs.locks.run(job.id, async () => {
      if (job.terminal || DESTINATION_OBLIGATIONS[job.record.phase].bound.kind !== kind) return;
      await this.abort(job, this.ctx.domains.find(job.record.domain), error);
    });
  }

  private clearLease(job: DestinationJob): void {
    const timer = this.leases.get(job.id);
    if (timer) clearTimeout(timer);
    this.leases.delete(job.id);
  }

  /**
   * After an agent restart: a destination job that was mid-flight. The decision to own the
   * guest (phase taking-over) is carried out; anything short of it waits for Finish2 under a
   * fresh lease, or ends the empty qemu when it is already gone.
   */
  async recover(job: DestinationJob): Promise<void> {
    const { domains } = this.ctx;
    await this.ctx.jobs.locks.run(job.id, async () => {
      const entry = domains.find(job.record.domain);
      const phase = job.record.phase;
      if (phase === 'done') return;
      if (phase === 'taking-over' && entry) {
        // Claimed until the arrival is recorded: no lifecycle call comes in between.
        if (entry.run) domains.restoreClaim(entry, job.id, 'destination');
        return this.completeHandOver(job, entry);
      }
      // The guest is this host's since the switch (its claim ended then): follow the stream to its end.
      if (phase === 'postcopy-active') {
        if (entry?.run) domains.restoreClaim(entry, job.id, 'destination');
        if (!(await this.settlePostcopy(job)) && entry?.run) this.followIncoming(job, entry);
        return;
      }
      // Its qemu ended while the agent was down; a transient arrival's domain went with it.
      if (!entry?.run) return this.abort(job, entry, { code: 'destination_qemu_ended', message: 'the incoming qemu ended while the agent was down' });
      domains.restoreClaim(entry, job.id, 'destination');
      // The rule of each phase (DESTINATION_OBLIGATIONS[phase].restart); a phase without one does not compile.
      switch (phase) {
        case 'starting-incoming':
        case 'aborting':
          return this.abort(job, entry, job.record.error ?? { code: 'agent_restarted', message: 'the agent restarted while preparing' });
        case 'listening':
        case 'receiving': {
          // The stream may have ended, or switched to postcopy (the source needs no word from here for it), while the agent was down.
          const status = (await entry.run.monitor.queryMigrate().catch(() => ({ status: 'none' }))).status;
          if (POSTCOPY_STREAM_STATUSES.has(status)) {
            this.followIncoming(job, entry);
            return this.takeOverPostcopy(job, entry);
          }
          if (status === 'completed') await this.ctx.jobs.setPhase(job, 'received');
          break;
        }
        case 'received':
          break;
        case 'taking-over':
          return this.completeHandOver(job, entry);
        default:
          return unhandledPhase(phase);
      }
      this.followIncoming(job, entry);
      this.armBound(job);
    });
  }


  /**
   * A throw escaped a job's own handling (a bug, a failed write, in an event, a lease expiry or
   * a recovery): the job is carried on by the rule of its phase, attempt after attempt until it
   * ends, never left running with its domain blocked or an empty qemu behind. In `taking-over` this
   * host owns the guest: the hand-over is carried out. Before it no guest ran here: the incoming
   * qemu is ended and the job fails with code `internal`. Never rejects.
   */
  async settleCrash(job: DestinationJob, err: unknown): Promise<void> {
    const { jobs, domains, log } = this.ctx;
    for (let attempt = 0; !job.terminal && !this.closed; attempt++) {
      log.error({ err, migration: job.id, phase: job.record.phase, attempt }, 'incoming migration job crashed; carrying it on by its phase');
      const crashed = { code: 'internal', message: `internal error: ${(err as Error).message}` };
      try {
        await jobs.locks.run(job.id, async () => {
          if (job.terminal) return;
          // The rule of each phase (DESTINATION_OBLIGATIONS[phase].crash); a phase without one does not compile.
          const phase = job.record.phase;
          if (phase === 'postcopy-active') {
            // The job follows its stream's events still; this ends it once the stream did.
            await this.settlePostcopy(job);
            return;
          }
          const entry = domains.find(job.record.domain);
          if (!entry) return this.abort(job, undefined, crashed);
          switch (phase) {
            case 'taking-over':
              return this.completeHandOver(job, entry);
            case 'starting-incoming':
            case 'listening':
            case 'receiving':
            case 'received':
            case 'aborting':
              return this.abort(job, entry, crashed);
            case 'done':
              return;
            default:
              return unhandledPhase(phase);
          }
        });
        if (!job.terminal && job.record.phase === 'postcopy-active') {
          await delay(CRASHED_JOB_RETRY_MS[Math.min(attempt, CRASHED_JOB_RETRY_MS.length - 1)]!, undefined, { ref: false });
          continue;
        }
        return;
      } catch (again) {
        err = again;
      }
      await delay(CRASHED_JOB_RETRY_MS[Math.min(attempt, CRASHED_JOB_RETRY_MS.length - 1)]!, undefined, { ref: false });
    }
  }

  /**
   * The source switched the stream to postcopy: from now this host owns the guest (the source
   * never resumes its copy past the switch), so it runs here at once, while the pages it lacks
   * still arrive. The phase is written first; the job ends with the stream.
   */
  private async takeOverPostcopy(job: DestinationJob, entry: MigratingDomain): Promise<void> {
    const switchedAt = Date.now();
    this.clearLease(job);
    await this.ctx.jobs.setPhase(job, 'postcopy-active');
    this.armBound(job);
    await this.commitPostcopyArrival(job, entry, switchedAt);
  }

  /**
   * In `postcopy-active`: the guest becomes this host's and runs (unless asked to arrive paused),
   * once; recorded, so that a restart or a crash in between does it again. A failure is told, not
   * undone: nothing goes back now, the source's copy is out of date.
   */
  private async commitPostcopyArrival(job: DestinationJob, entry: MigratingDomain, switchedAt?: number): Promise<void> {
    const { jobs, domains, log } = this.ctx;
    if (job.record.arrivalCommitted) return;
    try {
      // The claim lasts until the stream ends: no lifecycle call or new migration may end a qemu that still pulls pages.
      const { stored } = await domains.commitIncoming(entry, { persist: job.record.options.persistDestination, paused: job.record.options.paused, keepClaim: true });
      await stored;
    } catch (err) {
      log.error({ err, migration: job.id }, 'the guest could not be resumed after the switch to postcopy');
      await jobs.update(job, { waiting: `the guest could not be resumed after the switch to postcopy: ${(err as Error).message}; resume it by hand (POST /domains/${entry.name}/resume)` });
      return;
    }
    // The agent's share of the guest's pause at the switch: from this qemu switching to the guest running (qemu's downtime at the source comes before it).
    await jobs.update(job, { arrivalCommitted: true, ...(switchedAt !== undefined ? { timings: { ...job.record.timings, switchoverMs: Date.now() - switchedAt } } : {}) });
    log.warn({ migration: job.id, domain: entry.name }, 'the stream switched to postcopy: the guest runs here while the rest of its memory arrives');
  }

  /** A status of a stream in postcopy: its breaks and recoveries are told, its end ends the job. */
  private async postcopyEvent(job: DestinationJob, status: string): Promise<void> {
    const { jobs, log } = this.ctx;
    if (status === 'completed') return this.endPostcopy(job);
    if (status === 'failed') return this.postcopyGuestEnded(job, 'the postcopy stream failed');
    if (status === 'postcopy-paused') {
      log.warn({ migration: job.id }, 'the postcopy stream broke; the guest stalls on the pages it lacks until the source recovers the stream');
      await jobs.update(job, { waiting: 'the postcopy stream broke: the guest waits for the pages it lacks until the source recovers the stream' });
      this.armPostcopyBound(job);
    } else if (status === 'postcopy-active' || status === 'postcopy-recover') {
      this.clearLease(job);
      if (status === 'postcopy-active' && job.record.waiting) {
        log.warn({ migration: job.id }, 'the postcopy stream runs again');
        await jobs.update(job, { waiting: undefined, recoveryUri: undefined });
      }
    }
  }

  /**
   * A broken postcopy stream that the source does not recover within its own bound (the
   * migration's postcopyRecoverySeconds) and a grace minute ends the job here (failed): the source
   * is gone, or gave up. The qemu is kept, unclaimed, for an operator; the agent never ends it.
   */
  private armPostcopyBound(job: DestinationJob): void {
    if (this.leases.has(job.id)) return;
    const boundMs = (job.record.options.postcopyRecoverySeconds ?? DEFAULT_OPTIONS.postcopyRecoverySeconds) * 1000 + POSTCOPY_GRACE_MS;
    const timer = setTimeout(() => {
      this.leases.delete(job.id);
      void this.ctx.jobs.locks
        .run(job.id, async () => {
          if (job.terminal || job.record.phase !== 'postcopy-active') return;
          await this.postcopyGuestEnded(job, `the source did not recover the broken postcopy stream within ${boundMs / 1000}s`);
        })
        .catch((err: unknown) => this.settleCrash(job, err));
    }, boundMs);
    timer.unref();
    this.leases.set(job.id, timer);
  }

  /** The postcopy stream completed: the whole guest is here. */
  private async endPostcopy(job: DestinationJob): Promise<void> {
    this.clearLease(job);
    const entry = this.ctx.domains.find(job.record.domain);
    if (entry) this.ctx.domains.endClaim(entry);
    await this.ctx.jobs.end(job, 'completed', undefined, { waiting: undefined, finish: { rc: 0, attempts: 0, outcome: 'finished' } });
    this.ctx.log.info({ migration: job.id, domain: job.record.domain }, 'incoming postcopy migration finished; guest owned here');
  }

  /** The stream cannot complete: the guest here lacks pages for good. Its qemu, if still there, is kept for an operator to look at. */
  private async postcopyGuestEnded(job: DestinationJob, why: string): Promise<void> {
    this.clearLease(job);
    const entry = this.ctx.domains.find(job.record.domain);
    // The claim ends, the definition that arrived stays: what is left is the operator's to look at and end.
    if (entry) this.ctx.domains.endClaim(entry);
    const error = { code: 'postcopy_failed', message: `${why}: the guest ran here since the switch to postcopy, but lacks memory that stayed at the source` };
    this.ctx.log.error({ migration: job.id, domain: job.record.domain, error }, 'incoming postcopy migration failed');
    await this.ctx.jobs.end(job, 'failed', error, { waiting: undefined });
  }

  /**
   * Phase `postcopy-active` after a restart or a crash: the arrival committed if it was not yet,
   * and the job ended when its stream has ended. True when the job ended.
   */
  private async settlePostcopy(job: DestinationJob): Promise<boolean> {
    const entry = this.ctx.domains.find(job.record.domain);
    const monitor = entry?.run?.monitor;
    if (!entry || !monitor) {
      await this.postcopyGuestEnded(job, 'its qemu ended during postcopy');
      return true;
    }
    await this.commitPostcopyArrival(job, entry);
    const status = (await monitor.queryMigrate().catch(() => ({ status: 'none' }))).status;
    if (status === 'completed') await this.endPostcopy(job);
    else if (status === 'failed') await this.postcopyGuestEnded(job, 'the postcopy stream failed');
    return job.terminal;
  }

  /**
   * Finish2 of a stream in postcopy: rc=0 once the stream completed (waited for, bounded; the
   * source asks again on a 503). rc!=0: the source cannot complete the stream (its qemu is gone,
   * or it failed): the job fails with its word, and the guest's qemu here is kept for an operator,
   * never ended by Finish2 (it ran the guest since the switch).
   */
  private async finishPostcopy(job: DestinationJob, req: Finish2Request): Promise<Finish2Response> {
    const monitor = this.ctx.domains.find(job.record.domain)?.run?.monitor;
    if (req.rc !== 0) {
      // The source can send nothing more; its stream may have completed all the same (its qemu
      // ended after it), which only this qemu can tell: the tail in flight is given a moment.
      const status = monitor ? await this.waitIncomingComplete(job, monitor, SOURCE_ENDED_TAIL_MS) : 'gone';
      if (status === 'completed') await this.endPostcopy(job);
      else await this.postcopyGuestEnded(job, `the source cannot complete the postcopy stream (rc=${req.rc}: ${req.error ?? 'no reason given'}), and it is ${status} here`);
      return this.finishAnswer(job);
    }
    const status = monitor ? await this.waitIncomingComplete(job, monitor, 10_000) : 'gone';
    if (status === 'completed') await this.endPostcopy(job);
    else if (status === 'failed' || status === 'gone') await this.postcopyGuestEnded(job, status === 'gone' ? 'its qemu ended during postcopy' : 'the postcopy stream failed');
    else throw new AgentError(503, 'postcopy_in_progress', `the postcopy stream of ${job.id} is ${status} here`, { retryAfterSeconds: 1 });
    return this.finishAnswer(job);
  }

  /**
   * POST /recover2: the source found the postcopy stream broken. This qemu's end is broken too
   * (migrate-pause, when it has not noticed: a dead link sends nothing), then listens on a fresh
   * port for the source to resume the stream (migrate-recover). Only the source that prepared the
   * migration may ask (its finishToken). Repeated while a recovery listens: the same answer.
   */
  async recoverPostcopy(req: RecoverRequest): Promise<RecoverResponse> {
    const { jobs, log } = this.ctx;
    return jobs.locks.run(req.migrationId, async () => {
      const job = jobs.get(req.migrationId);
      if (!job || !isDestinationJob(job)) throw new AgentError(404, 'migration_not_found', `no incoming migration ${req.migrationId} here`);
      requireSourceToken(job, req.finishToken, 'recover_not_from_source', `recovery of migration ${req.migrationId}`, 'recover its stream');
      const entry = this.ctx.domains.find(job.record.domain);
      const monitor = entry?.run?.monitor;
      if (job.terminal) {
        throw conflict('not_in_postcopy', `migration ${req.migrationId} is not in postcopy here (status ${job.record.status}, phase ${job.record.phase})`, { job: job.id });
      }
      // Not yet attached again after a restart: ask again soon.
      if (!entry || !monitor) throw new AgentError(503, 'postcopy_not_ready', `the qemu of migration ${job.id} is not attached here yet`, { retryAfterSeconds: 1 });
      let status = (await monitor.queryMigrate(RECOVER_QUERY_TIMEOUT_MS).catch(() => ({ status: 'no answer' }))).status;
      // A switch this agent did not see (it was down, or its write failed): the guest is this host's.
      if (job.record.phase !== 'postcopy-active' && POSTCOPY_STREAM_STATUSES.has(status)) await this.takeOverPostcopy(job, entry);
      if (job.record.phase !== 'postcopy-active') {
        throw conflict('not_in_postcopy', `migration ${req.migrationId} is not in postcopy here (status ${job.record.status}, phase ${job.record.phase})`, { job: job.id });
      }
      if (status === 'postcopy-recover' && job.record.recoveryUri) return { migrationId: job.id, uri: job.record.recoveryUri };
      if (status === 'postcopy-active' || status === 'no answer') {
        log.warn({ migration: job.id, status }, 'the source found the postcopy stream broken; breaking this end too');
        await monitor.pausePostcopy().catch((err: unknown) => log.warn({ err, migration: job.id }, 'could not pause this end of the postcopy stream'));
      }
      // qemu shuts the stream down and reports the pause within milliseconds; bounded at 5 s. A main
      // loop that does not answer waits for a page: the out-of-band migrate-recover goes ahead.
      for (let i = 0; i < 100 && status !== 'postcopy-paused' && status !== 'no answer'; i++) {
        await delay(50);
        status = (await monitor.queryMigrate(RECOVER_QUERY_TIMEOUT_MS).catch(() => ({ status: 'no answer' }))).status;
      }
      if (status !== 'postcopy-paused' && status !== 'no answer') throw new AgentError(503, 'postcopy_not_paused', `the postcopy stream of ${job.id} is ${status} here`, { retryAfterSeconds: 1 });
      const listen = await this.choosePort(job.id);
      try {
        const uri = `tcp:${listen.host}:${listen.port}`;
        await monitor.listenForRecovery(uri);
        await jobs.update(job, { recoveryUri: uri });
        log.warn({ migration: job.id, uri }, 'listening for the source to recover the postcopy stream');
        return { migrationId: job.id, uri };
      } finally {
        this.inFlight.delete(job.id);
      }
    });
  }

  close(): void {
    this.closed = true;
    for (const timer of this.leases.values()) clearTimeout(timer);
    this.leases.clear();
  }
}

/**
 * Only the source that got the Prepare2 answer may end or recover the migration: its call must
 * carry that answer's finishToken (403 `code` otherwise). A record without one was prepared
 * before agents had finishTokens (an upgrade mid-migration).
 */
function requireSourceToken(job: DestinationJob, token: string | undefined, code: string, what: string, may: string): void {
  if (job.record.finishToken !== undefined && !secretsMatch(token, job.record.finishToken)) {
    throw new AgentError(403, code, `${what} does not carry the finishToken of its Prepare2 answer: only the source that prepared it may ${may}`);
  }
}

function postcopyUnavailable(why: string) {
  return conflict('postcopy_unavailable', `this host's qemu cannot receive a postcopy stream: ${why}. Migrate without allowPostcopy, or allow postcopy here`);
}
