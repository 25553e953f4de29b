/**
 * The fast tier's simulated world: hosts whose qemu processes, stored definitions and job records
 * outlive the agents that run on them, and agents (the real MigrationService, SourceSide and
 * DestinationSide) that can die at any write and start again. Nothing here starts a process or
 * opens a connection: a qemu is an object whose migration stream is a timer, a peer call is a
 * method call on the other agent's service, a store is a map.
 *
 * An agent that dies is an incarnation that stops: every monitor call, store write and peer call
 * it makes from then on never returns (as a killed process never continues), and calls to it fail
 * as unreachable until the next incarnation starts on the same host.
 */
import type { UserfaultfdAccess } from '../../src/qemu/userfaultfd.js';
import { EventEmitter } from 'node:events';
import { AgentError } from '../../src/errors.js';
import { parseDomainXml } from '../../src/domain/parse.js';
import type { DomainDef } from '../../src/domain/model.js';
import { KeyedMutex } from '../../src/agent/lock.js';
import { DomainClaims } from '../../src/agent/claims.js';
import type { AgentConfig } from '../../src/config.js';
import type { HostInfo } from '../../src/host-info.js';
import type { Logger } from '../../src/log.js';
import { MigrationService } from '../../src/migration/service.js';
import type { MigratingDomain, MigrationDomains } from '../../src/migration/domains.js';
import type { JobRecord } from '../../src/migration/jobs.js';
import { PeerRefusedError, PeerUnreachableError } from '../../src/migration/peer-client.js';
import type { PeerCalls } from '../../src/migration/protocol.js';
import type { MigrationEvent, MigrationInfo, MigrationMonitor, MigrationStatus } from '../../src/qemu/migration-monitor.js';

/** A promise that never settles: what a dead process's next step is. */
const NEVER = new Promise<never>(() => undefined);

/** How long a simulated stream takes, in steps of STREAM_STEP_MS. */
const STREAM_STEPS = 4;
const STREAM_STEP_MS = 10;
const GUEST_BYTES = 64 * 1048576;

export interface QemuRecord {
  domain: string;
  uuid: string;
  xml: string;
  persistent: boolean;
  incoming: boolean;
}

/** A qemu process: it lives on when its agent dies, and ends only when killed or when an incoming stream fails. */
export class SimQemu {
  readonly id: number;
  readonly host: SimHost;
  record: QemuRecord;
  alive = true;
  /** The vCPUs run. */
  running: boolean;
  /** It holds the guest's memory: the source's original, or a destination's after a completed stream. */
  holdsGuest: boolean;
  migration: MigrationStatus = 'none';
  listenUri?: string;
  receivedBytes = 0;
  /** The capabilities and parameters set over the monitor (as qemu keeps them, across migrations). */
  readonly capabilities = new Map<string, boolean>();
  readonly parameters = new Map<string, number | string>();
  private peer?: SimQemu;
  private streamTimer?: NodeJS.Timeout;
  private step = 0;
  readonly events = new EventEmitter();

  constructor(id: number, host: SimHost, record: QemuRecord, opts: { running: boolean; holdsGuest: boolean }) {
    this.id = id;
    this.host = host;
    this.record = record;
    this.running = opts.running;
    this.holdsGuest = opts.holdsGuest;
  }

  private emit(e: MigrationEvent): void {
    this.events.emit('event', e);
  }

  private setStatus(status: MigrationStatus): void {
    this.migration = status;
    this.emit({ kind: 'status', status });
  }

  /** Source: stream to the destination qemu listening on `uri` (in the same world). */
  startStream(uri: string): void {
    if (this.migration === 'active') throw new Error('a migration is already under way');
    const target = this.host.world.listenerAt(uri);
    this.setStatus('active');
    // Both ends must carry the stream alike: a plain listener refuses multifd channels, and
    // compressed pages cannot be read raw.
    if (!target || this.transport() !== target.transport()) {
      this.setStatus('failed');
      if (target) {
        target.setStatus('failed');
        target.exit();
      }
      return;
    }
    this.peer = target;
    target.peer = this;
    target.setStatus('active');
    this.step = 0;
    this.streamTimer = setInterval(() => this.advance(), STREAM_STEP_MS);
  }

