import { EventEmitter } from 'node:events';
import { AgentError } from '../errors.js';
import { isObject, type RecordStore } from '../store/state-store.js';
import { KeyedMutex } from '../agent/lock.js';
import { canMove, currentPhase, type DestinationPhase, type JobRole, type JobStatus, type Phase, type SourcePhase } from './phases.js';
import type { MigrationOptions, StreamTransport } from './params.js';
import type { ConvergenceState } from './convergence.js';

/** Progress of the stream as qemu reports it (query-migrate), in the units an operator reads. */
export interface MigrationStats {
  qemuStatus: string;
  transferredBytes: number;
  remainingBytes: number;
  totalBytes: number;
  /** Bytes per second over the last second, as qemu measures it. */
  throughputBytesPerSec: number;
  dirtyPagesRate: number;
  iterations: number;
  expectedDowntimeMs?: number;
  /** The downtime limit in force (it rises when the convergence policy escalates it). */
  downtimeLimitMs?: number;
  /** Source: the convergence policy's step, throttle and deadline. */
  convergence?: ConvergenceState;
  /** How far the stream is, 0-100, from what is transferred and what remains. */
  percent: number;
  /** The time the stream has left, a countdown that never rises (see EtaCountdown); absent while it does not converge. */
  etaMs?: number;
  /** Once the stream switched to postcopy: its state and the recoveries of a broken stream. */
  postcopy?: PostcopyState;
}

/** A postcopy stream as the job's stats show it. */
export interface PostcopyState {
  /** `active`: pages stream; `paused`: the stream broke, both qemus wait; `recovering`: a recovery is under way. */
  state: 'active' | 'paused' | 'recovering';
  startedAt: string;
  /** Streams broken and recovered so far, and attempts made on the current break (source). */
  recoveries: number;
  attempts: number;
  pausedSince?: string;
  lastError?: string;
  /** The source gave up recovering by itself (postcopyRecoverySeconds passed): POST /jobs/{id}/recover tries again. */
  gaveUp?: boolean;
}

export interface JobTimings {
  /** Request to terminal state, as the agent saw it. */
  totalMs?: number;
  /** Prepare2 round trip and source-side QMP set-up before `migrate`. */
  setupMs?: number;
  /** From the caller's request to the destination's Prepare2 answer (its qemu listening). */
  prepare2Ms?: number;
  /** From the caller's request to the first byte streamed (qemu's stream active). */
  firstByteMs?: number;
  /** From the stream's end, as the source saw it, to the destination's Finish2 answer (the guest running there). */
  streamEndToRunningMs?: number;
  /** The agent's own cost: totalMs minus qemu's stream time (qemuTotalMs). */
  aroundStreamMs?: number;
  /** From the switch to postcopy to the stream's end: the time the guest ran at the destination while pages still arrived. */
  postcopyMs?: number;
  /** qemu's own figures: the stream's duration and the guest's stop time at switch-over. */
  qemuTotalMs?: number;
  qemuDowntimeMs?: number;
  qemuSetupMs?: number;
  /**
   * From the source vCPUs stopping for the switch-over (qemu's STOP event; for a guest already
   * paused, the stream's end) until the destination guest was running: the pause the guest saw,
   * qemu's downtime included.
   */
  switchoverMs?: number;
}

