import type { RecoverRequest, RecoverResponse } from './postcopy.js';
import type { Logger } from '../log.js';
import type { AgentConfig } from '../config.js';
import type { RecordStore } from '../store/state-store.js';
import type { MigrationDomains } from './domains.js';
import type { HostInfo } from '../host-info.js';
import { isDestinationJob, isSourceJob, JobRegistry, type Job } from './jobs.js';
import { PeerClient } from './peer-client.js';
import { incomingStreamBytes, resetOutgoingStream } from './stream-sockets.js';
import type { TlsMaterial } from '../agent/tls.js';
import type { UserfaultfdAccess } from '../qemu/userfaultfd.js';
import { holdAt } from './holds.js';
import { DestinationSide } from './destination.js';
import { SourceSide, type PerformRequest } from './source.js';
import type { StreamTuning } from './params.js';
import type { Forecast, ForecastOptions } from './forecast.js';
import type { Finish2Request, Finish2Response, MigrationContext, PeerCalls, Prepare2Request, Prepare2Response } from './protocol.js';

/** The agent's migration entry points, for both roles; the routes call only this. */
export class MigrationService {
  readonly jobs: JobRegistry;
  private readonly source: SourceSide;
  private readonly destination: DestinationSide;
  private readonly ctx: MigrationContext;

  constructor(opts: {
    config: AgentConfig;
    store: RecordStore;
    domains: MigrationDomains;
    hostInfo: () => HostInfo;
    log: Logger;
    /** The agent's certificate material, when it runs with TLS. */
    tls?: TlsMaterial;
    userfaultfd: UserfaultfdAccess;
    /** The fast tier's in-process peers and stream sockets; an agent calls peers over HTTP and asks the kernel. */
    peers?: PeerCalls;
    incomingBytes?: MigrationContext['incomingBytes'];
    resetStream?: MigrationContext['resetStream'];
  }) {
    this.jobs = new JobRegistry(opts.store, opts.config.jobHistory);
    const holds = opts.config.debugHolds ?? [];
    this.ctx = {
      config: opts.config,
      domains: opts.domains,
      hostInfo: opts.hostInfo,
      log: opts.log,
      jobs: this.jobs,
      peers: opts.peers ?? new PeerClient({ token: opts.config.token, tls: opts.tls }),
      incomingBytes: opts.incomingBytes ?? incomingStreamBytes,
      resetStream: opts.resetStream ?? resetOutgoingStream,
      streamTls: opts.tls !== undefined,
      userfaultfd: opts.userfaultfd,
      hold: (point, migrationId) => holdAt(point, holds, opts.config.stateDir, migrationId),
    };
    this.source = new SourceSide(this.ctx);
    this.destination = new DestinationSide(this.ctx);
  }

  /** Load job records and drive every unfinished one to a safe end (after a restart). */
  async init(): Promise<void> {
    const loaded = await this.jobs.load();
    await this.jobs.prune();
    for (const job of loaded) {
      if (job.terminal) continue;
      const recovery = async () => {
        // Recovery acts on the guest's qemu: not before the agent knows whether it runs (its monitor may not answer yet).
        if (!(await this.ctx.domains.settled(job.record.domain))) return;
        if (isSourceJob(job)) await this.source.recover(job).catch((err: unknown) => this.source.settleCrash(job, err));
        else if (isDestinationJob(job)) await this.destination.recover(job).catch((err: unknown) => this.destination.settleCrash(job, err));
      };
      void recovery().catch((err: unknown) => this.ctx.log.error({ err, migration: job.id }, 'job recovery failed'));
    }
  }

  perform(req: PerformRequest): Promise<Job> {
    return this.source.perform(req);
  }

  prepare2(req: Prepare2Request): Promise<Prepare2Response> {
    return this.destination.prepare(req);
  }

  finish2(req: Finish2Request): Promise<Finish2Response> {
    return this.destination.finish(req);
  }

  cancel(id: string): Promise<Job> {
    return this.source.cancel(id);
  }

  complete(id: string, mode?: 'postcopy' | 'pause'): Promise<Job> {
    return this.source.complete(id, mode);
  }

  recoverPostcopy(id: string): Promise<Job> {
    return this.source.recoverPostcopy(id);
  }

  recover2(req: RecoverRequest): Promise<RecoverResponse> {
    return this.destination.recoverPostcopy(req);
  }

  forecast(req: { domain: string; destination?: string; options?: ForecastOptions }): Promise<Forecast> {
    return this.source.forecast(req);
  }

  tune(id: string, tuning: StreamTuning): Promise<Job> {
    return this.source.tune(id, tuning);
  }

  resolve(id: string, outcome: 'finished' | 'aborted', reason: string): Promise<Job> {
    return this.source.resolve(id, outcome, reason);
  }

  async close(): Promise<void> {
    this.source.close();
    this.destination.close();
    await this.ctx.peers.close();
  }
}
