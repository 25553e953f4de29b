/** Resuming a guest right after its outgoing stream completed, on real qemu. */
import t from 'tap';
import { resumeAfterMigration } from '../../src/qemu/resume.js';
import { GuestTracker, launchSpec, tmpDir } from './helpers.js';

const guests = new GuestTracker();

t.test('resume right at the MIGRATION completed event: waits out finish-migrate, the guest runs', async (t) => {
  const dir = await tmpDir(t);
  const { qmp } = await guests.launch(t, launchSpec(dir));
  await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await qmp.execute('cont');
  // qemu leaves finish-migrate a moment after the event, so some rounds start inside that window.
  const ROUNDS = 20;
  let insideWindow = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const completed = qmp.waitForEvent('MIGRATION', { timeoutMs: 30_000, predicate: (e) => e.data?.status === 'completed' });
    await qmp.execute('migrate', { uri: 'exec:cat >/dev/null' });
    await completed;
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status === 'finish-migrate') insideWindow++;
    t.equal(await resumeAfterMigration(qmp, 10_000), null, `round ${round}: resumed`);
    t.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running', `round ${round}: running`);
  }
  t.comment(`${insideWindow} of ${ROUNDS} rounds found qemu still in finish-migrate`);
});

t.test('a paused guest runs again, a running one is left alone, a dead one gives the error', async (t) => {
  const dir = await tmpDir(t);
  const { record, qmp } = await guests.launch(t, launchSpec(dir));
  t.equal(await resumeAfterMigration(qmp, 1000), null, 'paused (-S) -> resumed');
  t.equal((await qmp.execute<{ status: string }>('query-status')).status, 'running');
  t.equal(await resumeAfterMigration(qmp, 1000), null, 'already running');
  process.kill(record.pid, 'SIGKILL');
  await qmp.closed;
  const err = await resumeAfterMigration(qmp, 1000);
  t.type(err, Error, 'returned, not thrown');
  t.match(err?.message, /clos/i);
});

guests.checkNoneLeft(t);
