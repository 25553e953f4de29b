import { EventEmitter } from 'node:events';
import fsSync, { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Logger } from '../log.js';
import { AgentError, DomainXmlError, conflict, notFound } from '../errors.js';
import {
  buildArgv,
  domainFileRefs,
  effectiveAccel,
  parseDomainXml,
  type Accel,
  type DomainDef,
  type HostSettings,
  type SpiceGraphicsDef,
} from '../domain/index.js';
import { QmpClient } from '../qemu/qmp.js';
import { attachQemu, endPidfileOwner, killQemu, launchQemu, processMatches, QemuStartError, removeQemuFiles, waitForExit, type QemuCredentials, type QemuProcessRecord } from '../qemu/process.js';
import type { QemuHostInfo } from '../qemu/host.js';
import type { FirmwareSizes } from '../migration/protocol.js';
import type { MigrationDomains } from '../migration/domains.js';
import { QmpMigrationMonitor, type MigrationMonitor } from '../qemu/migration-monitor.js';
import { openUserfaultfdDevice, type UserfaultfdAccess } from '../qemu/userfaultfd.js';
import { killSwtpm, launchSwtpm, prepareTpmState, releaseTpmState, SwtpmStartError, type SwtpmRecord } from '../qemu/swtpm.js';
import { StateStore, isObject } from '../store/state-store.js';
import { checkAllowedPaths, openGuestFiles, sharedWrittenFile, type PathRoots } from './paths.js';
import { firmwareDirs } from '../qemu/firmware.js';
import { KeyedMutex } from './lock.js';
import { isLoopback } from '../config.js';
import { makeQemuDir, type QemuUsers } from './qemu-user.js';
import type { XmlPool } from './xml-pool.js';
import { bridgeExists, createTap, deleteTap, isTapRecord, newTapName, tunUsableBy, type TapRecord } from './taps.js';
import { applyPinning, checkCpuVendor, checkPinning, prepareHugepages, releaseHugepages } from './host-resources.js';
import { DisplayPorts } from './display-ports.js';
import { DomainClaims } from './claims.js';

/** The pauses before writing an arrived guest's records again after a failed write (a full disk, say). */
const ARRIVAL_RECORD_RETRY_MS = [250, 1000, 5000, 30_000];

/**
 * Host policy, not guest ABI (so not part of the domain's argv): qemu's seccomp filter refuses
 * obsolete syscalls, setuid and friends, fork/exec and scheduler/affinity changes. Whatever a
 * peer, a guest or a bug gets qemu to attempt (an `exec:` migration URI, a helper program), it
 * cannot start a process.
 */
const QEMU_SANDBOX_ARGS = ['-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny'];

export type DomainState = 'shutoff' | 'running' | 'paused' | 'migrating' | 'incoming' | 'unreachable';
/** Why a domain is not running (libvirt keeps a reason beside each state for the same purpose). */
export type ShutoffReason = 'defined' | 'shutdown' | 'destroyed' | 'crashed' | 'migrated' | 'failed' | 'start_failed' | 'unknown';

export interface RunningQemu {
  record: QemuProcessRecord;
  qmp: QmpClient;
  /** The same connection, in the typed calls a migration makes. */
  monitor: MigrationMonitor;
  startedAt: string;
  /** Started with -incoming defer and not yet handed over by a finished migration. */
  incoming: boolean;
  /** Set before the agent ends the qemu itself, so the exit is not mistaken for a crash. */
  expectedExit?: ShutoffReason;
  guestShutdown: boolean;
  /** The agent's own descriptors of the guest's output files (chardev files, logs), for the size cap. */
  outputFds?: number[];
  /** The swtpm of a guest with a `<tpm>`, started before qemu and ended after it. */
  swtpm?: SwtpmRecord;
}

/**
 * A qemu found alive at start-up (its pid and start time match the record) whose monitor did not
 * greet: another client holds it (qemu serves one at a time), or qemu or the host is too slow.
 * It is the guest's running copy all the same: kept, never taken for gone, and attached to again
 * in the background; meanwhile nothing is done to it blind.
 */
export interface UnreachableQemu {
  record: QemuProcessRecord;
  swtpm?: SwtpmRecord;
  startedAt: string;
  since: string;
  attempts: number;
  lastError: string;
  /** Ends once the agent attached to it or found it gone (true), or is shutting down first (false). */
  settled: Promise<boolean>;
}

export interface DomainEntry {
  name: string;
  uuid: string;
  xml: string;
  def: DomainDef;
  /** A transient domain (an incoming one not asked to persist) has no stored definition and vanishes when it stops. */
  persistent: boolean;
  run?: RunningQemu;
  /** Set instead of `run` while the qemu runs but its monitor has not answered since a restart. */
  unreachable?: UnreachableQemu;
  lastExit?: { reason: ShutoffReason; at: string; message?: string };
  /** The migration job that owns this domain now, if any: lifecycle calls are refused meanwhile. */
  activeJob?: { id: string; role: 'source' | 'destination' };
}

/** What must survive an agent restart to find a running qemu again. */
interface RuntimeRecord {
  name: string;
  uuid: string;
  xml: string;
  persistent: boolean;
  incoming: boolean;
  startedAt: string;
  process: QemuProcessRecord;
  swtpm?: SwtpmRecord;
}

export interface DomainInfo {
  name: string;
  uuid: string;
  state: DomainState;
  reason?: string;
  /** For reason start_failed: what qemu said. */
  reasonMessage?: string;
  persistent: boolean;
  memoryKiB: number;
  vcpus: number;
  machine: string;
  pid?: number;
  startedAt?: string;
  qemuStatus?: string;
  job?: { id: string; role: 'source' | 'destination' };
  /** A running domain's displays as qemu reports them: the address and port each listens on. */
  graphics?: GraphicsInfo[];
}

export interface GraphicsInfo {
  type: 'vnc' | 'spice';
  /** Absent for a display that does not listen (SPICE `<listen type='none'/>`) or when qemu did not answer. */
  listen?: string;
  port?: number;
}

/** At start-up: how long each monitor may take to greet before its qemu is kept as unreachable (all at once, not one after the other). */
const FIRST_ATTACH_TIMEOUT_MS = 2000;
/** Then: the pauses between attempts, doubling up to the cap; each attempt waits QMP's own connect timeout. */
const REATTACH_FIRST_PAUSE_MS = 500;
const REATTACH_MAX_PAUSE_MS = 30_000;

const QMP_STATUS_TO_STATE: Record<string, DomainState> = {
  running: 'running',
  inmigrate: 'incoming',
  'finish-migrate': 'migrating',
};

export interface DomainManagerOptions {
  store: StateStore;
  qemu: QemuHostInfo;
  accel: 'kvm' | 'tcg';
  allowPaths: string[];
  log: Logger;
  /** Domains this agent holds at most (defined and arriving). */
  maxDomains: number;
  /** A guest's output file (serial log, chardev log) larger than this is truncated. */
  maxLogBytes: number;
  /** How often output files are measured; default 5 s. */
  logCheckIntervalMs?: number;
  /** Whom each qemu runs as. */
  qemuUsers: QemuUsers;
  /** How a qemu that receives a postcopy may use userfaultfd. */
  userfaultfd: UserfaultfdAccess;
  /** With TLS: the agent's stream credentials (the store's tls/), which each qemu gets a copy of. */
  tlsDir?: string;
  /** Where request XML is parsed and normalized (worker threads). */
  xmlPool: XmlPool;
  /** libvirt network name -> bridge (--network). */
  networks: Record<string, string>;
  /** Non-loopback addresses displays may listen on (--graphics-listen). */
  graphicsListen: string[];
}

/**
 * Owns this host's domains: their definitions, their qemu processes and the QMP connection to
 * each. One lifecycle operation at a time per domain (KeyedMutex); every state change is on
 * disk before it is acted upon, so a restarted agent finds its guests again.
 */
export class DomainManager extends EventEmitter implements MigrationDomains<DomainEntry> {
  private readonly domains = new Map<string, DomainEntry>();
  private readonly mutex = new KeyedMutex();
  private readonly opts: DomainManagerOptions;
  /** Aborted when the agent shuts down: QMP connections close (and attempts to attach stop) but the guests go on running. */
  private readonly detaching = new AbortController();
  private readonly logCap: NodeJS.Timeout;
  private readonly displayPorts = new DisplayPorts();
  /** Migrations' claims on the entries (see claims.ts). */
  private readonly claims = new DomainClaims(this.domains, (entry) => this.isActive(entry));
  /** Where a guest's files may lie (--allow-path, the firmware directories) and where never (the agent's state): fixed for the agent's life. */
  private readonly pathRoots: PathRoots;

