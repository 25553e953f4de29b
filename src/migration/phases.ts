/**
 * The phase model of a migration job, in one place for both roles. Each phase is written to
 * disk before the action it names is taken, so a restarted agent knows exactly how far a job
 * got and which way to drive it (forward to the destination owning the guest, or back to the
 * source keeping it).
 */
export const PROTOCOL_VERSIONS = [2] as const;

export type JobStatus = 'running' | 'completed' | 'failed' | 'cancelled';
export type JobRole = 'source' | 'destination';

export const SOURCE_PHASES = [
  'preparing', // Prepare2 is being sent to the destination
  'prepared', // the destination answered a URI; its qemu waits for the stream
  'streaming', // QMP migrate issued; the guest runs (live) while memory streams
  'stream-completed', // the stream completed; the source guest is paused (postmigrate)
  'finishing', // Finish2(rc=0) sent; outcome not yet known: the source stays paused
  'confirmed', // the destination owns the guest; the source qemu is being ended
  'rolling-back', // the stream failed or the destination aborted: Finish2(rc!=0), resume the source
  'done', // terminal
] as const;

export const DESTINATION_PHASES = [
  'preparing', // the incoming qemu is being started
  'prepared', // qemu listens (-incoming defer + migrate-incoming); the lease runs
  'receiving', // the stream is under way
  'received', // the stream completed; the guest is paused here, waiting for Finish2
  'finishing', // Finish2(rc=0) accepted: this host owns the guest; resuming it
  'aborting', // Finish2(rc!=0), a lease expiry or a failed stream: ending the empty qemu
  'done', // terminal
] as const;

export type SourcePhase = (typeof SOURCE_PHASES)[number];
export type DestinationPhase = (typeof DESTINATION_PHASES)[number];
export type Phase = SourcePhase | DestinationPhase;

const SOURCE_NEXT: Record<SourcePhase, readonly SourcePhase[]> = {
  preparing: ['prepared', 'rolling-back'],
  prepared: ['streaming', 'rolling-back'],
  streaming: ['stream-completed', 'rolling-back'],
  'stream-completed': ['finishing'],
  finishing: ['confirmed', 'rolling-back'],
  confirmed: ['done'],
  'rolling-back': ['done'],
  done: [],
};

const DESTINATION_NEXT: Record<DestinationPhase, readonly DestinationPhase[]> = {
  preparing: ['prepared', 'aborting'],
  prepared: ['receiving', 'received', 'finishing', 'aborting'],
  receiving: ['received', 'finishing', 'aborting'],
  received: ['finishing', 'aborting'],
  finishing: ['done', 'aborting'],
  aborting: ['done'],
  done: [],
};

export function canMove(role: JobRole, from: Phase, to: Phase): boolean {
  const table = (role === 'source' ? SOURCE_NEXT : DESTINATION_NEXT) as Record<string, readonly string[]>;
  return table[from]?.includes(to) ?? false;
}

/**
 * Source phases after which only the destination may decide the outcome: the stream completed,
 * so resuming the source without its word could leave two running copies.
 */
export const SOURCE_AWAITS_DESTINATION: readonly SourcePhase[] = ['stream-completed', 'finishing'];
