/**
 * The phase model of a migration job, in one place for both roles: each phase, what it means,
 * where it may go next, and what it obliges (who decides the outcome, what a cancel does, which
 * bound runs when the peer is never heard from again, what an agent restart and a crash inside
 * the phase do). Each phase is written to disk before the action it names is taken, so a
 * restarted agent knows exactly how far a job got and which way to drive it (forward to the
 * destination owning the guest, or back to the source keeping it). The two roles' phases have
 * names of their own; only `done` is shared.
 */
export const PROTOCOL_VERSIONS = [2] as const;

export type JobStatus = 'running' | 'completed' | 'failed' | 'cancelled';
export type JobRole = 'source' | 'destination';

export const SOURCE_PHASES = [
  'preparing', // Prepare2 is being sent to the destination
  'prepared', // the destination answered a URI; its qemu waits for the stream
  'streaming', // QMP migrate issued; the guest runs (live) while memory streams
  'postcopy', // migrate-start-postcopy issued: the destination runs the guest; pages it lacks stream from here
  'stream-completed', // the stream completed; the source guest is paused (postmigrate)
  'asking-outcome', // Finish2(rc=0) sent; outcome not yet known: the source stays paused
  'confirmed', // the destination owns the guest; the source qemu ended (passed inside the write of done; an older agent wrote it on its own)
  'rolling-back', // the stream failed or the destination aborted: Finish2(rc!=0), resume the source
  'done', // terminal
] as const;

export const DESTINATION_PHASES = [
  'starting-incoming', // the incoming qemu is being started (passed inside the write of listening, made before it starts; an older agent wrote it on its own)
  'listening', // qemu listens (-incoming defer + migrate-incoming); the lease runs
  'receiving', // the stream is under way; the stream watch runs
  'received', // the stream completed; the guest is paused here, waiting for Finish2
  'postcopy-active', // the source switched to postcopy: this host owns the guest and runs it while the rest arrives
  'taking-over', // Finish2(rc=0) accepted: this host owns the guest; resuming it
  'aborting', // Finish2(rc!=0), a lease expiry or a failed stream: ending the empty qemu
  'done', // terminal
] as const;

export type SourcePhase = (typeof SOURCE_PHASES)[number];
export type DestinationPhase = (typeof DESTINATION_PHASES)[number];
export type Phase = SourcePhase | DestinationPhase;

/**
 * Phase names of records written by agents before the roles' names were told apart (a job in
 * flight across an upgrade, or kept as history), as each role's phase of today.
 */
const LEGACY_PHASES: { source: Record<string, SourcePhase>; destination: Record<string, DestinationPhase> } = {
  source: { finishing: 'asking-outcome' },
  destination: { preparing: 'starting-incoming', prepared: 'listening', finishing: 'taking-over' },
};

export function currentPhase(role: JobRole, phase: string): string {
  return LEGACY_PHASES[role][phase] ?? phase;
}

/** What ends a phase when the peer is never heard from again. */
export type PhaseBound =
  /** The destination's lease: --incoming-timeout from the phase's start. */
  | { kind: 'lease'; why: string }
  /** The destination's stream watch: --incoming-timeout without a byte of the stream. */
  | { kind: 'stream-watch' }
  /** The source's: each Prepare2 call times out, retries on 503 are bounded. */
  | { kind: 'request-timeout' }
  /** The source's: the stream's progress timeout (progressTimeoutSeconds) cancels it. */
  | { kind: 'progress-timeout' }
  /**
   * The stream runs in postcopy: neither qemu is ever ended (the destination runs the guest, the
   * source holds the pages it lacks). A broken stream is recovered by the source, attempt after
   * attempt for postcopyRecoverySeconds, then on an operator's POST /jobs/{id}/recover.
   */
  | { kind: 'postcopy-recovery' }
  /** Nothing: only the peer (or an operator's resolution) may end it; the guest meanwhile stays safe. */
  | { kind: 'waits-for-peer' }
  /** The agent's own work, not the peer's: it ends as soon as the agent carries it out. */
  | { kind: 'local' };

export interface PhaseObligations {
  /**
   * Who may still decide how the job ends: `source` while the stream has not completed (the
   * source's copy is the guest), `destination` after it (resuming the source without the
   * destination's word could leave two running copies), `decided` once the outcome is fixed.
   */
  decides: 'source' | 'destination' | 'decided';
  /** What POST /jobs/{id}/cancel does (source jobs; a destination job is never cancelled there). */
  cancel: 'rolls-back' | 'refused';
  bound: PhaseBound;
  /** What recovery does with a job found in this phase after an agent restart (see each side's recover()). */
  restart: string;
  /** What settleCrash does when a throw escapes the job's handling in this phase. */
  crash: string;
}

// The texts of the restart and crash rules are docs/protocol.md's (its phase table, checked
// against these by a test). "Rolls back": any stream qemu still runs is cancelled, the destination
// is told (Finish2 rc!=0), and the guest runs again if it ran before the migration.
const ROLL_BACK = 'rolls back';
const ASK_AGAIN = 'asks the outcome again';
const END_EMPTY = 'ends the empty qemu';
const TERMINAL = 'nothing (terminal)';
// Once the switch to postcopy is asked, the destination's word decides: if its qemu switched, the guest
// ran there and neither copy is whole, so the job only goes forward, to the stream's end.
const FOLLOW_POSTCOPY = 'follows the postcopy to its end (a broken stream is recovered), never ends either qemu';