  constructor(opts: DomainManagerOptions) {
    super();
    this.opts = opts;
    this.pathRoots = { allow: opts.allowPaths, forbidden: opts.store.internalPaths(), firmware: firmwareDirs(opts.qemu.firmwares) };
    this.logCap = setInterval(() => this.capOutputs(), opts.logCheckIntervalMs ?? 5000);
    this.logCap.unref();
  }

  /** Load definitions, then re-attach to every qemu that still runs; the rest are shut off. */
  async init(): Promise<void> {
    const { store, log } = this.opts;
    for (const { name, xml, file } of await store.loadDefinitions()) {
      try {
        const def = parseDomainXml(xml);
        if (def.name !== name) throw new Error(`file name says ${name}, XML says ${def.name}`);
        this.domains.set(name, { name, uuid: def.uuid, xml, def, persistent: true, lastExit: { reason: 'defined', at: new Date().toISOString() } });
      } catch (err) {
        log.error({ file, err }, 'stored definition is unreadable; set aside');
        await store.quarantine(file, (err as Error).message);
      }
    }
    const records = await store.loadRecords<RuntimeRecord>('runtime', isRuntimeRecord);
    // All at once, each bounded: a monitor that does not answer holds up neither the others nor the agent's start.
    await Promise.all(records.map(({ id, value }) => this.reattach(id, value)));
    await this.reclaimOrphans();
    await this.reclaimTaps();
    await this.reclaimTpmStates();
    await this.reclaimNvrams();
  }

  /**
   * A qemu recorded as running, at start-up: attached to again; kept as unreachable (and attached
   * to later) while it runs but its monitor does not greet; recorded as gone when it no longer runs.
   */
  private async reattach(id: string, rec: RuntimeRecord): Promise<void> {
    let qmp: QmpClient | null;
    try {
      qmp = await attachQemu(rec.process, { connectTimeoutMs: FIRST_ATTACH_TIMEOUT_MS });
    } catch (err) {
      this.opts.log.warn({ err, domain: rec.name, pid: rec.process.pid }, "qemu runs but its monitor does not answer: kept, reported unreachable, attached to again in the background");
      this.keepUnreachable(this.entryOf(rec), rec, err);
      return;
    }
    if (!qmp) return this.recordGone(id, rec);
    await this.adopt(this.entryOf(rec), rec, qmp);
  }

  /** A running qemu whose monitor does not answer: the entry reports it unreachable until attachLater gets through. */
  private keepUnreachable(entry: DomainEntry, rec: RuntimeRecord, err: unknown): void {
    entry.run = undefined;
    const unreachable: UnreachableQemu = {
      record: rec.process,
      ...(rec.swtpm ? { swtpm: rec.swtpm } : {}),
      startedAt: rec.startedAt,
      since: new Date().toISOString(),
      attempts: 1,
      lastError: (err as Error).message,
      settled: Promise.resolve(false),
    };
    entry.unreachable = unreachable;
    unreachable.settled = this.attachLater(entry, entry.name, rec);
  }

  /** The entry a runtime record belongs to: its stored definition's, else one made from the record (a transient domain). */
  private entryOf(rec: RuntimeRecord): DomainEntry {
    let entry = this.domains.get(rec.name);
    if (!entry || entry.uuid !== rec.uuid) {
      entry = { name: rec.name, uuid: rec.uuid, xml: rec.xml, def: parseDomainXml(rec.xml), persistent: rec.persistent };
      this.domains.set(rec.name, entry);
    } else if (rec.incoming && entry.xml !== rec.xml) {
      // An arrival into this defined domain was under way: its qemu runs the XML that arrived, and
      // the stored definition is set aside again, to be given back if it fails.
      this.claims.arrivingInto(entry, rec.xml, parseDomainXml(rec.xml));
    }
    return entry;
  }

  /** Follow a qemu found running after a restart, through the monitor connection just made. */
  private async adopt(entry: DomainEntry, rec: RuntimeRecord, qmp: QmpClient): Promise<void> {
    const { log } = this.opts;
    this.watch(entry, {
      record: rec.process,
      qmp,
      monitor: new QmpMigrationMonitor(qmp),
      startedAt: rec.startedAt,
      incoming: rec.incoming,
      guestShutdown: false,
      outputFds: await this.reopenOutputs(entry),
      ...(rec.swtpm ? { swtpm: rec.swtpm } : {}),
    });
    if (rec.swtpm && !processMatches(rec.swtpm)) log.warn({ domain: rec.name, pid: rec.swtpm.pid }, "the guest's swtpm is gone: its TPM no longer answers");
    // Its SPICE port stays its own (another guest's autoport must not choose it).
    const spicePort = (await this.graphicsInfo(entry.def, qmp)).find((g) => g.type === 'spice')?.port;
    if (spicePort) this.displayPorts.hold(entry.name, spicePort);
    log.info({ domain: rec.name, pid: rec.process.pid }, 're-attached to running qemu');
  }

  /** The qemu of a runtime record no longer runs (it ended while the agent was down): the domain is shut off. */
  private async recordGone(id: string, rec: RuntimeRecord): Promise<void> {
    this.opts.log.warn({ domain: rec.name, pid: rec.process.pid }, 'qemu of a running domain is gone; marked shut off');
    if (rec.swtpm) await killSwtpm(rec.swtpm);
    // An arrival that never took over, or a transient domain: its TPM state goes with it.
    if (rec.incoming || !rec.persistent) await this.removeOwnState({ uuid: rec.uuid, def: parseDomainXml(rec.xml) });
    await this.opts.store.removeRecord('runtime', id);
    const entry = this.domains.get(rec.name);
    if (entry) entry.lastExit = { reason: 'unknown', at: new Date().toISOString() };
  }

  /**
   * Attaches to an unreachable qemu, trying again after a pause that doubles up to a bound, for as
   * long as the qemu runs: a busy or slow monitor is no reason to give the guest up. Never rejects.
   */
  private async attachLater(entry: DomainEntry, id: string, rec: RuntimeRecord): Promise<boolean> {
    const { log } = this.opts;
    const { signal } = this.detaching;
    const unreachable = entry.unreachable!;
    try {
      for (let pauseMs = REATTACH_FIRST_PAUSE_MS; ; pauseMs = Math.min(pauseMs * 2, REATTACH_MAX_PAUSE_MS)) {
        await sleep(pauseMs, undefined, { signal, ref: false }).catch(() => undefined);
        if (signal.aborted) return false;
        let qmp: QmpClient | null;
        try {
          qmp = await attachQemu(rec.process, { signal });
        } catch (err) {
          if (signal.aborted) return false;
          unreachable.attempts++;
          unreachable.lastError = (err as Error).message;
          log.warn({ domain: entry.name, pid: rec.process.pid, attempts: unreachable.attempts, err: unreachable.lastError }, 'monitor still does not answer');
          continue;
        }
        return await this.withLock(entry.name, async () => {
          entry.unreachable = undefined;
          if (qmp && signal.aborted) {
            await qmp.close();
            return false;
          }
          if (qmp) await this.adopt(entry, rec, qmp);
          else await this.endedUnreachable(entry, id, rec);
          return true;
        });
      }
    } catch (err) {
      log.error({ err, domain: entry.name }, 'attaching to the qemu failed');
      return false;
    }
  }

  /** An unreachable qemu ended before the agent could attach: what start-up leaves for a gone qemu, and what it kept for this one. */
  private async endedUnreachable(entry: DomainEntry, id: string, rec: RuntimeRecord): Promise<void> {
    await this.recordGone(id, rec);
    await removeQemuFiles(rec.process);
    await this.releaseHostResources(entry, rec.process);
    if (!entry.persistent && this.domains.get(entry.name) === entry) this.domains.delete(entry.name);
  }

