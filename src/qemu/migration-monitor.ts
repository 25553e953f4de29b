import type { QmpClient, QmpEvent } from './qmp.js';
import { resumeAfterMigration } from './resume.js';

/**
 * What a migration asks of a guest's qemu, on both sides, in typed calls: the only place that
 * knows the QMP commands, arguments and events behind them. The migration code depends on this
 * interface, so its state machine also runs against a monitor of another kind (the fast tier's
 * simulated qemu).
 */
export interface MigrationMonitor {
  /** The monitor connection is gone (qemu ended, or the agent closed it). */
  readonly isClosed: boolean;
  /** Whether the guest's vCPUs run (query-status). */
  guestRunning(timeoutMs?: number): Promise<boolean>;
  /** The stream's state and figures (query-migrate). */
  queryMigrate(timeoutMs?: number): Promise<MigrationInfo>;
  /** The stream's status changes (MIGRATION) and the vCPUs stopping (STOP); returns the unsubscribe. */
  onMigrationEvent(listener: (e: MigrationEvent) => void): () => void;
  setCapabilities(capabilities: Array<{ capability: string; state: boolean }>): Promise<void>;
  setParameters(parameters: Record<string, number | string>): Promise<void>;
  /** The stream over TLS: the x509 credentials in `dir`, as `endpoint`; a client checks the server's certificate names `hostname`. */
  useTls(dir: string, endpoint: 'server' | 'client', hostname?: string): Promise<void>;
  /** Stop the vCPUs (an offline migration streams a paused guest; convergence's pause and finish). */
  pause(): Promise<void>;
  /**
   * Source: cap the dirty-page rate of every vCPU at `mibPerSec` (set-vcpu-dirty-limit); qemu 7.2
   * refuses it (the error says why) unless the guest runs under KVM with a dirty ring.
   */
  limitDirtyRate(mibPerSec: number): Promise<void>;
  /** Source: lift the dirty-rate limit again (cancel-vcpu-dirty-limit). */
  cancelDirtyLimit(): Promise<void>;
  /** Source: start streaming to `uri` (tcp:HOST:PORT). */
  migrate(uri: string): Promise<void>;
  /** Source: cancel the stream; the guest stays here. Never during postcopy: the guest would be lost. */
  cancelMigration(): Promise<void>;
  /** Source: switch the stream to postcopy (migrate-start-postcopy; needs the postcopy-ram capability on both ends). */
  startPostcopy(): Promise<void>;
  /** Either end: break a postcopy stream that hangs on a dead link, so that it can be recovered (migrate-pause). */
  pausePostcopy(): Promise<void>;
  /** Destination: a paused postcopy listens on `uri` for the source to resume it (migrate-recover). */
  listenForRecovery(uri: string): Promise<void>;
  /** Source: resume a paused postcopy stream to the destination now listening on `uri` (migrate with resume). */
  resumePostcopy(uri: string): Promise<void>;
  /** Destination: a qemu started with -incoming defer listens on `uri`. */
  listenIncoming(uri: string): Promise<void>;
  /** Run the guest again after its outgoing stream ended; the error if it could not within `timeoutMs` (see resumeAfterMigration). */
  resumeAfterMigration(timeoutMs: number, onWait: (reason: string) => Promise<void> | void): Promise<Error | null>;
  /** Destination: run the guest that arrived. */
  resume(): Promise<void>;
  /** How fast the guest dirties its memory, in bytes per second, sampled over `seconds` (calc-dirty-rate). */
  measureDirtyRate(seconds: number): Promise<number>;
}

/** qemu's MigrationStatus values the agent acts on; others (setup, pre-switchover, device, ...) are passed through. */
export type MigrationStatus = 'none' | 'active' | 'completed' | 'failed' | 'cancelled' | 'cancelling' | (string & {});

export const TERMINAL_STREAM_STATUSES: ReadonlySet<string> = new Set(['completed', 'failed', 'cancelled']);

/**
 * The statuses of a stream switched to postcopy: from then the destination runs the guest and the
 * source holds pages it lacks, so neither copy may be ended or resumed until the stream completes.
 */
export const POSTCOPY_STREAM_STATUSES: ReadonlySet<string> = new Set(['postcopy-active', 'postcopy-paused', 'postcopy-recover']);

/** query-migrate's answer, in milliseconds and bytes. */
export interface MigrationInfo {
  status: MigrationStatus;
  totalTimeMs?: number;
  setupTimeMs?: number;
  downtimeMs?: number;
  expectedDowntimeMs?: number;
  /** How much auto-converge throttles the vCPUs now, when it does. */
  cpuThrottlePercent?: number;
  errorDesc?: string;
  ram?: {
    transferredBytes: number;
    remainingBytes: number;
    totalBytes: number;
    mbps: number;
    dirtyPagesRate: number;
    /** Dirty-page sync passes: how many times qemu went over memory. */
    iterations: number;
  };
}

export type MigrationEvent =
  | { kind: 'status'; status: MigrationStatus }
  /** The vCPUs stopped (for the switch-over), at qemu's own timestamp in ms since the epoch. */
  | { kind: 'stopped'; atMs: number };

/** query-migrate's wire shape (qemu 7.2). */
interface QueryMigrateReply {
  status?: string;
  'total-time'?: number;
  'setup-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  'cpu-throttle-percentage'?: number;
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

/** The id of qemu's credentials object for one end; a guest that arrived (server) may leave later (client). */
export const qemuTlsCredsId = (endpoint: 'server' | 'client') => `kvmm-tls-${endpoint}`;

/** The monitor of a real qemu, over its QMP connection. */
export class QmpMigrationMonitor implements MigrationMonitor {
  private readonly qmp: QmpClient;

