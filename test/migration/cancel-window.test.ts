import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { readRecords } from '../../src/store/state-store.js';
import { waitFor, waitForJobEnd } from '../helpers/agents.js';
import { assertOwnedBy, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

t.test('a cancel answered between Prepare2 and migrate wins: the job ends cancelled, the guest stays', async (t) => {
  const { dir, a, b } = await twoAgents(t, { a: { debugHolds: ['before-migrate'] } });
  const { boot } = await startGuest(a, dir, 'vm1');
  const { job } = await a.client.perform({ domain: 'vm1', destination: b.url });
  const hold = path.join(a.config.stateDir, 'hold.before-migrate');
  await waitFor('source holding before migrate', () => fs.access(hold).then(() => true));
  const cancelled = await a.client.cancel(job.id);
  t.equal(cancelled.cancelRequested, true, 'answered 202 with the cancel recorded');
  const onDisk = (await readRecords(a.config.stateDir, 'jobs')).find((r) => r.id === job.id)?.value as { cancelRequested?: boolean } | undefined;
  t.equal(onDisk?.cancelRequested, true, 'written to the job record before the answer');
  await fs.rm(hold);
  const ended = await a.app.agent.migrations.jobs.waitForEnd(a.app.agent.migrations.jobs.require(job.id), 60_000);
  t.equal(ended.status, 'cancelled');
  t.equal(ended.error?.code, 'cancelled');
  const destJob = await waitForJobEnd(b.client, job.id, 'destination job ended');
  t.equal(destJob.status, 'cancelled', 'the destination learned it was cancelled');
  await assertOwnedBy(t, a, b, 'vm1');
  t.equal((await waitForPasses(a, 'vm1', boot.passes)).bootId, boot.bootId, 'same guest on the source');
  await a.client.lifecycle('vm1', 'destroy');
});
