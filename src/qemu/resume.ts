import { QmpError, type QmpClient } from './qmp.js';

const RETRY_MS = 20;

/**
 * Run a guest again whose outgoing migration ended; the error if it could not be. Right after a
 * completed stream qemu stays in `finish-migrate` for a moment and refuses `cont` ("Migration is
 * not finalized yet") although it already sent the MIGRATION completed event, so wait that out.
 */
export async function resumeAfterMigration(qmp: QmpClient, timeoutMs: number): Promise<Error | null> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const { running, status } = await qmp.execute<{ running: boolean; status: string }>('query-status', {}, { timeoutMs: 5000 });
      if (running) return null;
      if (status !== 'finish-migrate') {
        await qmp.execute('cont');
        return null;
      }
    } catch (err) {
      const finalizing = err instanceof QmpError && err.errorClass === 'GenericError' && /not finalized/.test(err.desc);
      if (!finalizing) return err as Error;
    }
    if (Date.now() >= deadline) return new Error(`qemu did not leave finish-migrate within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}
