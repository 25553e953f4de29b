/** Resuming a guest right after its outgoing stream completed, on real qemu. */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { resumeAfterMigration } from '../../src/qemu/resume.js';
import { freePort, waitFor } from '../helpers/agents.js';
import { fullArgv, GuestTracker, launchSpec, tmpDir } from './helpers.js';

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

t.test('after a completed stream the disks come back only when the destination qemu is gone: waited out', async (t) => {
  const dir = await tmpDir(t);
  const disk = path.join(dir, 'disk.raw');
  await fs.writeFile(disk, Buffer.alloc(1024 * 1024));
  const drive = ['-drive', `file=${disk},format=raw,if=ide`];
  const srcDir = path.join(dir, 'src');
  const dstDir = path.join(dir, 'dst');
  await Promise.all([fs.mkdir(srcDir), fs.mkdir(dstDir)]);
  const src = await guests.launch(t, launchSpec(srcDir, [...fullArgv(srcDir), ...drive]));
  const dst = await guests.launch(t, launchSpec(dstDir, [...fullArgv(dstDir), ...drive, '-incoming', 'defer']));
  const port = await freePort('127.0.0.1');
  await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
  await src.qmp.execute('cont');
  const completed = src.qmp.waitForEvent('MIGRATION', { timeoutMs: 30_000, predicate: (e) => e.data?.status === 'completed' });
  await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
  await completed;
  await waitFor('incoming side complete', async () => (await dst.qmp.execute<{ status?: string }>('query-migrate')).status === 'completed');

  const reasons: string[] = [];
  const early = await resumeAfterMigration(src.qmp, 1500, (reason) => {
    reasons.push(reason);
  });
  t.match(early?.message, /lock/, 'the destination holds the disk: not resumed within the bound');
  t.match(reasons, [/another qemu still holds the disk images/], 'and it said why it waited');

  const resumed = resumeAfterMigration(src.qmp, 30_000);
  process.kill(dst.record.pid, 'SIGKILL');
  t.equal(await resumed, null, 'resumed once the destination qemu is gone');
  t.equal((await src.qmp.execute<{ status: string }>('query-status')).status, 'running');
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