  constructor(qmp: QmpClient) {
    this.qmp = qmp;
  }

  get isClosed(): boolean {
    return this.qmp.isClosed;
  }

  async guestRunning(timeoutMs = 5000): Promise<boolean> {
    return (await this.qmp.execute<{ running: boolean }>('query-status', {}, { timeoutMs })).running;
  }

  async queryMigrate(timeoutMs = 10_000): Promise<MigrationInfo> {
    const r = await this.qmp.execute<QueryMigrateReply>('query-migrate', {}, { timeoutMs });
    return {
      status: r.status ?? 'none',
      ...(r['total-time'] !== undefined ? { totalTimeMs: r['total-time'] } : {}),
      ...(r['setup-time'] !== undefined ? { setupTimeMs: r['setup-time'] } : {}),
      ...(r.downtime !== undefined ? { downtimeMs: r.downtime } : {}),
      ...(r['expected-downtime'] !== undefined ? { expectedDowntimeMs: r['expected-downtime'] } : {}),
      ...(r['cpu-throttle-percentage'] !== undefined ? { cpuThrottlePercent: r['cpu-throttle-percentage'] } : {}),
      ...(r['error-desc'] !== undefined ? { errorDesc: r['error-desc'] } : {}),
      ...(r.ram
        ? {
            ram: {
              transferredBytes: r.ram.transferred,
              remainingBytes: r.ram.remaining,
              totalBytes: r.ram.total,
              mbps: r.ram.mbps,
              dirtyPagesRate: r.ram['dirty-pages-rate'],
              iterations: r.ram['dirty-sync-count'],
            },
          }
        : {}),
    };
  }

  onMigrationEvent(listener: (e: MigrationEvent) => void): () => void {
    return this.qmp.onEvent((e: QmpEvent) => {
      if (e.event === 'MIGRATION') listener({ kind: 'status', status: String(e.data.status) });
      else if (e.event === 'STOP') listener({ kind: 'stopped', atMs: e.timestamp.seconds * 1000 + Math.floor(e.timestamp.microseconds / 1000) });
    });
  }

  async setCapabilities(capabilities: Array<{ capability: string; state: boolean }>): Promise<void> {
    await this.qmp.execute('migrate-set-capabilities', { capabilities });
  }

  async setParameters(parameters: Record<string, number | string>): Promise<void> {
    await this.qmp.execute('migrate-set-parameters', parameters);
  }

  async useTls(dir: string, endpoint: 'server' | 'client', hostname?: string): Promise<void> {
    const id = qemuTlsCredsId(endpoint);
    // The files are read when the object is made, so one left from an earlier migration is
    // replaced: certificates may have been renewed since.
    await this.qmp.execute('object-del', { id }).catch(() => undefined);
    await this.qmp.execute('object-add', { 'qom-type': 'tls-creds-x509', id, dir, endpoint, 'verify-peer': true });
    await this.setParameters({ 'tls-creds': id, ...(hostname ? { 'tls-hostname': hostname } : {}) });
  }

  async pause(): Promise<void> {
    await this.qmp.execute('stop');
  }

  async limitDirtyRate(mibPerSec: number): Promise<void> {
    await this.qmp.execute('set-vcpu-dirty-limit', { 'dirty-rate': mibPerSec });
  }

  async cancelDirtyLimit(): Promise<void> {
    await this.qmp.execute('cancel-vcpu-dirty-limit');
  }

  async migrate(uri: string): Promise<void> {
    await this.qmp.execute('migrate', { uri });
  }

  async cancelMigration(): Promise<void> {
    await this.qmp.execute('migrate_cancel');
  }

  async startPostcopy(): Promise<void> {
    await this.qmp.execute('migrate-start-postcopy');
  }

  async pausePostcopy(): Promise<void> {
    // Out of band: a stream hung on a dead link may hold qemu's main loop, and with it every in-band command.
    await this.qmp.executeOob('migrate-pause');
  }

  async listenForRecovery(uri: string): Promise<void> {
    // Out of band: a destination waiting for a page it lacks may hold its main loop.
    await this.qmp.executeOob('migrate-recover', { uri });
  }

  async resumePostcopy(uri: string): Promise<void> {
    await this.qmp.execute('migrate', { uri, resume: true });
  }

  async listenIncoming(uri: string): Promise<void> {
    await this.qmp.execute('migrate-incoming', { uri });
  }

  resumeAfterMigration(timeoutMs: number, onWait: (reason: string) => Promise<void> | void): Promise<Error | null> {
    return resumeAfterMigration(this.qmp, timeoutMs, onWait);
  }

  async resume(): Promise<void> {
    await this.qmp.execute('cont');
  }

  async measureDirtyRate(seconds: number): Promise<number> {
    // Page sampling hashes sample pages before and after: it needs no dirty log, so it works under TCG too.
    await this.qmp.execute('calc-dirty-rate', { 'calc-time': seconds, mode: 'page-sampling' });
    const deadline = Date.now() + seconds * 1000 + 5000;
    for (;;) {
      const r = await this.qmp.execute<{ status: string; 'dirty-rate'?: number }>('query-dirty-rate');
      // qemu gives whole MB/s.
      if (r.status === 'measured') return (r['dirty-rate'] ?? 0) * 1e6;
      if (Date.now() > deadline) throw new Error(`qemu did not finish measuring the dirty rate within ${seconds + 5} s (status ${r.status})`);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}
