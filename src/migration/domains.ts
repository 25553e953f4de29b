import type { DomainDef } from '../domain/model.js';
import type { MigrationMonitor } from '../qemu/migration-monitor.js';
import type { FirmwareSizes } from './protocol.js';

/**
 * A domain as migration code sees it: read only. Its state changes only through the claims of
 * MigrationDomains, so the domain manager is the one owner of who holds a guest.
 */
export interface MigratingDomain {
  readonly name: string;
  readonly uuid: string;
  readonly xml: string;
  readonly def: DomainDef;
  /** Its qemu, while one runs and its monitor answers. */
  readonly run?: { readonly monitor: MigrationMonitor };
}

/**
 * What the migration code needs of this host's domains. The agent's DomainManager is the real
 * one; the fast tier (test/migration/fast-tier.test.ts) drives the same state machine over a
 * simulated host.
 */
export interface MigrationDomains<E extends MigratingDomain = MigratingDomain> {
  list(): readonly E[];
  /** The domain, or 404 domain_not_found. */
  get(name: string): E;
  find(name: string): E | undefined;
  /** Serialises the lifecycle calls of one domain. */
  withLock<T>(name: string, fn: () => Promise<T>): Promise<T>;
  /** Parses and checks arriving XML as a define would (400/409/422 when this host cannot run it). */
  validate(xml: string): Promise<{ xml: string; def: DomainDef }>;
  accelOf(def: DomainDef): 'kvm' | 'tcg';
  firmwareSizes(entry: E): Promise<FirmwareSizes | undefined>;
  /** Refuses (409 firmware_mismatch) flash sizes other than the source's. */
  checkFirmwareSizes(entry: Pick<E, 'uuid' | 'def'>, source: FirmwareSizes | undefined): Promise<void>;
  /** Where the domain's qemu finds its TLS credentials for the stream. */
  qemuTlsDir(entry: E): Promise<string>;
  /** Its qemu runs, reachable or not. */
  isActive(entry: E): boolean;
  /** Resolves once the domain's qemu is attached to or known gone; false when the agent shuts down first. */
  settled(name: string): Promise<boolean>;
  /**
   * Starts the domain's qemu; `incoming`: waiting for a stream (-incoming defer). `after`: what
   * must be done before qemu is executed (its job record's write): the host-side preparation
   * runs meanwhile, and a rejected `after` starts no qemu. `postcopy`: an incoming qemu that may
   * receive a postcopy gets what it needs for userfaultfd here (see src/qemu/userfaultfd.ts).
   * `recordLater`: it resolves once qemu answers, its runtime record (`recorded`) still being
   * written; a failed write ends the qemu.
   */
  launch(entry: E, opts: { incoming: boolean; after?: Promise<unknown>; postcopy?: boolean; recordLater?: boolean }): Promise<{ readonly run: { readonly monitor: MigrationMonitor }; recorded: Promise<void> }>;
  /** Ends the domain's qemu (an incoming one that will not be taken over). */
  stopQemu(entry: E, reason: 'failed'): Promise<void>;
  /** Calls `listener` with the name of each domain whose qemu ended; returns the unsubscribe. */
  onExit(listener: (name: string) => void): () => void;

  // The claims: while one lasts the job owns the domain and lifecycle calls are refused.
  /** The source's claim on a running guest it is about to send; refused when busy or still arriving. */
  beginOutgoing(entry: E, jobId: string): { readonly monitor: MigrationMonitor };
  /** The destination's claim on the entry the arriving guest will live in. */
  beginIncoming(xml: string, def: DomainDef, jobId: string): E;
  /** After an agent restart: the claim of a job whose record says it owns the domain. */
  restoreClaim(entry: E, jobId: string, role: 'source' | 'destination'): void;
  /**
   * The arrival succeeded: the guest is this host's. Resolves once it runs (unless `paused`);
   * `stored` once that is recorded here, and the claim ends then, or, with `keepClaim` (a postcopy
   * still pulling pages), lasts until endClaim.
   */
  commitIncoming(entry: E, opts: { persist: boolean; paused: boolean; keepClaim?: boolean }): Promise<{ stored: Promise<void> }>;
  /** The claim kept by commitIncoming ends: the domain takes lifecycle calls again. */
  endClaim(entry: E): void;
  /** The departure succeeded: the paused copy here ends (and its definition when `undefine` or transient). */
  commitOutgoing(entry: E, opts: { undefine: boolean }): Promise<void>;
  /** The job failed: the claim ends and the domain is as before it. */
  release(entry: E): void;
}