  /** A variable store of a domain this agent no longer holds (it crashed while the domain left): removed. */
  private async reclaimNvrams(): Promise<void> {
    const known = new Set([...this.domains.values()].map((e) => e.uuid));
    for (const file of await fs.readdir(this.opts.store.dir('nvram'))) {
      if (!known.has(path.basename(file, '.fd'))) await fs.rm(path.join(this.opts.store.dir('nvram'), file), { force: true });
    }
  }

  /**
   * The TPM states of domains not running are the agent's again (a crash may have left one with
   * the user of a swtpm that is gone), and a state no domain here owns (an arrival that never
   * took over while the agent was down) is removed.
   */
  private async reclaimTpmStates(): Promise<void> {
    const known = new Map([...this.domains.values()].map((e) => [e.uuid, e]));
    for (const uuid of await fs.readdir(this.opts.store.dir('tpm'))) {
      const entry = known.get(uuid);
      if (entry?.run || entry?.unreachable) continue;
      if (entry) await releaseTpmState(this.tpmDir(uuid));
      else await this.removeTpmState(uuid);
    }
  }

  /** tpm/<uuid>/: the domain's TPM state, from its first start until it is undefined or leaves this host. */
  private tpmDir(uuid: string): string {
    return path.join(this.opts.store.dir('tpm'), uuid);
  }

  private async removeTpmState(uuid: string): Promise<void> {
    await fs.rm(this.tpmDir(uuid), { recursive: true, force: true });
  }

  /** Taps recorded for a domain whose qemu no longer runs (the agent was down when it ended): deleted now. */
  private async reclaimTaps(): Promise<void> {
    for (const { id } of await this.opts.store.loadRecords<{ taps: TapRecord[] }>('taps', isTapsRecord)) {
      const entry = this.domains.get(id);
      if (entry?.run || entry?.unreachable) continue;
      await this.removeTaps(id);
    }
  }

  /** Deletes the taps recorded for domain `name` (those still its) and then the record. */
  private async removeTaps(name: string): Promise<void> {
    const rec = await this.opts.store.loadRecord<{ taps: TapRecord[] }>('taps', name, isTapsRecord);
    if (!rec) return;
    for (const tap of rec.taps) {
      const outcome = await deleteTap(tap).catch((err: unknown) => {
        this.opts.log.error({ err, domain: name, tap: tap.name }, 'could not delete a tap');
        return 'failed';
      });
      if (outcome === 'not-ours') this.opts.log.warn({ domain: name, tap: tap.name }, 'a tap of that name is no longer the one the agent made; left alone');
    }
    await this.opts.store.removeRecord('taps', name);
  }

  /** The bridge an interface's tap goes on: its own, or its network's per --network. */
  private bridgeOf(n: DomainDef['interfaces'][number]): string {
    if (n.type === 'bridge') return n.bridge!;
    const bridge = this.opts.networks[n.network!];
    if (bridge === undefined) {
      const known = Object.keys(this.opts.networks);
      throw new DomainXmlError('network_not_mapped', `${n.element}/source/@network`,
        `network '${n.network}' is not mapped to a bridge on this host (agent flag --network ${n.network}=BRIDGE; mapped: ${known.length ? known.join(', ') : 'none'})`);
    }
    return bridge;
  }

  /** Each bridged interface's network is mapped here and its bridge exists (define, Prepare2, start). */
  private checkNetworks(def: DomainDef): void {
    for (const n of def.interfaces) {
      if (n.type !== 'bridge' && n.type !== 'network') continue;
      const bridge = this.bridgeOf(n);
      if (!bridgeExists(bridge)) {
        const at = n.type === 'bridge' ? `${n.element}/source/@bridge` : `${n.element}/source/@network`;
        throw new DomainXmlError('bridge_not_found', at, `bridge ${bridge}${n.type === 'network' ? ` (of network '${n.network}')` : ''} does not exist on this host`);
      }
    }
  }

  /**
   * Creates the taps of the guest's bridged interfaces, owned by its qemu's user; recorded
   * before each is made, so an agent that dies meanwhile still finds and deletes them.
   */
  private async makeTaps(entry: DomainEntry, credentials: QemuCredentials | undefined): Promise<Map<string, string>> {
    const names = new Map<string, string>();
    const bridged = entry.def.interfaces.filter((n) => n.type === 'bridge' || n.type === 'network');
    if (bridged.length === 0) return names;
    this.checkNetworks(entry.def);
    const uid = credentials?.uid ?? process.getuid?.() ?? 0;
    const gid = credentials?.gid ?? process.getgid?.() ?? 0;
    if (!tunUsableBy(uid, gid)) {
      throw new AgentError(409, 'tun_not_accessible', `qemu's user (uid ${uid}) may not open /dev/net/tun to attach to its tap (the usual mode is 0666, as udev sets it)`, { domain: entry.name });
    }
    const taps: TapRecord[] = [];
    try {
      for (const n of bridged) {
        const rec: TapRecord = { name: n.targetDev ?? newTapName(), uid, bridge: this.bridgeOf(n), ...(n.mtu !== undefined ? { mtu: n.mtu } : {}) };
        taps.push(rec);
        await this.opts.store.saveRecord('taps', entry.name, { taps });
        await createTap(rec).catch((err: unknown) => {
          taps.pop();
          throw new AgentError(409, 'tap_failed', `could not make tap ${rec.name} on bridge ${rec.bridge} for ${n.element}: ${(err as Error).message}`, { domain: entry.name });
        });
        names.set(n.id, rec.name);
      }
      await this.opts.store.saveRecord('taps', entry.name, { taps });
    } catch (err) {
      await this.removeTaps(entry.name);
      throw err;
    }
    return names;
  }

  /**
   * A crash between starting a qemu and writing its runtime record leaves a qemu nobody
   * tracks; its pidfile in run/ names it. End such orphans and remove stale sockets/pidfiles.
   */
  private async reclaimOrphans(): Promise<void> {
    const tracked = new Set([...this.domains.values()].flatMap((e) => {
      const qemu = e.run ?? e.unreachable;
      return [
        ...(qemu ? [qemu.record.pidfilePath, qemu.record.qmpSocketPath] : []),
        ...(qemu?.swtpm ? [qemu.swtpm.pidfilePath, qemu.swtpm.socketPath] : []),
      ];
    }));
    const reclaim = async (dir: string): Promise<void> => {
      for (const file of await fs.readdir(dir, { withFileTypes: true })) {
        const full = path.join(dir, file.name);
        if (tracked.has(full)) continue;
        // run/<uuid>/: one qemu's own directory (agents before it kept the files in run/ itself).
        if (file.isDirectory()) {
          if (dir === this.opts.store.dir('run')) await reclaim(full);
          await fs.rmdir(full).catch(() => undefined);
          continue;
        }
        const pid = file.name === 'pid' || file.name.endsWith('.pid') ? await endPidfileOwner(full) : null;
        if (pid !== null) this.opts.log.warn({ pid, pidfile: full }, 'ended an orphaned qemu or swtpm (no runtime record)');
        await fs.rm(full, { force: true });
      }
    };
    await reclaim(this.opts.store.dir('run'));
  }

