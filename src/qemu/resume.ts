import { setTimeout as sleep } from 'node:timers/promises';
import { QmpError, type QmpClient } from './qmp.js';

const RETRY_MS = 100;

/** Why `cont` cannot run the guest yet, for the errors that pass on their own; null for any other. */
function passingReason(err: unknown): string | null {
  if (!(err instanceof QmpError) || err.errorClass !== 'GenericError') return null;
  if (/not finalized/.test(err.desc)) return 'qemu is still finalizing the migration';
  // Another qemu (the destination's, on shared storage) still holds the images it took over.
  if (/Failed to get .*lock/.test(err.desc)) return `another qemu still holds the disk images (${err.desc})`;
  return null;
}

/**
 * Run a guest again whose outgoing migration ended; the error if it could not be within
 * `timeoutMs`. Two refusals of `cont` pass on their own and are waited out: right after a
 * completed stream qemu stays in `finish-migrate` for a moment ("Migration is not finalized
 * yet") although it already sent the MIGRATION completed event, and after a completed stream
 * the disks can be re-activated only once the destination's qemu, which took them over, is gone.
 * `onWait` hears why it waits, once per reason.
 */
export async function resumeAfterMigration(
  qmp: QmpClient,
  timeoutMs: number,
  onWait: (reason: string) => Promise<void> | void = () => undefined,
): Promise<Error | null> {
  const deadline = Date.now() + timeoutMs;
  let lastReason = '';
  for (;;) {
    try {
      const { running } = await qmp.execute<{ running: boolean }>('query-status', {}, { timeoutMs: 5000 });
      if (!running) await qmp.execute('cont');
      return null;
    } catch (err) {
      const reason = passingReason(err);
      if (!reason || Date.now() >= deadline) return err as Error;
      if (reason !== lastReason) await onWait(reason);
      lastReason = reason;
    }
    await sleep(RETRY_MS);
  }
}