export const SOURCE_OBLIGATIONS: Record<SourcePhase, PhaseObligations> = {
  preparing: { decides: 'source', cancel: 'rolls-back', bound: { kind: 'request-timeout' }, restart: ROLL_BACK, crash: ROLL_BACK },
  prepared: { decides: 'source', cancel: 'rolls-back', bound: { kind: 'progress-timeout' }, restart: ROLL_BACK, crash: ROLL_BACK },
  streaming: {
    decides: 'source', cancel: 'rolls-back', bound: { kind: 'progress-timeout' },
    restart: 'finishes as after the stream if qemu completed it and no cancel was answered; else rolls back',
    crash: ROLL_BACK,
  },
  postcopy: { decides: 'destination', cancel: 'refused', bound: { kind: 'postcopy-recovery' }, restart: FOLLOW_POSTCOPY, crash: FOLLOW_POSTCOPY },
  'stream-completed': { decides: 'destination', cancel: 'refused', bound: { kind: 'waits-for-peer' }, restart: ASK_AGAIN, crash: ASK_AGAIN },
  'asking-outcome': { decides: 'destination', cancel: 'refused', bound: { kind: 'waits-for-peer' }, restart: ASK_AGAIN, crash: ASK_AGAIN },
  confirmed: { decides: 'decided', cancel: 'refused', bound: { kind: 'local' }, restart: 'ends the source copy', crash: 'ends the source copy' },
  'rolling-back': { decides: 'decided', cancel: 'refused', bound: { kind: 'local' }, restart: 'finishes the rollback', crash: 'finishes the rollback' },
  done: { decides: 'decided', cancel: 'refused', bound: { kind: 'local' }, restart: TERMINAL, crash: TERMINAL },
};

export const DESTINATION_OBLIGATIONS: Record<DestinationPhase, PhaseObligations> = {
  'starting-incoming': { decides: 'source', cancel: 'refused', bound: { kind: 'local' }, restart: END_EMPTY, crash: END_EMPTY },
  listening: { decides: 'source', cancel: 'refused', bound: { kind: 'lease', why: 'no stream started' }, restart: 'waits under a fresh lease', crash: END_EMPTY },
  receiving: {
    decides: 'source', cancel: 'refused', bound: { kind: 'stream-watch' },
    restart: 'takes the stream\'s end if qemu saw it, else watches again', crash: END_EMPTY,
  },
  received: { decides: 'source', cancel: 'refused', bound: { kind: 'lease', why: 'no Finish2 after the stream ended' }, restart: 'waits under a fresh lease', crash: END_EMPTY },
  'postcopy-active': { decides: 'decided', cancel: 'refused', bound: { kind: 'postcopy-recovery' }, restart: FOLLOW_POSTCOPY, crash: FOLLOW_POSTCOPY },
  'taking-over': { decides: 'decided', cancel: 'refused', bound: { kind: 'local' }, restart: 'completes the hand-over', crash: 'completes the hand-over' },
  aborting: { decides: 'decided', cancel: 'refused', bound: { kind: 'local' }, restart: END_EMPTY, crash: END_EMPTY },
  done: { decides: 'decided', cancel: 'refused', bound: { kind: 'local' }, restart: TERMINAL, crash: TERMINAL },
};

const SOURCE_NEXT: Record<SourcePhase, readonly SourcePhase[]> = {
  preparing: ['prepared', 'rolling-back'],
  prepared: ['streaming', 'rolling-back'],
  streaming: ['stream-completed', 'rolling-back', 'postcopy'],
  // The stream's end, then the destination's word: it owns the guest (confirmed), it never ran it
  // (the switch did not reach it: rolling-back, the copy here is whole), or it ran it and lost it (done, failed).
  postcopy: ['confirmed', 'rolling-back', 'done'],
  'stream-completed': ['asking-outcome'],
  'asking-outcome': ['confirmed', 'rolling-back'],
  confirmed: ['done'],
  'rolling-back': ['done'],
  done: [],
};

const DESTINATION_NEXT: Record<DestinationPhase, readonly DestinationPhase[]> = {
  'starting-incoming': ['listening', 'aborting'],
  listening: ['receiving', 'received', 'postcopy-active', 'taking-over', 'aborting'],
  receiving: ['received', 'postcopy-active', 'taking-over', 'aborting'],
  received: ['taking-over', 'aborting'],
  // The guest runs here: the job ends with the stream (completed), or when its qemu is gone (failed: the guest is lost).
  'postcopy-active': ['done'],
  'taking-over': ['done', 'aborting'],
  aborting: ['done'],
  done: [],
};

export function canMove(role: JobRole, from: Phase, to: Phase): boolean {
  const table = (role === 'source' ? SOURCE_NEXT : DESTINATION_NEXT) as Record<string, readonly string[]>;
  return table[from]?.includes(to) ?? false;
}

/** The obligations of a job's phase, by its role. */
export function obligationsOf(role: JobRole, phase: Phase): PhaseObligations {
  const table = (role === 'source' ? SOURCE_OBLIGATIONS : DESTINATION_OBLIGATIONS) as Record<string, PhaseObligations>;
  const o = table[phase];
  if (!o) throw new Error(`phase ${phase} is not a ${role} phase`);
  return o;
}

/** For an exhaustive switch over a role's phases: a phase without a case fails to compile here. */
export function unhandledPhase(phase: never): never {
  throw new Error(`no rule for phase ${String(phase)}`);
}