  private transport(): string {
    const multifd = this.capabilities.get('multifd') === true;
    return multifd ? `multifd ${this.parameters.get('multifd-channels') ?? 2} ${this.parameters.get('multifd-compression') ?? 'none'}` : 'plain';
  }

  private advance(): void {
    const target = this.peer;
    if (!target) return;
    const steps = this.host.world.streamSteps;
    if (this.migration === 'postcopy-paused' || this.migration === 'postcopy-recover') return;
    if (this.host.world.linkDown) {
      // A postcopy stream breaks on a dead link (its page requests fail): both ends pause. Else bytes do not flow; qemu waits on the socket.
      if (this.migration === 'postcopy-active') this.pausePostcopy();
      return;
    }
    this.step++;
    target.receivedBytes += GUEST_BYTES / steps;
    if (this.host.world.streamsBreak && this.step === steps / 2) {
      this.breakStream('failed');
      return;
    }
    if (this.step < steps) return;
    clearInterval(this.streamTimer);
    // Switch-over: the source stops, the last pages go, both sides complete (a postcopy's source stopped at the switch).
    if (this.migration === 'active') {
      this.running = false;
      this.emit({ kind: 'stopped', atMs: Date.now() });
    }
    target.holdsGuest = true;
    target.listenUri = undefined;
    this.setStatus('completed');
    target.setStatus('completed');
    this.peer = undefined;
    target.peer = undefined;
  }

  /** Source: migrate-start-postcopy. The source stops; the destination takes the guest's state and may run it. */
  startPostcopy(): void {
    const target = this.peer;
    if (this.migration !== 'active' || !target) throw new Error(`postcopy cannot start: the migration is ${this.migration}`);
    if (!this.capabilities.get('postcopy-ram') || !target.capabilities.get('postcopy-ram')) throw new Error('postcopy-ram is not set on both ends');
    this.running = false;
    this.emit({ kind: 'stopped', atMs: Date.now() });
    this.setStatus('postcopy-active');
    target.setStatus('postcopy-active');
  }

  /** Either end: the postcopy stream breaks; both ends pause and keep what they hold. */
  pausePostcopy(): void {
    const target = this.peer;
    if (this.migration !== 'postcopy-active' || !target) return;
    this.setStatus('postcopy-paused');
    target.setStatus('postcopy-paused');
  }

  /** Destination: listen for the source to resume the paused postcopy. */
  listenForRecovery(uri: string): void {
    if (this.migration !== 'postcopy-paused') throw new Error('Migrate recover can only be run when postcopy is paused.');
    this.listenUri = uri;
    this.setStatus('postcopy-recover');
  }

  /** Source: resume the paused postcopy at `uri`; a connection that fails leaves it paused (as qemu's does). */
  resumePostcopy(uri: string): void {
    if (this.migration !== 'postcopy-paused') throw new Error('Cannot resume if there is no paused migration');
    const target = this.host.world.listenerAt(uri);
    if (!target || target !== this.peer || target.migration !== 'postcopy-recover' || this.host.world.linkDown) return;
    target.listenUri = undefined;
    this.setStatus('postcopy-active');
    target.setStatus('postcopy-active');
  }

  /** Source: migrate_cancel. The destination's qemu sees its stream break, and exits (as qemu does). */
  cancelStream(): void {
    if (this.migration !== 'active') return;
    this.breakStream('cancelled');
  }

  /** The stream breaks (the link reset, qemu failed): the source keeps the guest, the destination qemu fails and exits. */
  breakStream(sourceStatus: 'cancelled' | 'failed' = 'failed'): void {
    const target = this.peer;
    clearInterval(this.streamTimer);
    this.peer = undefined;
    this.setStatus(sourceStatus);
    if (target) {
      target.peer = undefined;
      target.setStatus('failed');
      target.exit();
    }
  }

  /** A listener whose connection is reset: the source's stream breaks (as its writes fail). */
  dropConnection(): void {
    this.peer?.breakStream('cancelled');
  }