/** What jobs of both roles record. */
interface JobRecordCommon {
  id: string;
  domain: string;
  uuid: string;
  status: JobStatus;
  options: MigrationOptions;
  peer: { url?: string; hostUuid?: string; hostname?: string };
  uri?: string;
  error?: { code: string; message: string };
  createdAt: string;
  updatedAt: string;
  endedAt?: string;
  timings: JobTimings;
  stats?: MigrationStats;
  /** Source: the Finish2 exchange. Destination: the rc it was told and the outcome it decided. */
  finish?: { rc: number; attempts: number; outcome?: 'finished' | 'aborted'; lastError?: string };
  /** Why the job is waiting, when it is (e.g. the peer is unreachable and the guest stays paused). */
  waiting?: string;
  cancelRequested?: boolean;
  /**
   * Source: a caller's POST /jobs/{id}/complete, carried out by the stream follower: `postcopy`
   * switches the stream to postcopy, `pause` pauses the guest so the rest copies (pause and finish).
   */
  completeRequested?: { mode: 'postcopy' | 'pause'; at: string };
  /** Destination: where its paused postcopy listens for the source's recovery (migrate-recover). */
  recoveryUri?: string;
  /** How the stream is carried, as both ends agreed in Prepare2 (absent before the answer, and in older records). */
  transport?: StreamTransport;
  /** The Prepare2 answer's finishToken (both roles); never served by the API. */
  finishToken?: string;
}

export interface SourceJobRecord extends JobRecordCommon {
  role: 'source';
  phase: SourcePhase;
  phaseHistory: Array<{ phase: SourcePhase; at: string }>;
  /**
   * Whether the guest ran when the migration started (libvirt's preMigrationState). A rollback,
   * also after an agent restart, runs the guest again only when it did.
   */
  runningBeforeMigration?: boolean;
  /**
   * An operator's decision while the Finish2 outcome stayed unknown (the destination unreachable
   * for good), applied instead of the destination's answer.
   */
  resolution?: { outcome: 'finished' | 'aborted'; reason: string; at: string };
}

export interface DestinationJobRecord extends JobRecordCommon {
  role: 'destination';
  phase: DestinationPhase;
  phaseHistory: Array<{ phase: DestinationPhase; at: string }>;
  /** In postcopy: the arrival was committed (the guest is this host's and runs) while the stream goes on. */
  arrivalCommitted?: boolean;
  /** When the arrived guest resumed here (Finish2's answer says how long ago). */
  resumedAt?: string;
}

/** A job's record, tagged by its role: each role has phases (and a few fields) of its own. */
export type JobRecord = SourceJobRecord | DestinationJobRecord;

/** A patch of a record: the common fields, plus the source's own. */
export type JobPatch = Partial<Omit<JobRecordCommon, 'id'>> & Partial<Pick<SourceJobRecord, 'runningBeforeMigration' | 'resolution'>> & Partial<Pick<DestinationJobRecord, 'arrivalCommitted' | 'resumedAt'>>;

/**
 * The pauses before each new attempt to carry on a job whose run threw (a bug, a failed write),
 * the last one repeated: attempts go on until the job ends, since leaving it would leave its
 * domain blocked, or a guest's fate undecided.
 */
export const CRASHED_JOB_RETRY_MS = [1000, 2000, 5000, 10_000, 30_000];

/**
 * Waits for every one of `steps` (a phase's write made alongside the action it precedes, say) to
 * settle, then rejects with the first failure, if any: nothing is left running when the caller
 * handles the error.
 */
