import { promises as fs } from 'node:fs';
import path from 'node:path';

/**
 * Debug hold points (`--debug-hold POINT`), for fault-injection rigs: at a named protocol
 * point the agent writes `STATE_DIR/hold.POINT` and waits until that file is removed, so a
 * test can kill a process or cut a link at exactly that point. Unused in production.
 *   prepare2        destination, incoming qemu listening, before answering Prepare2
 *   before-migrate  source, Prepare2 answered, QMP set up and phase `streaming` written, before `migrate`
 *   before-postcopy source, phase `postcopy` written, before migrate-start-postcopy
 *   before-finish2  source, stream completed and phase `asking-outcome` written, before Finish2
 *   finish2         destination, Finish2(rc=0) accepted and phase `taking-over` written, before resuming
 */
export const HOLD_POINTS = ['prepare2', 'before-migrate', 'before-postcopy', 'before-finish2', 'finish2'] as const;
export type HoldPoint = (typeof HOLD_POINTS)[number];

const HOLD_LIMIT_MS = 10 * 60 * 1000;

export async function holdAt(point: HoldPoint, holds: readonly string[], stateDir: string, migrationId: string): Promise<void> {
  if (!holds.includes(point)) return;
  const marker = path.join(stateDir, `hold.${point}`);
  await fs.writeFile(marker, migrationId);
  const deadline = Date.now() + HOLD_LIMIT_MS;
  while (Date.now() < deadline) {
    try {
      await fs.access(marker);
    } catch {
      return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  await fs.rm(marker, { force: true });
}