  /** The process ends (killed, or failed). */
  exit(): void {
    if (!this.alive) return;
    this.alive = false;
    clearInterval(this.streamTimer);
    const peer = this.peer;
    this.peer = undefined;
    if (peer) {
      peer.peer = undefined;
      clearInterval(peer.streamTimer);
      // The other end sees the connection close.
      if (peer.record.incoming && !peer.holdsGuest) {
        peer.setStatus('failed');
        peer.exit();
      } else peer.setStatus('failed');
    }
    this.host.qemuExited(this);
    this.events.emit('exit');
  }
}

/** A monitor connection of one agent incarnation to one qemu. */
class SimMonitor implements MigrationMonitor {
  private readonly qemu: SimQemu;
  private readonly agent: SimAgent;

  constructor(qemu: SimQemu, agent: SimAgent) {
    this.qemu = qemu;
    this.agent = agent;
  }

  get isClosed(): boolean {
    return !this.qemu.alive;
  }

  /** A command: never answered by a dead agent, refused by a dead qemu. */
  private async command<T>(fn: () => T): Promise<T> {
    await Promise.resolve();
    if (!this.agent.alive) return NEVER;
    if (!this.qemu.alive) throw new Error('QMP connection closed');
    return fn();
  }

  guestRunning(): Promise<boolean> {
    return this.command(() => this.qemu.running);
  }

  queryMigrate(): Promise<MigrationInfo> {
    return this.command(() => {
      const q = this.qemu;
      const info: MigrationInfo = { status: q.migration };
      if (q.migration === 'active' || q.migration === 'completed' || q.migration.startsWith('postcopy-')) {
        info.ram = { transferredBytes: q.receivedBytes, remainingBytes: q.migration === 'completed' ? 0 : GUEST_BYTES / 2, totalBytes: GUEST_BYTES, mbps: 1000, dirtyPagesRate: 0, iterations: 1 };
      }
      if (q.migration === 'completed') Object.assign(info, { totalTimeMs: STREAM_STEPS * STREAM_STEP_MS, downtimeMs: STREAM_STEP_MS, setupTimeMs: 1 });
      return info;
    });
  }

  onMigrationEvent(listener: (e: MigrationEvent) => void): () => void {
    const onEvent = (e: MigrationEvent) => {
      if (this.agent.alive) listener(e);
    };
    this.qemu.events.on('event', onEvent);
    return () => this.qemu.events.off('event', onEvent);
  }

  setCapabilities(capabilities: Array<{ capability: string; state: boolean }>): Promise<void> {
    return this.command(() => {
      for (const c of capabilities) this.qemu.capabilities.set(c.capability, c.state);
    });
  }

  setParameters(parameters: Record<string, number | string>): Promise<void> {
    return this.command(() => {
      for (const [k, v] of Object.entries(parameters)) this.qemu.parameters.set(k, v);
    });
  }

  useTls(): Promise<void> {
    return this.command(() => undefined);
  }

  pause(): Promise<void> {
    return this.command(() => {
      this.qemu.running = false;
    });
  }

  // The simulated streams end before the convergence policy's throttle step would come.
  limitDirtyRate(): Promise<void> {
    return this.command(() => undefined);
  }

  cancelDirtyLimit(): Promise<void> {
    return this.command(() => undefined);
  }

  migrate(uri: string): Promise<void> {
    return this.command(() => this.qemu.startStream(uri));
  }

  cancelMigration(): Promise<void> {
    return this.command(() => this.qemu.cancelStream());
  }

  listenIncoming(uri: string): Promise<void> {
    return this.command(() => {
      this.qemu.listenUri = uri;
    });
  }

  startPostcopy(): Promise<void> {
    return this.command(() => this.qemu.startPostcopy());
  }

  pausePostcopy(): Promise<void> {
    return this.command(() => this.qemu.pausePostcopy());
  }

  listenForRecovery(uri: string): Promise<void> {
    return this.command(() => this.qemu.listenForRecovery(uri));
  }

  resumePostcopy(uri: string): Promise<void> {
    return this.command(() => this.qemu.resumePostcopy(uri));
  }

  resumeAfterMigration(): Promise<Error | null> {
    return this.command(() => {
      this.qemu.running = true;
      return null;
    });
  }

  measureDirtyRate(): Promise<number> {
    return this.command(() => 0);
  }

