import t from 'tap';
import type { MigrationInfo, MigrationMonitor } from '../../src/qemu/migration-monitor.js';
import { qemuFigures } from '../../src/migration/stream-follower.js';

/** A monitor whose query-migrate answers the given replies in turn, then the last one for ever. */
function monitorAnswering(replies: MigrationInfo[]): { monitor: MigrationMonitor; asked: () => number } {
  let asked = 0;
  const monitor = { queryMigrate: async () => replies[Math.min(asked++, replies.length - 1)] } as unknown as MigrationMonitor;
  return { monitor, asked: () => asked };
}

t.test("figures read before qemu computed them are asked again", async (t) => {
  const early: MigrationInfo = { status: 'completed', totalTimeMs: 0, downtimeMs: 0, setupTimeMs: 3 };
  const { monitor } = monitorAnswering([early, { status: 'completed', totalTimeMs: 420, downtimeMs: 12, setupTimeMs: 3 }]);
  t.same(await qemuFigures(monitor, early), { qemuTotalMs: 420, qemuDowntimeMs: 12, qemuSetupMs: 3 });
});

t.test('a downtime under a millisecond is recorded as qemu counts it, without waiting for more', async (t) => {
  const { monitor, asked } = monitorAnswering([]);
  t.same(await qemuFigures(monitor, { status: 'completed', totalTimeMs: 9, downtimeMs: 0 }), { qemuTotalMs: 9, qemuDowntimeMs: 0 });
  t.equal(asked(), 0, 'the total was there: qemu was not asked again');
});

t.test('figures qemu never computes are left out, never stored as 0', async (t) => {
  const zero: MigrationInfo = { status: 'completed', totalTimeMs: 0, downtimeMs: 0 };
  const { monitor, asked } = monitorAnswering([zero]);
  t.same(await qemuFigures(monitor, zero), {});
  t.ok(asked() > 1 && asked() <= 100, `asked again a bounded number of times (${asked()})`);
});

t.test('a stream no longer reported completed stops the asking', async (t) => {
  const zero: MigrationInfo = { status: 'completed', totalTimeMs: 0, downtimeMs: 0 };
  const { monitor, asked } = monitorAnswering([{ status: 'none' }]);
  t.same(await qemuFigures(monitor, zero), {});
  t.equal(asked(), 1);
});
