/** What `kvm-migrate` exits with; sysexits.h numbers for the usage and unreachable cases. */
export const EXIT = {
  ok: 0,
  /** The operation ran and failed (a failed migration, a refusal from the agent). */
  failed: 1,
  cancelled: 2,
  /** resolve: the decision is recorded, the agent still works on carrying it out. */
  inProgress: 3,
  usage: 64,
  /** The agent could not be reached at all. */
  unreachable: 69,
} as const;

export const EXIT_CODES_HELP = `Exit codes: 0 done, 1 the operation failed, 2 cancelled, 64 usage error, 69 agent unreachable.`;

/** A command line that cannot be acted on: exit 64, with the message naming the flag. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}