  resume(): Promise<void> {
    return this.command(() => {
      // An incoming qemu runs once it has the guest's state: its stream completed, or switched to postcopy.
      if (!this.qemu.holdsGuest && !this.qemu.migration.startsWith('postcopy-')) throw new Error('the incoming stream has not completed');
      this.qemu.running = true;
    });
  }
}

export interface SimEntry extends MigratingDomain {
  name: string;
  uuid: string;
  xml: string;
  def: DomainDef;
  persistent: boolean;
  run?: { monitor: MigrationMonitor; qemu: SimQemu };
  activeJob?: { id: string; role: 'source' | 'destination' };
}

/**
 * One incarnation's view of its host's domains: built from the host's stored definitions and live
 * qemus at start, with the domain manager's own claim rules (src/agent/claims.ts) and a model of
 * its process work.
 */
class SimDomains implements MigrationDomains<SimEntry> {
  private readonly entries = new Map<string, SimEntry>();
  private readonly claims = new DomainClaims(this.entries, (entry) => entry.run !== undefined);
  private readonly mutex = new KeyedMutex();
  private readonly exitListeners = new Set<(name: string) => void>();
  private readonly agent: SimAgent;

  constructor(agent: SimAgent) {
    this.agent = agent;
    const { host } = agent;
    for (const [name, xml] of host.definitions) {
      const def = parseDomainXml(xml);
      this.entries.set(name, { name, uuid: def.uuid, xml, def, persistent: true });
    }
    for (const qemu of host.qemus) {
      const rec = qemu.record;
      let entry = this.entries.get(rec.domain);
      if (!entry || entry.uuid !== rec.uuid) {
        entry = { name: rec.domain, uuid: rec.uuid, xml: rec.xml, def: parseDomainXml(rec.xml), persistent: rec.persistent };
        this.entries.set(rec.domain, entry);
      } else if (rec.incoming && entry.xml !== rec.xml) {
        this.claims.arrivingInto(entry, rec.xml, parseDomainXml(rec.xml));
      }
      entry.run = { monitor: new SimMonitor(qemu, agent), qemu };
    }
  }

  list(): SimEntry[] {
    return [...this.entries.values()];
  }

  get(name: string): SimEntry {
    const entry = this.entries.get(name);
    if (!entry) throw new AgentError(404, 'domain_not_found', `no domain ${name}`);
    return entry;
  }

  find(name: string): SimEntry | undefined {
    return this.entries.get(name);
  }

  withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    return this.mutex.run(name, fn);
  }

  async validate(xml: string): Promise<{ xml: string; def: DomainDef }> {
    return { xml, def: parseDomainXml(xml) };
  }

  accelOf(): 'tcg' {
    return 'tcg';
  }

  async firmwareSizes(): Promise<undefined> {
    return undefined;
  }

  async checkFirmwareSizes(): Promise<void> {}

  async qemuTlsDir(): Promise<string> {
    throw new Error('the simulated world streams without TLS');
  }

  isActive(entry: SimEntry): boolean {
    return entry.run !== undefined;
  }

  async settled(): Promise<boolean> {
    return true;
  }

  /** The simulated host keeps its qemus (and their records) itself: nothing is left to write. */
  async launch(entry: SimEntry, opts: { incoming: boolean; after?: Promise<unknown> }): Promise<{ run: { monitor: MigrationMonitor }; recorded: Promise<void> }> {
    await this.agent.step();
    await opts.after;
    const qemu = this.agent.host.startQemu(
      { domain: entry.name, uuid: entry.uuid, xml: entry.xml, persistent: entry.persistent, incoming: opts.incoming },
      { running: !opts.incoming, holdsGuest: !opts.incoming },
    );
    entry.run = { monitor: new SimMonitor(qemu, this.agent), qemu };
    return { run: entry.run, recorded: Promise.resolve() };
  }

  async stopQemu(entry: SimEntry): Promise<void> {
    await this.agent.step();
    entry.run?.qemu.exit();
  }

  onExit(listener: (name: string) => void): () => void {
    this.exitListeners.add(listener);
    return () => void this.exitListeners.delete(listener);
  }

  /** The host saw one of its qemus end (DomainManager.onQmpClosed). */
  qemuExited(qemu: SimQemu): void {
    const entry = this.entries.get(qemu.record.domain);
    if (!entry || entry.run?.qemu !== qemu) return;
    entry.run = undefined;
    if (!entry.persistent && !entry.activeJob) this.entries.delete(entry.name);
    for (const listener of [...this.exitListeners]) listener(entry.name);
  }

  beginOutgoing(entry: SimEntry, jobId: string): { monitor: MigrationMonitor } {
    this.claims.refuseClaimed(entry);
    if (!entry.run) throw new AgentError(409, 'domain_not_running', `domain ${entry.name} is not running`);
    if (entry.run.qemu.record.incoming) throw new AgentError(409, 'domain_incoming', `domain ${entry.name} is still arriving here`);
    this.claims.claimOutgoing(entry, jobId);
    return entry.run;
  }

  beginIncoming(xml: string, def: DomainDef, jobId: string): SimEntry {
    return this.claims.claimIncoming(xml, def, jobId, () => ({ name: def.name, uuid: def.uuid, xml, def, persistent: false }));
  }

  restoreClaim(entry: SimEntry, jobId: string, role: 'source' | 'destination'): void {
    this.claims.restore(entry, jobId, role);
  }

  async commitIncoming(entry: SimEntry, opts: { persist: boolean; paused: boolean; keepClaim?: boolean }): Promise<{ stored: Promise<void> }> {
    await this.agent.step();
    const run = entry.run;
    if (!run) throw new Error('the incoming qemu is gone');
    if (this.agent.host.world.handOverFails) throw new Error('injected: the arrived guest cannot run here');
    if (!opts.paused) await run.monitor.resume();
    this.claims.keepArrival(entry);
    if (opts.persist) entry.persistent = true;
    const stored = (async () => {
      await this.agent.step();
      // As the domain manager does: a failed write is made again (the guest runs here already).
      for (; this.agent.host.world.arrivalRecordsFail > 0; this.agent.host.world.arrivalRecordsFail--) {
        await new Promise((r) => setTimeout(r, 20));
        await this.agent.step();
      }
      if (entry.persistent) this.agent.host.definitions.set(entry.name, entry.xml);
      run.qemu.record = { ...run.qemu.record, incoming: false, persistent: entry.persistent, xml: entry.xml };
      await this.agent.step();
      if (!opts.keepClaim) this.claims.end(entry);
    })();
    return { stored };
  }

  endClaim(entry: SimEntry): void {
    this.claims.end(entry);
  }

  async commitOutgoing(entry: SimEntry, opts: { undefine: boolean }): Promise<void> {
    await this.stopQemu(entry);
    this.claims.end(entry);
    if (opts.undefine || !entry.persistent) {
      this.agent.host.definitions.delete(entry.name);
      this.entries.delete(entry.name);
    }
  }

  release(entry: SimEntry): void {
    if (this.claims.release(entry)) this.entries.delete(entry.name);
  }
}

/**
 * A hook on every job record an agent writes: the write may throw, or the agent die just after
 * it; `stored` replaces what reaches the store (a record left in a phase the run passes through
 * within one write).
 */
export type WriteHook = (host: SimHost, record: JobRecord) => { verdict: 'die' | 'throw'; stored?: JobRecord } | undefined;

/** A host: what outlives its agent (definitions, job records, qemu processes). */
export class SimHost {
  readonly name: string;
  readonly url: string;
  readonly world: SimWorld;
  readonly definitions = new Map<string, string>();
  readonly records = new Map<string, unknown>();
  readonly qemus = new Set<SimQemu>();
  agent?: SimAgent;
  /** Its agents' channel limit (GET /host migrationChannels). */
  migrationChannels = 2;
  /** Whether its qemus receive postcopy. */
  userfaultfd: UserfaultfdAccess = { via: 'privileged' };
  /** All qemus ever started here, for the checks. */
  readonly everStarted: SimQemu[] = [];

  constructor(world: SimWorld, name: string, url: string) {
    this.world = world;
    this.name = name;
    this.url = url;
  }

  startQemu(record: QemuRecord, opts: { running: boolean; holdsGuest: boolean }): SimQemu {
    const qemu = new SimQemu(this.world.nextQemuId++, this, record, opts);
    this.qemus.add(qemu);
    this.everStarted.push(qemu);
    return qemu;
  }

