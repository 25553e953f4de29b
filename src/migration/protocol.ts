import type { UserfaultfdAccess } from '../qemu/userfaultfd.js';
import { randomBytes } from 'node:crypto';
import type { Logger } from '../log.js';
import type { AgentConfig } from '../config.js';
import type { MigrationDomains } from './domains.js';
import type { HostInfo } from '../host-info.js';
import type { JobRegistry, JobRecord } from './jobs.js';
import type { MigrationOptions, StreamTransport } from './params.js';
import type { PeerClient } from './peer-client.js';
import type { HoldPoint } from './holds.js';

/** A Prepare2 answer's finishToken: 32 random bytes in hex. */
export const FINISH_TOKEN_PATTERN = '^[0-9a-f]{64}$';

export function newFinishToken(): string {
  return randomBytes(32).toString('hex');
}

/** Messages of migration protocol version 2 between two agents. */
export interface Prepare2Request {
  protocolVersion: 2;
  migrationId: string;
  xml: string;
  desturi?: string;
  options: PeerOptions;
  /** accelerator: what the guest runs on at the source; the destination must run it on the same. */
  source: { hostUuid: string; hostname: string; accelerator?: 'kvm' | 'tcg' };
  /** A UEFI guest's flash sizes at the source: the destination refuses other ones (firmware_mismatch). */
  firmware?: FirmwareSizes;
  /** The stream's transport the source offers (see params.ts agreeTransport); absent from sources older than it. */
  transport?: StreamTransport;
}

/** The options the destination is told: the transport's own travel as the offer, which an older destination may not know. */
export type PeerOptions = Omit<MigrationOptions, TransportOptionKey>;
export type TransportOptionKey = 'multifdChannels' | 'compression' | 'xbzrle';

/** The sizes of a guest's pflash images: its firmware code and its variable store. */
export interface FirmwareSizes {
  loaderBytes: number;
  nvramBytes?: number;
}

export interface Prepare2Response {
  migrationId: string;
  /** Where the source's qemu must stream to, in qemu's URI syntax (`tcp:host:port`). */
  uri: string;
  destination: { hostUuid: string; hostname: string };
  /**
   * A secret for this migration: Finish2 is acted on only with it, so only whoever got this
   * answer (the source that sent Prepare2) can end the migration, not any holder of a credential.
   */
  finishToken: string;
  /** The transport the destination's qemu is set to, which the source's must match; absent from destinations older than the agreement. */
  transport?: StreamTransport;
}

export interface Finish2Request {
  migrationId: string;
  /** The Perform step's return code: 0 means the stream completed. */
  rc: number;
  /** Why Perform failed, for the destination's job record. */
  error?: string;
  cancelled?: boolean;
  /** The finishToken of the Prepare2 answer. */
  finishToken?: string;
  /** The guest's UUID: lets a destination that no longer holds the job tell whether it runs the guest. */
  uuid?: string;
}

export interface Finish2Response {
  migrationId: string;
  /** finished: the destination owns and runs (or holds paused) the guest; aborted: its qemu is gone. */
  outcome: 'finished' | 'aborted';
  state?: string;
  /**
   * The stream switched to postcopy here: the guest ran here, so the source's copy is out of date
   * (absent or false: it never ran here, and an aborted migration leaves the source's copy whole).
   */
  postcopy?: boolean;
  /** How long the guest had run here when this answer was made (it resumes before the arrival's writes and the answer). */
  runningForMs?: number;
  error?: { code: string; message: string };
}

/** How one agent calls another's protocol routes (PeerClient over HTTP; the fast tier's in-process peer). */
export type PeerCalls = Pick<PeerClient, 'call' | 'close'>;

/** What both sides of the protocol share inside one agent. */
export interface MigrationContext {
  config: AgentConfig;
  domains: MigrationDomains;
  jobs: JobRegistry;
  peers: PeerCalls;
  /** Bytes of the incoming stream arrived so far on host:port (see stream-sockets.ts); undefined when no stream is connected. */
  incomingBytes: (host: string, port: number) => Promise<number | undefined>;
  /** Resets the source's connections of a stream to host:port (see stream-sockets.ts). */
  resetStream: (host: string, port: number) => Promise<void>;
  hostInfo: () => HostInfo;
  log: Logger;
  hold: (point: HoldPoint, migrationId: string) => Promise<void>;
  /** With TLS, both ends' qemu stream over TLS too (DomainManager.qemuTlsDir gives each its credentials). */
  streamTls: boolean;
  /** Whether (and how) this host's qemus receive a postcopy stream. */
  userfaultfd: UserfaultfdAccess;
}

export type { JobRecord };