  list(): DomainEntry[] {
    return [...this.domains.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  get(name: string): DomainEntry {
    const entry = this.domains.get(name);
    if (!entry) throw notFound('domain_not_found', `no domain named ${name}`, { domain: name });
    return entry;
  }

  find(name: string): DomainEntry | undefined {
    return this.domains.get(name);
  }

  /** Run `fn` with the domain's lifecycle lock held. */
  withLock<T>(name: string, fn: () => Promise<T>): Promise<T> {
    return this.mutex.run(name, fn);
  }

  hostSettings(uuid: string, taps?: Map<string, string>): HostSettings {
    const run = this.runDir(uuid);
    return {
      qemuBinary: this.opts.qemu.binary,
      accel: this.opts.accel,
      qmpSocketPath: path.join(run, 'qmp'),
      pidfilePath: path.join(run, 'pid'),
      // In the qemu's own directory, so the destination of a migration makes its own.
      channelSocketPath: (id) => path.join(run, `${id}.sock`),
      tpmSocketPath: path.join(run, 'swtpm.sock'),
      tapName: (id) => {
        const name = taps?.get(id);
        if (name === undefined) throw new Error(`no tap was made for interface ${id}`);
        return name;
      },
    };
  }

  /** run/<uuid>/: the one directory a qemu may write in, owned by its user (its monitor socket, pidfile, TLS copy). */
  private runDir(uuid: string): string {
    return path.join(this.opts.store.dir('run'), uuid);
  }

  /**
   * The stream credentials for this domain's qemu, copied into its own directory afresh (the
   * agent may have been restarted with renewed certificates since the qemu started), readable
   * by that qemu alone.
   */
  async qemuTlsDir(entry: DomainEntry): Promise<string> {
    const run = this.requireRunning(entry);
    if (!this.opts.tlsDir) throw new Error('this agent runs without TLS');
    const { credentials } = run.record;
    const dir = path.join(this.runDir(entry.uuid), 'tls');
    await fs.rm(dir, { recursive: true, force: true });
    await makeQemuDir(dir, credentials);
    for (const file of await fs.readdir(this.opts.tlsDir)) {
      await fs.copyFile(path.join(this.opts.tlsDir, file), path.join(dir, file));
      if (credentials) await fs.chown(path.join(dir, file), credentials.uid, credentials.gid);
    }
    return dir;
  }

  /** Parse, normalize (machine alias, MACs, uuid) and check paths: the same for define and Prepare2. */
  async validate(xml: string): Promise<{ xml: string; def: DomainDef }> {
    const { qemu } = this.opts;
    const normalized = await this.opts.xmlPool.normalize(xml, { machineAliases: qemu.machineAliases, knownMachines: qemu.knownMachines, firmwares: qemu.firmwares });
    // A guest larger than the whole host can never run here (qemu would only fail later, or the host).
    const hostKiB = Math.floor(os.totalmem() / 1024);
    if (normalized.def.memoryKiB > hostKiB) {
      throw new DomainXmlError('exceeds_host_memory', '/domain/memory', `the guest's ${normalized.def.memoryKiB} KiB exceed this host's ${hostKiB} KiB of RAM`);
    }
    // More vCPUs than the host has CPUs: they would preempt each other (a vCPU spinning on a lock
    // whose holder is descheduled); each guest may use at most all of the host, as Nova's default.
    const hostCpus = os.availableParallelism();
    if (normalized.def.vcpus > hostCpus) {
      throw new DomainXmlError('exceeds_host_cpus', '/domain/vcpu', `the guest's ${normalized.def.vcpus} vCPUs exceed this host's ${hostCpus} CPUs`);
    }
    await this.checkPaths(normalized.def);
    if (normalized.def.tpm && !this.opts.qemu.swtpm) {
      throw new DomainXmlError('tpm_unavailable', normalized.def.tpm.element, 'this host has no TPM emulator: swtpm and swtpm_setup are not on PATH (Debian: apt-get install swtpm swtpm-tools)');
    }
    this.checkNetworks(normalized.def);
    this.checkGraphicsListen(normalized.def);
    return normalized;
  }

  /** A display has no password: it opens the console to whoever reaches it, so only loopback unless the host allows more. */
  private checkGraphicsListen(def: DomainDef): void {
    for (const g of def.graphics) {
      // (A SPICE display with <listen type='none'/> has no socket at all.)
      if (g.listen === undefined || isLoopback(g.listen) || this.opts.graphicsListen.includes(g.listen)) continue;
      throw new DomainXmlError(
        'graphics_listen_not_allowed',
        `${g.element}/@listen`,
        `a display on ${g.listen} opens the guest's console (without a password) to that network: this agent allows loopback${this.opts.graphicsListen.length ? ` and ${this.opts.graphicsListen.join(', ')}` : ''} (--graphics-listen)`,
      );
    }
  }

  /** The accelerator the guest runs on here: part of its machine (host-passthrough is `host` on KVM, `max` on TCG). */
  accelOf(def: DomainDef): Accel {
    return effectiveAccel(def, this.opts.accel);
  }

  /**
   * Every host path of the guest must lie below an --allow-path root, and never in the agent's
   * own state: a guest's serial chardev on another guest's QMP socket would drive that monitor.
   */
  private async checkPaths(def: DomainDef): Promise<void> {
    const refs = domainFileRefs(def);
    await checkAllowedPaths(refs, this.pathRoots);
    const others = [...this.domains.values()].filter((d) => d.name !== def.name && d.uuid !== def.uuid).map((d) => ({ domain: d.name, refs: domainFileRefs(d.def) }));
    const shared = await sharedWrittenFile(refs, others);
    if (shared) {
      throw new DomainXmlError('file_in_use', shared.ref.element, `${shared.ref.path} is also ${shared.other.kind === 'disk' ? 'a disk' : `the ${shared.other.kind} file`} of domain ${shared.domain} (${shared.other.element}), and one of them writes it`);
    }
  }

  /** The UEFI variable store the agent keeps for a domain whose `<nvram>` names no file. */
  private ownNvramPath(entry: Pick<DomainEntry, 'uuid' | 'def'>): string | undefined {
    const nvram = entry.def.os.nvram;
    return nvram && nvram.path === undefined ? path.join(this.opts.store.dir('nvram'), `${entry.uuid}.fd`) : undefined;
  }

  /**
   * The sizes of the guest's firmware flashes as this host would give them: the code, and the
   * store (the file there is, else the template it would be made from; for an arrival the agent's
   * own store is always made afresh). Their contents travel in the migration stream as guest
   * memory, so both ends must agree on the sizes.
   */
  async firmwareSizes(entry: Pick<DomainEntry, 'uuid' | 'def'>, incoming = false): Promise<FirmwareSizes | undefined> {
    const { loader, nvram } = entry.def.os;
    if (loader?.type !== 'pflash' || loader.path === undefined) return undefined;
    const size = (file: string) => fs.stat(file).then((st) => st.size, () => undefined);
    const loaderBytes = await size(loader.path);
    if (loaderBytes === undefined) return undefined;
    if (!nvram) return { loaderBytes };
    const store = nvram.path ?? this.ownNvramPath(entry)!;
    const nvramBytes = (incoming && nvram.path === undefined ? undefined : await size(store)) ?? (nvram.template !== undefined ? await size(nvram.template) : undefined);
    return { loaderBytes, ...(nvramBytes !== undefined ? { nvramBytes } : {}) };
  }

  /** An arrival's firmware must have the sizes the source runs it with: the stream would fail on them half-way (a RAM block's length). */
  async checkFirmwareSizes(entry: Pick<DomainEntry, 'uuid' | 'def'>, source: FirmwareSizes | undefined): Promise<void> {
    if (!source) return;
    const here = await this.firmwareSizes(entry, true);
    for (const [what, key] of [['firmware code', 'loaderBytes'], ['variable store', 'nvramBytes']] as const) {
      if (source[key] === undefined || here?.[key] === source[key]) continue;
      throw conflict('firmware_mismatch', `the guest's ${what} is ${source[key]} bytes at the source but ${here?.[key] ?? 'missing'}${here?.[key] === undefined ? '' : ' bytes'} here: the destination needs the same firmware build (${entry.def.os.loader?.path})`);
    }
  }

  /**
   * The domain's variable store, made from its template when it does not exist yet (its first
   * start here, or a migration's arrival: qemu then writes the source's variables into it when
   * the guest resumes, since the flash's contents travel in the stream as guest memory).
   */
  private async ensureNvram(entry: DomainEntry, incoming: boolean): Promise<void> {
    const nvram = entry.def.os.nvram;
    if (!nvram) return;
    const file = nvram.path ?? this.ownNvramPath(entry)!;
    // What this host kept of an arriving guest is older than what the stream brings (and may be
    // of another size); a file the XML names may be the very one the source runs on (shared storage).
    if (incoming && nvram.path === undefined) await fs.rm(file, { force: true });
    if (await fs.lstat(file).then(() => true, () => false)) return;
    if (nvram.template === undefined) {
      throw new DomainXmlError('nvram_template_unknown', '/domain/os/nvram', `the variable store ${file} does not exist, and no template is known for loader ${entry.def.os.loader?.path}: name one in <nvram template>`);
    }
    // Both paths were checked (start and arrival check them again); EXCL: never through a link put there since.
    await fs.copyFile(nvram.template, file, fsSync.constants.COPYFILE_EXCL);
    await fs.chmod(file, 0o600);
  }

  /**
   * What the agent keeps of a guest (its own variable store, its TPM state), removed once the
   * guest is no longer this host's: undefined, gone elsewhere, or an arrival that never took
   * over. A copy left behind would be a second, stale TPM identity and firmware state.
   */
  private async removeOwnState(entry: Pick<DomainEntry, 'uuid' | 'def'>): Promise<void> {
    const nvram = this.ownNvramPath(entry);
    if (nvram) await fs.rm(nvram, { force: true });
    await this.removeTpmState(entry.uuid);
  }

  async define(xml: string): Promise<DomainEntry> {
    const { xml: normalized, def } = await this.validate(xml);
    return this.withLock(def.name, async () => {
      for (const other of this.domains.values()) {
        if (other.uuid === def.uuid && other.name !== def.name) {
          throw conflict('uuid_in_use', `uuid ${def.uuid} already belongs to domain ${other.name}`, { domain: other.name });
        }
      }
      const existing = this.domains.get(def.name);
      if (existing && existing.uuid !== def.uuid) {
        throw conflict('domain_exists', `domain ${def.name} already exists with uuid ${existing.uuid}`, { domain: def.name });
      }
      if (existing) this.refuseUnreachable(existing, 'redefine');
      if (existing?.run || existing?.activeJob) {
        throw conflict('domain_active', `domain ${def.name} is active; shut it down before redefining it`, { domain: def.name });
      }
      if (!existing) this.refuseBeyondMaxDomains();
      await this.opts.store.saveDefinition(def.name, normalized);
      const entry: DomainEntry = { name: def.name, uuid: def.uuid, xml: normalized, def, persistent: true, lastExit: existing?.lastExit ?? { reason: 'defined', at: new Date().toISOString() } };
      this.domains.set(def.name, entry);
      return entry;
    });
  }

  async undefine(name: string): Promise<void> {
    await this.withLock(name, async () => {
      const entry = this.get(name);
      this.refuseWhileBusy(entry, 'undefine');
      if (entry.run) throw conflict('domain_active', `domain ${name} is running; destroy or shut it down first`, { domain: name });
      await this.opts.store.removeDefinition(name);
      this.domains.delete(name);
      await this.removeOwnState(entry);
    });
  }

  async start(name: string): Promise<DomainEntry> {
    return this.withLock(name, async () => {
      const entry = this.get(name);
      this.refuseWhileBusy(entry, 'start');
      if (entry.run) throw conflict('domain_active', `domain ${name} is already running`, { domain: name });
      // Again at start: symlinks and --allow-path may have changed since the definition.
      await this.checkPaths(entry.def);
      const { run } = await this.launch(entry, { incoming: false });
      await this.applyBalloonTarget(entry, run.qmp);
      await run.qmp.execute('cont');
      return entry;
    });
  }

  /** Ask the guest to power off (ACPI); the state changes when the guest actually stops. */
  shutdown(name: string): Promise<DomainEntry> {
    return this.onRunning(name, 'shutdown', (run) => run.qmp.execute('system_powerdown'));
  }

  /** Pause the guest's vCPUs (libvirt's suspend); a paused arrival is resumed the same way. */
  suspend(name: string): Promise<DomainEntry> {
    return this.onRunning(name, 'suspend', (run) => run.qmp.execute('stop'));
  }

  resume(name: string): Promise<DomainEntry> {
    return this.onRunning(name, 'resume', (run) => run.qmp.execute('cont'));
  }

  destroy(name: string): Promise<DomainEntry> {
    return this.onRunning(name, 'destroy', (_run, entry) => this.stopQemu(entry, 'destroyed'));
  }

  /** A lifecycle action on a running domain that no migration owns, under its lock. */
  private onRunning(name: string, action: string, fn: (run: RunningQemu, entry: DomainEntry) => Promise<unknown>): Promise<DomainEntry> {
    return this.withLock(name, async () => {
      const entry = this.get(name);
      this.refuseWhileBusy(entry, action);
      await fn(this.requireRunning(entry), entry);
      return entry;
    });
  }

  private refuseBeyondMaxDomains(): void {
    if (this.domains.size >= this.opts.maxDomains) {
      throw conflict('too_many_domains', `this agent holds ${this.domains.size} domains, its limit (--max-domains ${this.opts.maxDomains})`);
    }
  }

  /**
   * Start qemu for `entry` (paused, -S; with -incoming defer when asked). The runtime record is
   * written as soon as the pid is known, so a restarted agent can find the process again.
   */
  async launch(entry: DomainEntry, opts: { incoming: boolean; after?: Promise<unknown>; postcopy?: boolean; recordLater?: boolean }): Promise<{ run: RunningQemu; recorded: Promise<void> }> {
    // Memory the host cannot give now: the guest would start and be killed by the OOM killer later, or take others with it.
    const availableKiB = await memAvailableKiB();
    if (availableKiB !== undefined && entry.def.memoryKiB > availableKiB) {
      throw conflict('insufficient_host_memory', `the guest needs ${entry.def.memoryKiB} KiB; this host has ${availableKiB} KiB available`, { domain: entry.name });
    }
    // Pinning to CPUs this host lacks could not be applied (taskset would fail after the start).
    await checkPinning(entry.def);
    await checkCpuVendor(entry.def, this.accelOf(entry.def));
    const credentials = this.opts.qemuUsers.allocate();
    let tapsMade = false;
    // Until qemu runs and is watched: then swtpm ends when qemu does (onQmpClosed).
    let swtpm: SwtpmRecord | undefined;
    try {
      const taps = await this.makeTaps(entry, credentials);
      tapsMade = taps.size > 0;
      const runDir = this.runDir(entry.uuid);
      await makeQemuDir(runDir, credentials);
      if (entry.def.tpm) swtpm = await this.startSwtpm(entry, credentials, opts.incoming);
      const hugepagesPath = await prepareHugepages(entry.def, entry.uuid, credentials);
      await this.ensureNvram(entry, opts.incoming);
      const nvramPath = this.ownNvramPath(entry);
      // qemu gets the files the agent opened and checked, not paths it would resolve again itself.
      const files = await openGuestFiles(domainFileRefs(entry.def), this.pathRoots, { qemuUser: credentials, scratchDir: runDir, ...(nvramPath ? { ownFiles: [nvramPath] } : {}) });
      const spicePort = await this.spicePort(entry);
      const host = {
        ...this.hostSettings(entry.uuid, taps),
        ...(nvramPath ? { nvramPath } : {}),
        ...(spicePort !== undefined ? { spicePort } : {}),
        fileArg: (p: string) => files.args.get(p) ?? p,
        imageChain: (p: string) => files.chains.get(p),
        ...(hugepagesPath ? { hugepagesPath } : {}),
      };
      const argv = [...buildArgv(entry.def, host, { incoming: opts.incoming }), ...QEMU_SANDBOX_ARGS];
      const access = this.opts.userfaultfd;
      const { record, qmp } = await (opts.after ?? Promise.resolve()).then(() => {
        // Opened for this qemu alone, and closed here once it holds its own copy.
        const userfaultfd = opts.postcopy && access.via === 'device' ? { deviceFd: openUserfaultfdDevice(), preload: access.preload } : undefined;
        return launchQemu({
          binary: host.qemuBinary,
          argv,
          logPath: path.join(this.opts.store.dir('logs'), `${entry.name}.log`),
          pidfilePath: host.pidfilePath,
          qmpSocketPath: host.qmpSocketPath,
          passFds: files.fds,
          plainFds: files.plainFds,
          credentials,
          ...(userfaultfd ? { userfaultfd } : {}),
        }).finally(() => {
          if (userfaultfd) fsSync.closeSync(userfaultfd.deviceFd);
        });
      }).catch(async (err: unknown) => {
        files.close();
        if (entry.def.hugepages) await releaseHugepages(entry.uuid);
        if (!(err instanceof QemuStartError)) throw err;
        // qemu refused the guest (a device this host lacks, a file it cannot open): the domain keeps why.
        entry.lastExit = { reason: 'start_failed', at: new Date().toISOString(), message: err.message };
        throw new AgentError(422, 'qemu_start_failed', `qemu did not start ${entry.name}: ${err.message}`, { domain: entry.name, qemuMessage: err.logTail });
      });
      files.close(files.outputs);
      const run: RunningQemu = {
        record,
        qmp,
        monitor: new QmpMigrationMonitor(qmp),
        startedAt: new Date().toISOString(),
        incoming: opts.incoming,
        guestShutdown: false,
        outputFds: files.outputs,
        ...(swtpm ? { swtpm } : {}),
      };
      const written = this.saveRuntime(entry, run);
      if (!opts.recordLater) {
        try {
          await written;
        } catch (err) {
          await killQemu(record, { qmp, graceMs: 1000 });
          throw err;
        }
      }
      this.watch(entry, run);
      // `recordLater`: the record is written while the caller sets qemu up (an incoming one, for
      // its stream), and a failed write ends it. A restart before the write lands finds the qemu
      // by its pidfile and ends it, as any that never got a record.
      const recorded = written.catch(async (err: unknown) => {
        await this.stopQemu(entry, 'start_failed');
        throw err;
      });
      // Awaited by the caller after the steps below; until then a failure must not go unhandled.
      recorded.catch(() => undefined);
      swtpm = undefined;
      tapsMade = false; // the qemu runs: they go when it ends
      await this.applyBalloonStatsPeriod(entry, qmp);
      try {
        const pinned = await applyPinning(entry.def, record.pid, qmp);
        if (pinned.length > 0) this.opts.log.info({ domain: entry.name, pinned }, 'qemu threads pinned');
      } catch (err) {
        await this.stopQemu(entry, 'start_failed');
        throw new AgentError(500, 'pinning_failed', `could not pin the threads of ${entry.name}'s qemu: ${(err as Error).message}`, { domain: entry.name });
      }
      return { run, recorded };
    } finally {
      if (swtpm) await this.endSwtpm(entry.uuid, swtpm, opts.incoming);
      this.opts.qemuUsers.release(credentials);
      if (tapsMade) await this.removeTaps(entry.name);
      if (!entry.run) this.displayPorts.release(entry.name);
    }
  }

  /**
   * The guest's TPM emulator, as qemu's user, on the domain's TPM state: a new one is manufactured
   * first; an arriving one starts empty, since qemu's migration stream brings the TPM's state.
   */
  private async startSwtpm(entry: DomainEntry, credentials: QemuCredentials | undefined, incoming: boolean): Promise<SwtpmRecord> {
    const tpm = entry.def.tpm!;
    const dir = this.tpmDir(entry.uuid);
    // Whatever this host kept of an arriving TPM is older than what the stream brings.
    if (incoming) await this.removeTpmState(entry.uuid);
    const { stateDir, manufactured } = await prepareTpmState(dir, tpm.version, credentials);
    const run = this.runDir(entry.uuid);
    try {
      return await launchSwtpm({
        version: tpm.version,
        stateDir,
        socketPath: this.hostSettings(entry.uuid).tpmSocketPath!,
        pidfilePath: path.join(run, 'swtpm.pid'),
        logPath: path.join(this.opts.store.dir('logs'), `${entry.name}-swtpm.log`),
        ...(credentials ? { credentials } : {}),
        ...(!incoming && !manufactured ? { manufacture: { vmid: `${entry.name}:${entry.uuid}` } } : {}),
        ...(!incoming && tpm.activePcrBanks ? { pcrBanks: tpm.activePcrBanks } : {}),
      });
    } catch (err) {
      if (incoming) await this.removeTpmState(entry.uuid);
      else await releaseTpmState(dir);
      if (!(err instanceof SwtpmStartError)) throw err;
      entry.lastExit = { reason: 'start_failed', at: new Date().toISOString(), message: err.message };
      throw new AgentError(422, 'swtpm_start_failed', `swtpm did not start for ${entry.name}: ${err.message}`, { domain: entry.name, swtpmMessage: err.logTail });
    }
  }

  /**
   * Ends the swtpm of a qemu that is gone, and settles the TPM state: removed when it is no
   * longer this host's (`drop`: the guest left, or its arrival never took over), else given back
   * to the agent's user.
   */
  private async endSwtpm(uuid: string, rec: SwtpmRecord, drop: boolean): Promise<void> {
    await killSwtpm(rec);
    if (drop) await this.removeTpmState(uuid);
    else await releaseTpmState(this.tpmDir(uuid));
  }

  /**
   * The port of the guest's SPICE display, held for it while its qemu runs: an autoport one's
   * chosen now (on a migration's destination too: the port is no part of the guest), a fixed
   * one's so that no autoport chooses it. Undefined unless chosen here.
   */
  private async spicePort(entry: DomainEntry): Promise<number | undefined> {
    const g = entry.def.graphics.find((x): x is SpiceGraphicsDef => x.type === 'spice' && x.listen !== undefined);
    if (!g) return undefined;
    if (!g.autoport) {
      this.displayPorts.hold(entry.name, g.port!);
      return undefined;
    }
    const port = await this.displayPorts.acquire(entry.name, g.listen!);
    if (port === null) throw conflict('no_display_port', `no port from 5900 up is free on ${g.listen} for the SPICE display`, { domain: entry.name });
    return port;
  }

  /** Where each display of a running qemu listens, as qemu says (query-vnc, query-spice). */
  private async graphicsInfo(def: DomainDef, qmp: QmpClient): Promise<GraphicsInfo[]> {
    return Promise.all(def.graphics.map(async (g): Promise<GraphicsInfo> => {
      try {
        if (g.type === 'vnc') {
          const vnc = await qmp.execute<{ host?: string; service?: string }>('query-vnc', {}, { timeoutMs: 3000 });
          return { type: 'vnc', ...(vnc.host !== undefined ? { listen: vnc.host } : {}), ...(vnc.service !== undefined ? { port: Number(vnc.service) } : {}) };
        }
        const spice = await qmp.execute<{ host?: string; port?: number }>('query-spice', {}, { timeoutMs: 3000 });
        // Without a port (listen none: port=0) qemu says host '*' but has no socket at all.
        return { type: 'spice', ...(spice.port ? { listen: spice.host!, port: spice.port } : {}) };
      } catch (err) {
        this.opts.log.warn({ err, domain: def.name }, `could not ask qemu where its ${g.type} display listens`);
        return { type: g.type };
      }
    }));
  }

  /** As libvirt: the balloon's stats period is set over QMP once qemu runs (it is not on argv). */
  private async applyBalloonStatsPeriod(entry: DomainEntry, qmp: QmpClient): Promise<void> {
    const balloon = entry.def.memballoon;
    if (balloon?.model !== 'virtio' || balloon.statsPeriod === undefined) return;
    try {
      await qmp.execute('qom-set', { path: `/machine/peripheral/${balloon.id}`, property: 'guest-stats-polling-interval', value: balloon.statsPeriod });
    } catch (err) {
      this.opts.log.warn({ err, domain: entry.name }, 'could not set the balloon stats period');
    }
  }

  async saveRuntime(entry: DomainEntry, run: RunningQemu): Promise<void> {
    await this.opts.store.saveRecord('runtime', entry.name, runtimeRecordOf(entry, run));
  }

  onExit(listener: (name: string) => void): () => void {
    this.on('exit', listener);
    return () => this.off('exit', listener);
  }

  /** End the domain's qemu (by pid) and wait until it is gone and its exit is recorded. */
  async stopQemu(entry: DomainEntry, reason: ShutoffReason): Promise<void> {
    const run = entry.run;
    if (!run) return;
    run.expectedExit = reason;
    let onExit: (name: string) => void = () => undefined;
    const exited = new Promise<void>((resolve) => {
      onExit = (name) => {
        if (name === entry.name) resolve();
      };
      this.on('exit', onExit);
    });
    try {
      await killQemu(run.record, { qmp: run.qmp, graceMs: 3000 });
      await run.qmp.close();
      // The exit is recorded by onQmpClosed; bounded, since an agent shutting down records none.
      await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000).unref())]);
    } finally {
      this.off('exit', onExit);
    }
  }

  // A migration's claim on a domain (entry.activeJob, the rules in claims.ts): while it lasts the
  // job owns the entry and lifecycle calls are refused (refuseWhileBusy). Migration code never
  // writes an entry itself: it begins a claim, then commits it (the job succeeded) or releases it.

  /** The source's claim on a guest it is about to send: only a running guest that is not already migrating or arriving. */
  beginOutgoing(entry: DomainEntry, jobId: string): RunningQemu {
    this.claims.refuseClaimed(entry);
    const run = this.requireRunning(entry);
    if (run.incoming) throw conflict('domain_incoming', `domain ${entry.name} is still arriving here`);
    this.claims.claimOutgoing(entry, jobId);
    return run;
  }

  /** The destination's claim on the entry the arriving guest will live in (DomainClaims.claimIncoming). */
  beginIncoming(xml: string, def: DomainDef, jobId: string): DomainEntry {
    return this.claims.claimIncoming(xml, def, jobId, () => {
      this.refuseBeyondMaxDomains();
      return { name: def.name, uuid: def.uuid, xml, def, persistent: false };
    });
  }

  /** After an agent restart: the claim of a job whose record says it owns the domain. */
  restoreClaim(entry: DomainEntry, jobId: string, role: 'source' | 'destination'): void {
    this.claims.restore(entry, jobId, role);
  }

  /**
   * The arrival succeeded: the guest is this host's. It runs first (unless `paused`): the pause
   * the guest sees ends before any write. Then the definition that arrived is kept (stored when
   * the domain is persistent or `persist`: keeping the old one stored would let it win after the
   * next restart), the runtime record no longer says incoming, and only then the claim ends
   * (unless `keepClaim`). Resolves once the guest runs; `stored` once that is written. The writes
   * are queued on the domain's lock as the guest resumes, so a lifecycle call or a migration that
   * comes after waits for them instead of finding the domain still claimed; a failed one is made
   * again (the guest runs here already) until the agent stops, when `stored` rejects. A throw
   * before the guest runs leaves the claim (and any borrowed definition) in place for release,
   * and nothing written.
   */
  async commitIncoming(entry: DomainEntry, opts: { persist: boolean; paused: boolean; keepClaim?: boolean }): Promise<{ stored: Promise<void> }> {
    const run = entry.run;
    if (!run) throw new Error('the incoming qemu is gone');
    if (!opts.paused) await run.qmp.execute('cont');
    this.claims.keepArrival(entry);
    // What GET /domains says at once; the writes below record it.
    run.incoming = false;
    if (opts.persist) entry.persistent = true;
    const stored = this.withLock(entry.name, () => this.recordArrival(entry, run, opts));
    return { stored };
  }

  private async recordArrival(entry: DomainEntry, run: RunningQemu, opts: { keepClaim?: boolean }): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      try {
        if (entry.persistent) await this.opts.store.saveDefinition(entry.name, entry.xml);
        // One write for both: the domain persistent, its qemu no longer incoming.
        await this.saveRuntime(entry, run);
        if (!opts.keepClaim) this.claims.end(entry);
        return;
      } catch (err) {
        if (this.detaching.signal.aborted) throw err;
        this.opts.log.error({ err, domain: entry.name, attempt }, 'could not record the arrived guest, which runs here; trying again');
        const pauseMs = ARRIVAL_RECORD_RETRY_MS[Math.min(attempt, ARRIVAL_RECORD_RETRY_MS.length - 1)]!;
        await sleep(pauseMs, undefined, { signal: this.detaching.signal }).catch(() => {
          throw err;
        });
      }
    }
  }

  /** A claim kept past commitIncoming (a postcopy arrival, until its stream ends) ends. */
  endClaim(entry: DomainEntry): void {
    this.claims.end(entry);
  }

  /** The destination owns the guest: the paused copy here ends, then its definition when `undefine` or transient. */
  async commitOutgoing(entry: DomainEntry, opts: { undefine: boolean }): Promise<void> {
    await this.stopQemu(entry, 'migrated');
    this.claims.end(entry);
    if (opts.undefine || !entry.persistent) await this.forget(entry, true);
  }

  /** The job failed: the claim ends, the domain is as before it (DomainClaims.release). */
  release(entry: DomainEntry): void {
    if (this.claims.release(entry)) void this.forget(entry, false);
  }

  /** Forget a domain that is not running (transient after it stopped, or undefine after migrating away). */
  async forget(entry: DomainEntry, removeDefinition: boolean): Promise<void> {
    if (entry.run || entry.unreachable) throw new AgentError(500, 'internal', `forget of running domain ${entry.name}`);
    if (removeDefinition && entry.persistent) await this.opts.store.removeDefinition(entry.name);
    if (this.domains.get(entry.name) === entry) this.domains.delete(entry.name);
    await this.removeOwnState(entry);
  }

  async info(entry: DomainEntry): Promise<DomainInfo> {
    const base = {
      name: entry.name,
      uuid: entry.uuid,
      persistent: entry.persistent,
      memoryKiB: entry.def.memoryKiB,
      vcpus: entry.def.vcpus,
      machine: entry.def.machine,
      ...(entry.activeJob ? { job: entry.activeJob } : {}),
    };
    const unreachable = entry.unreachable;
    if (unreachable) {
      return {
        ...base, state: 'unreachable', reason: 'monitor_not_answering', pid: unreachable.record.pid, startedAt: unreachable.startedAt,
        reasonMessage: `qemu runs, but its monitor has not answered since ${unreachable.since} (${unreachable.attempts} attempts; the agent keeps trying): ${unreachable.lastError}`,
      };
    }
    const run = entry.run;
    if (!run) return { ...base, state: 'shutoff', reason: entry.lastExit?.reason ?? 'unknown', ...(entry.lastExit?.message ? { reasonMessage: entry.lastExit.message } : {}) };
    let qemuStatus: string | undefined;
    try {
      qemuStatus = (await run.qmp.execute<{ status: string }>('query-status', {}, { timeoutMs: 3000 })).status;
    } catch {
      qemuStatus = undefined;
    }
    let state: DomainState;
    if (entry.activeJob?.role === 'source') state = 'migrating';
    else if (run.incoming) state = 'incoming';
    else state = (qemuStatus && QMP_STATUS_TO_STATE[qemuStatus]) || (qemuStatus ? 'paused' : 'running');
    const reason = state === 'paused' ? qemuStatus : undefined;
    const graphics = entry.def.graphics.length > 0 ? await this.graphicsInfo(entry.def, run.qmp) : [];
    return {
      ...base, state, ...(reason ? { reason } : {}), pid: run.record.pid, startedAt: run.startedAt, ...(qemuStatus ? { qemuStatus } : {}),
      ...(graphics.length > 0 ? { graphics } : {}),
    };
  }

  requireRunning(entry: DomainEntry): RunningQemu {
    this.refuseUnreachable(entry, 'use');
    if (!entry.run) throw conflict('domain_not_running', `domain ${entry.name} is not running`, { domain: entry.name });
    return entry.run;
  }

  /** Whether the domain's qemu runs, reachable or not: what bars starting, undefining or replacing it. */
  isActive(entry: DomainEntry): boolean {
    return entry.run !== undefined || entry.unreachable !== undefined;
  }

  /** Nothing is done to a qemu whose monitor does not answer: its state is not known. */
  refuseUnreachable(entry: DomainEntry, action: string): void {
    const unreachable = entry.unreachable;
    if (!unreachable) return;
    throw new AgentError(503, 'domain_unreachable', `cannot ${action} domain ${entry.name}: its qemu (pid ${unreachable.record.pid}) runs, but its monitor has not answered since the agent started; the agent keeps trying to attach`, {
      domain: entry.name,
      pid: unreachable.record.pid,
      retryAfterSeconds: 5,
    });
  }

  /**
   * Resolves once the domain's qemu is attached to or known gone (at once unless it is unreachable);
   * false when the agent shuts down first.
   */
  settled(name: string): Promise<boolean> {
    return this.domains.get(name)?.unreachable?.settled ?? Promise.resolve(true);
  }

  private refuseWhileBusy(entry: DomainEntry, action: string): void {
    this.refuseUnreachable(entry, action);
    if (entry.activeJob) {
      throw conflict('domain_busy', `cannot ${action} domain ${entry.name}: migration job ${entry.activeJob.id} owns it`, {
        domain: entry.name,
        job: entry.activeJob.id,
      });
    }
  }

  private async applyBalloonTarget(entry: DomainEntry, qmp: QmpClient): Promise<void> {
    if (entry.def.currentMemoryKiB < entry.def.memoryKiB && entry.def.memballoon) {
      await qmp.execute('balloon', { value: entry.def.currentMemoryKiB * 1024 });
    }
  }

  /** Follow one qemu until its QMP connection closes; then record why it ended. */
  private watch(entry: DomainEntry, run: RunningQemu): void {
    entry.run = run;
    run.qmp.onEvent((e) => {
      // A panic that ends qemu (on_crash destroy: panic=shutdown) is a crash, not the guest's own shutdown.
      if (e.event === 'SHUTDOWN' && e.data.guest === true && e.data.reason !== 'guest-panic') run.guestShutdown = true;
      // on_crash='restart': qemu paused the panicked guest (-action panic=pause); reset it and
      // let it run on, as libvirt's fake reboot does (the same qemu, no new process).
      if (e.event === 'GUEST_PANICKED' && e.data.action === 'pause' && entry.def.onCrash === 'restart' && entry.run === run) {
        this.opts.log.warn({ domain: entry.name, info: e.data.info }, 'guest panicked: resetting it (on_crash restart)');
        void run.qmp.execute('system_reset').then(() => run.qmp.execute('cont')).catch((err: unknown) => this.opts.log.error({ err, domain: entry.name }, 'could not restart the panicked guest'));
      }
    });
    void run.qmp.closed.then(() => this.onQmpClosed(entry, run));
  }

  /** Close every QMP connection without ending any guest (agent shutdown). */
  async close(): Promise<void> {
    this.detaching.abort();
    clearInterval(this.logCap);
    await Promise.all(this.list().map((entry) => entry.unreachable?.settled));
    await Promise.all(this.list().map((entry) => entry.run?.qmp.close()));
    for (const entry of this.list()) if (entry.run) closeOutputs(entry.run);
  }

  /**
   * A guest writes its serial console as fast as it likes; the host's disk is not its to fill.
   * An output file over --max-log-size is truncated (qemu appends, so it goes on from the start)
   * with a line that says so.
   */
  private capOutputs(): void {
    for (const entry of this.domains.values()) {
      for (const fd of entry.run?.outputFds ?? []) {
        try {
          const { size } = fsSync.fstatSync(fd);
          if (size <= this.opts.maxLogBytes) continue;
          fsSync.ftruncateSync(fd, 0);
          fsSync.writeSync(fd, `[kvm-migrate: ${size} bytes truncated at the --max-log-size of ${this.opts.maxLogBytes} bytes, ${new Date().toISOString()}]\n`);
        } catch (err) {
          this.opts.log.warn({ err, domain: entry.name }, 'could not cap an output file');
        }
      }
    }
  }

  /** After a restart: the output files of a guest found running, opened again (checked) for the cap. */
  private async reopenOutputs(entry: DomainEntry): Promise<number[]> {
    try {
      const files = await openGuestFiles(domainFileRefs(entry.def), this.pathRoots, { outputsOnly: true });
      return files.outputs;
    } catch (err) {
      this.opts.log.warn({ err, domain: entry.name }, 'output files not re-opened: their size is not capped until the guest restarts');
      return [];
    }
  }

  /**
   * What a qemu that is gone leaves on the host besides its own files: its run directory (the TLS
   * copy, anything it made there), its taps, its hugetlbfs directory. A failure is logged and the
   * rest is released all the same.
   */
  private async releaseHostResources(entry: DomainEntry, record: QemuProcessRecord): Promise<void> {
    const logFailure = (what: string) => (err: unknown) => this.opts.log.error({ err, domain: entry.name }, `could not remove ${what}`);
    if (path.dirname(record.qmpSocketPath) === this.runDir(entry.uuid)) {
      await fs.rm(this.runDir(entry.uuid), { recursive: true, force: true }).catch(logFailure('the qemu run directory'));
    }
    await this.removeTaps(entry.name).catch(logFailure('the taps'));
    if (entry.def.hugepages) await releaseHugepages(entry.uuid).catch(logFailure("the guest's hugetlbfs directory"));
  }

  private async onQmpClosed(entry: DomainEntry, run: RunningQemu): Promise<void> {
    if (entry.run !== run || this.detaching.signal.aborted) return;
    const { log } = this.opts;
    // The socket closes a moment before the process is reaped. A qemu that is still alive lost
    // only its monitor connection: attach again rather than lose the guest.
    if (!(await waitForExit(run.record, 3000))) {
      let attachError: unknown;
      const qmp = await attachQemu(run.record).catch((err: unknown) => {
        attachError = err;
        return null;
      });
      if (qmp) {
        log.warn({ domain: entry.name, pid: run.record.pid }, 'QMP connection lost; re-attached');
        this.watch(entry, { ...run, qmp, monitor: new QmpMigrationMonitor(qmp) });
        return;
      }
      if (attachError !== undefined && !run.incoming) {
        // A guest's qemu runs on: a monitor that does not answer is no reason to end it (as at a restart).
        log.error({ domain: entry.name, pid: run.record.pid, err: attachError }, 'qemu runs but its monitor does not answer: kept, reported unreachable, attached to again in the background');
        this.keepUnreachable(entry, runtimeRecordOf(entry, run), attachError);
        closeOutputs(run);
        return;
      }
      if (attachError !== undefined) {
        // An arrival's empty shell that cannot be told what to do is ended: the source keeps the guest.
        log.error({ domain: entry.name, pid: run.record.pid }, 'incoming qemu alive but unreachable over QMP; ending it');
        await killQemu(run.record, { graceMs: 2000 }).catch((err: unknown) => log.error({ err, domain: entry.name }, 'could not end qemu'));
      }
    } else {
      // A killed qemu leaves its socket and pidfile.
      await removeQemuFiles(run.record).catch((err: unknown) => log.error({ err, domain: entry.name }, 'cleanup after qemu exit failed'));
    }
    const reason: ShutoffReason = run.expectedExit ?? (run.guestShutdown ? 'shutdown' : 'crashed');
    // A guest that migrated away took its TPM and firmware state along; an arrival that never took over, or a transient domain, leaves none here.
    const drop = reason === 'migrated' || run.incoming || !entry.persistent;
    if (run.swtpm) await this.endSwtpm(entry.uuid, run.swtpm, drop).catch((err: unknown) => log.error({ err, domain: entry.name }, 'could not end swtpm'));
    if (drop) await this.removeOwnState(entry).catch((err: unknown) => log.error({ err, domain: entry.name }, 'could not remove the state kept for the guest'));
    // entry.run still bars a new start meanwhile.
    await this.releaseHostResources(entry, run.record);
    closeOutputs(run);
    this.displayPorts.release(entry.name);
    entry.run = undefined;
    entry.lastExit = { reason, at: new Date().toISOString() };
    try {
      await this.opts.store.removeRecord('runtime', entry.name);
    } catch (err) {
      log.error({ err, domain: entry.name }, 'could not remove runtime record');
    }
    if (!entry.persistent && !entry.activeJob && this.domains.get(entry.name) === entry) this.domains.delete(entry.name);
    log.info({ domain: entry.name, reason, pid: run.record.pid }, 'qemu ended');
    this.emit('exit', entry.name, reason);
  }
}