  qemuExited(qemu: SimQemu): void {
    this.qemus.delete(qemu);
    if (this.agent?.alive) this.agent.domains.qemuExited(qemu);
  }

  /** A new incarnation of the agent (the first start, or a restart after it died). */
  async startAgent(): Promise<SimAgent> {
    if (this.agent?.alive) throw new Error(`the agent of ${this.name} still runs`);
    const agent = new SimAgent(this);
    this.agent = agent;
    await agent.service.init();
    return agent;
  }
}

/** One life of a host's agent. */
export class SimAgent {
  readonly host: SimHost;
  readonly domains: SimDomains;
  readonly service: MigrationService;
  alive = true;
  private readonly deathListeners = new Set<() => void>();
  /** What went to the log at error level (a crash carried on, a job that could not end). */
  readonly errors: string[] = [];

  constructor(host: SimHost) {
    this.host = host;
    this.domains = new SimDomains(this);
    const world = host.world;
    const log: Logger = {
      debug: () => undefined,
      info: () => undefined,
      warn: () => undefined,
      error: (fields, message) => this.errors.push(`${message ?? ''} ${JSON.stringify(fields, (_k, v: unknown) => (v instanceof Error ? v.message : v))}`),
    };
    this.service = new MigrationService({
      config: world.config,
      store: this.recordStore(),
      domains: this.domains,
      hostInfo: () => ({ uuid: `host-${host.name}`, hostname: host.name, migrationChannels: host.migrationChannels }) as HostInfo,
      userfaultfd: host.userfaultfd,
      log,
      peers: this.peerCalls(),
      incomingBytes: async (address, port) => {
        await this.step();
        const uri = `tcp:${address}:${port}`;
        const listener = [...host.qemus].find((q) => q.listenUri === uri && q.migration === 'active');
        return listener?.receivedBytes;
      },
      resetStream: async (address, port) => {
        await this.step();
        world.listenerAt(`tcp:${address}:${port}`)?.dropConnection();
      },
    });
  }

  /** Every action of the agent goes through here: a dead agent takes no step. */
  async step(): Promise<void> {
    await Promise.resolve();
    if (!this.alive) return NEVER;
  }

  /** The process is killed: nothing it started continues; calls to it fail. */
  die(): void {
    if (!this.alive) return;
    this.alive = false;
    this.service.close().catch(() => undefined);
    for (const listener of this.deathListeners) listener();
  }

  onDeath(listener: () => void): () => void {
    this.deathListeners.add(listener);
    return () => void this.deathListeners.delete(listener);
  }

  private recordStore() {
    const host = this.host;
    return {
      saveRecord: async (_kind: 'runtime' | 'jobs' | 'taps', id: string, value: unknown) => {
        await this.step();
        const fault = host.world.writeHook?.(host, value as JobRecord);
        if (fault?.verdict === 'throw') throw new Error('injected: the write failed');
        host.records.set(id, structuredClone(fault?.stored ?? value));
        if (fault?.verdict === 'die') {
          this.die();
          return NEVER;
        }
      },
      removeRecord: async (_kind: 'runtime' | 'jobs' | 'taps', id: string) => {
        await this.step();
        host.records.delete(id);
      },
      loadRecords: async <T>(_kind: 'runtime' | 'jobs' | 'taps', valid: (v: unknown) => boolean) =>
        [...host.records].filter(([, v]) => valid(v)).map(([id, value]) => ({ id, value: structuredClone(value) as T })),
    };
  }