export async function settled(...steps: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(steps);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

export class Job<R extends JobRecord = JobRecord> extends EventEmitter {
  record: R;
  constructor(record: R) {
    super();
    this.record = record;
  }
  get id(): string {
    return this.record.id;
  }
  get terminal(): boolean {
    return this.record.status !== 'running';
  }
}

export type SourceJob = Job<SourceJobRecord>;
export type DestinationJob = Job<DestinationJobRecord>;

export function isSourceJob(job: Job): job is SourceJob {
  return job.record.role === 'source';
}

export function isDestinationJob(job: Job): job is DestinationJob {
  return job.record.role === 'destination';
}

/** The phases of a role's jobs. */
export type JobPhase<Role extends JobRole> = Extract<JobRecord, { role: Role }>['phase'];

/** What a new job is created with. */
export type NewJobFields<Role extends JobRole> = Pick<JobRecordCommon, 'id' | 'domain' | 'uuid' | 'options' | 'peer'> &
  Partial<Pick<JobRecordCommon, 'finishToken' | 'transport' | 'uri'>> & { role: Role } & (Role extends 'source' ? { runningBeforeMigration?: boolean } : unknown);

/**
 * All migration jobs of this agent, both roles, keyed by migration id. Phase changes go
 * through here so they are validated against the phase model and written before acting.
 */
export class JobRegistry {
  private readonly jobs = new Map<string, Job>();
  /** What a job's next writes wait for (see end's `after`); a rejected one fails them. */
  private readonly gates = new Map<string, Promise<unknown>>();
  private readonly store: RecordStore;
  private readonly history: number;
  readonly locks = new KeyedMutex();

  /** `history`: ended jobs kept per domain; older ones are removed when another one ends. */
  constructor(store: RecordStore, history: number) {
    this.store = store;
    this.history = history;
  }

  async load(): Promise<Job[]> {
    const loaded = await this.store.loadRecords<JobRecord>('jobs', isJobRecord);
    for (const { value } of loaded) {
      value.phase = currentPhase(value.role, value.phase) as never;
      for (const h of value.phaseHistory) h.phase = currentPhase(value.role, h.phase) as never;
      this.jobs.set(value.id, new Job(value));
    }
    return [...this.jobs.values()];
  }

  get(id: string): Job | undefined {
    return this.jobs.get(id);
  }

  require(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw new AgentError(404, 'job_not_found', `no migration job ${id}`, { job: id });
    return job;
  }

  list(): Job[] {
    return [...this.jobs.values()].sort((a, b) => a.record.createdAt.localeCompare(b.record.createdAt));
  }

  running(role: JobRole): Job[] {
    return this.list().filter((j) => j.record.role === role && !j.terminal);
  }

  /** The job, once its record is written (in `phase`, passing through `via` in the same write). */
  async create<Role extends JobRole>(
    fields: NewJobFields<Role>,
    phase: JobPhase<Role>,
    via: readonly JobPhase<Role>[] = [],
  ): Promise<Job<Extract<JobRecord, { role: Role }>>> {
    const { job, written } = this.begin<Role>(fields, phase, via);
    try {
      await written;
    } catch (err) {
      this.jobs.delete(job.id);
      throw err;
    }
    return job;
  }

  /**
   * The job registered at once (admission counts it from this moment), and its first write
   * started: for a job whose first step may start while that write is under way. A failed write
   * leaves the job registered, for its own run to end it.
   */
  begin<Role extends JobRole>(fields: NewJobFields<Role>, phase: JobPhase<Role>, via: readonly JobPhase<Role>[] = []): { job: Job<Extract<JobRecord, { role: Role }>>; written: Promise<void> } {
    const now = new Date().toISOString();
    const job = new Job({
      ...fields,
      status: 'running',
      phase,
      createdAt: now,
      updatedAt: now,
      phaseHistory: [...via, phase].map((p) => ({ phase: p, at: now })),
      timings: {},
    } as unknown as Extract<JobRecord, { role: Role }>);
    this.jobs.set(job.id, job);
    return { job, written: this.save(job) };
  }

  /**
   * Move to `phase` durably, passing through the phases in `via` (kept in the history) in the
   * same write; refuses a move the phase model does not allow.
   */
  async setPhase<R extends JobRecord>(job: Job<R>, phase: R['phase'], patch: JobPatch = {}, via: readonly R['phase'][] = []): Promise<void> {
    const { record } = job;
    const now = new Date().toISOString();
    const phaseHistory: Array<{ phase: Phase; at: string }> = [...record.phaseHistory];
    let from: Phase = record.phase;
    for (const next of [...via, phase]) {
      if (next === from) continue;
      if (!canMove(record.role, from, next)) {
        throw new AgentError(500, 'bad_phase_transition', `${record.role} job ${record.id}: ${from} -> ${next} is not allowed`);
      }
      phaseHistory.push({ phase: next, at: now });
      from = next;
    }
    // canMove let only the record's own role's phases through.
    job.record = { ...record, ...patch, phase, updatedAt: now, phaseHistory } as R;
    await this.save(job);
  }

  async update<R extends JobRecord>(job: Job<R>, patch: JobPatch): Promise<void> {
    job.record = { ...job.record, ...patch, updatedAt: new Date().toISOString() } as R;
    await this.save(job);
  }

  /**
   * A change kept in memory and written with the next write: what is decided before it can be
   * recorded (a Finish2 outcome once the guest runs here), so that answers from memory say it.
   */
  keep(job: Job, patch: JobPatch): void {
    job.record = { ...job.record, ...patch } as JobRecord;
  }

  /** Stats change every poll; they are kept in memory and written with the next phase change. */
  setStats(job: Job, stats: MigrationStats): void {
    job.record.stats = stats;
  }

  /**
   * Close the job (phase `done`), with `patch` in the same write. The record in memory changes
   * at the call, before the write: what answers from memory (GET /jobs, Finish2) says so at once.
   * `after`: what must be on disk before `done` is (the job's writes wait for it, and none is
   * made if it fails). `via`: phases passed through in the same write (kept in the history).
   */
  async end<R extends JobRecord>(
    job: Job<R>,
    status: Exclude<JobStatus, 'running'>,
    error?: { code: string; message: string },
    patch: JobPatch = {},
    after?: Promise<unknown>,
    via: readonly R['phase'][] = [],
  ): Promise<void> {
    if (after) {
      this.gates.set(job.id, after);
      const open = () => {
        if (this.gates.get(job.id) === after) this.gates.delete(job.id);
      };
      after.then(open, open);
    }
    const endedAt = new Date().toISOString();
    const totalMs = Date.parse(endedAt) - Date.parse(job.record.createdAt);
    const timings = { ...job.record.timings, ...patch.timings, totalMs };
    if (timings.qemuTotalMs !== undefined) timings.aroundStreamMs = totalMs - timings.qemuTotalMs;
    await this.setPhase(job, 'done', {
      ...patch,
      status,
      endedAt,
      waiting: undefined,
      ...(error ? { error } : {}),
      timings,
    }, via);
    job.emit('end', job.record);
    await this.prune(job.record.domain);
  }

  /**
   * Remove the ended jobs of `domain` beyond the newest `history` ones (all domains when none is
   * given), so records do not pile up. A Finish2 replay for a removed destination job is then
   * unknown here; the UUID it carries keeps that from being taken for "never ran here".
   */
  async prune(domain?: string): Promise<void> {
    const ended = new Map<string, Job[]>();
    for (const job of this.jobs.values()) {
      if (!job.terminal || (domain !== undefined && job.record.domain !== domain)) continue;
      const list = ended.get(job.record.domain) ?? [];
      list.push(job);
      ended.set(job.record.domain, list);
    }
    for (const jobs of ended.values()) {
      jobs.sort((x, y) => (y.record.endedAt ?? '').localeCompare(x.record.endedAt ?? ''));
      for (const old of jobs.slice(this.history)) {
        this.jobs.delete(old.id);
        await this.store.removeRecord('jobs', old.id);
      }
    }
  }

  /** Resolve when the job reaches a terminal status (or the timeout passes). */
  waitForEnd(job: Job, timeoutMs: number): Promise<JobRecord> {
    if (job.terminal) return Promise.resolve(job.record);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        job.off('end', onEnd);
        resolve(job.record);
      }, timeoutMs);
      const onEnd = (rec: JobRecord) => {
        clearTimeout(timer);
        resolve(rec);
      };
      job.once('end', onEnd);
    });
  }

  private async save(job: Job): Promise<void> {
    await this.gates.get(job.id);
    await this.store.saveRecord('jobs', job.id, job.record);
  }
}

function isJobRecord(v: unknown): boolean {
  return isObject(v) && typeof v.id === 'string' && (v.role === 'source' || v.role === 'destination') && typeof v.phase === 'string';
}