function isTapsRecord(v: unknown): boolean {
  return isObject(v) && Array.isArray(v.taps) && v.taps.every(isTapRecord);
}

function isRuntimeRecord(v: unknown): boolean {
  return (
    isObject(v) &&
    typeof v.name === 'string' &&
    typeof v.uuid === 'string' &&
    typeof v.xml === 'string' &&
    isObject(v.process) &&
    typeof v.process.pid === 'number'
  );
}

/** MemAvailable of /proc/meminfo, in KiB (undefined where the kernel does not say). */
async function memAvailableKiB(): Promise<number | undefined> {
  const text = await fs.readFile('/proc/meminfo', 'utf8').catch(() => '');
  const m = /^MemAvailable:\s+(\d+) kB$/m.exec(text);
  return m ? Number(m[1]) : undefined;
}

function runtimeRecordOf(entry: DomainEntry, run: RunningQemu): RuntimeRecord {
  return {
    name: entry.name,
    uuid: entry.uuid,
    xml: entry.xml,
    persistent: entry.persistent,
    incoming: run.incoming,
    startedAt: run.startedAt,
    process: run.record,
    ...(run.swtpm ? { swtpm: run.swtpm } : {}),
  };
}

function closeOutputs(run: RunningQemu): void {
  for (const fd of run.outputFds?.splice(0) ?? []) fsSync.closeSync(fd);
}