  /** Calls to the other agents' protocol routes, as PeerClient makes them over HTTP. */
  private peerCalls(): PeerCalls {
    const world = this.host.world;
    return {
      call: async <T>(baseUrl: string, _method: 'GET' | 'POST', path: string, body?: unknown, _timeoutMs?: number, signal?: AbortSignal): Promise<T> => {
        await this.step();
        const url = new URL(path, baseUrl).toString();
        const target = world.hostAt(baseUrl)?.agent;
        if (world.linkDown || !target?.alive) {
          await new Promise((r) => setTimeout(r, 5));
          throw new PeerUnreachableError(url, new Error('connect ECONNREFUSED'));
        }
        // The request reaches the peer; if the peer dies before answering, the connection resets.
        let stopWatching: () => void = () => undefined;
        const died = new Promise<never>((_resolve, reject) => {
          const fail = () => reject(new PeerUnreachableError(url, new Error('socket hang up')));
          stopWatching = target.onDeath(fail);
          signal?.addEventListener('abort', () => reject(new PeerUnreachableError(url, new Error('aborted'))), { once: true });
        });
        try {
          const answer = await Promise.race([target.handle(path, structuredClone(body)), died]);
          await this.step();
          if (world.linkDown) throw new PeerUnreachableError(url, new Error('the answer was lost: the link went down'));
          return structuredClone(answer) as T;
        } catch (err) {
          await this.step();
          if (err instanceof PeerUnreachableError) throw err;
          if (err instanceof AgentError && (err.statusCode < 500 || err.statusCode === 503)) {
            throw new PeerRefusedError(err.statusCode, { code: err.code, message: err.message, unknownProperties: err.details.unknownProperties }, url, err.details.retryAfterSeconds as number | undefined);
          }
          const failed = err as AgentError;
          throw new PeerUnreachableError(url, new Error(`HTTP ${failed.statusCode ?? 500}: ${failed.message}`), failed.code ?? 'peer_failed');
        } finally {
          stopWatching();
        }
      },
      close: async () => undefined,
    };
  }

  /** A protocol route of this agent. */
  handle(path: string, body: unknown): Promise<unknown> {
    if (path === '/prepare2') return this.service.prepare2(body as never);
    if (path === '/finish2') return this.service.finish2(body as never);
    if (path === '/recover2') return this.service.recover2(body as never);
    throw new AgentError(404, 'not_found', `no route ${path}`);
  }
}

/** Two or more hosts, their links and the qemu listeners between them. */
export class SimWorld {
  readonly config: AgentConfig;
  readonly hosts: SimHost[] = [];
  nextQemuId = 1;
  /** The link between the hosts is cut: no request or stream byte passes. */
  linkDown = false;
  /** Every stream breaks half-way (the source qemu reports failed, the destination's exits). */
  streamsBreak = false;
  /** A destination cannot run the guest that arrived (its resume fails). */
  handOverFails = false;
  /** The writes of an arrival that already runs fail this many more times (a full disk, for a while). */
  arrivalRecordsFail = 0;
  /** Steps of STREAM_STEP_MS a stream takes (longer ones leave time to switch to postcopy). */
  streamSteps = STREAM_STEPS;
  writeHook?: WriteHook;

  constructor(config: Partial<AgentConfig> = {}) {
    this.config = {
      listenHost: '127.0.0.1',
      listenPort: 0,
      stateDir: '/nonexistent',
      token: 'fast-tier',
      migrationAddress: '127.0.0.1',
      migrationPorts: { low: 49152, high: 65535 },
      allowPaths: [],
      accel: 'tcg',
      incomingTimeoutSeconds: 0.3,
      peers: [],
      maxDomains: 100,
      maxLogBytes: 1 << 20,
      allowedHosts: [],
      requestTimeoutMs: 10_000,
      bodyLimitBytes: 1 << 20,
      qemuUser: 'root',
      qemuUids: { first: 0, last: 0 },
      maxIncoming: 4,
      maxOutgoing: 4,
      jobHistory: 10,
      debugHolds: [],
      ...config,
    };
  }

  addHost(name: string, address: string): SimHost {
    const host = new SimHost(this, name, `http://${address}:7100/`);
    this.hosts.push(host);
    return host;
  }

  hostAt(baseUrl: string): SimHost | undefined {
    const origin = new URL(baseUrl).origin;
    return this.hosts.find((h) => new URL(h.url).origin === origin);
  }

  /** The qemu listening for an incoming stream at `uri`, on any host. */
  listenerAt(uri: string): SimQemu | undefined {
    for (const host of this.hosts) for (const q of host.qemus) if (q.listenUri === uri && q.alive) return q;
    return undefined;
  }
}

/** A minimal domain a simulated host runs. */
export function simDomainXml(name: string, uuid: string): string {
  return `<domain type='kvm'><name>${name}</name><uuid>${uuid}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>`;
}
