/** Job records are kept per domain up to --job-history; a Finish2 replay for a removed one is not mistaken for "never ran here". */
import t from 'tap';
import { readRecords } from '../../src/store/state-store.js';
import { startAgent, waitFor } from '../helpers/agents.js';
import { assertOwnedBy, startGuest, twoAgents } from '../helpers/migration.js';

t.test('ended jobs beyond --job-history are removed per domain, at job end and at start', async (t) => {
  const { dir, a, b } = await twoAgents(t, { a: { jobHistory: 2 }, b: { jobHistory: 2 } });
  await startGuest(a, dir, 'vm1');
  await startGuest(a, dir, 'vm2');
  const ids: string[] = [];
  for (const [from, to] of [[a, b], [b, a], [a, b]] as const) {
    const { job } = await from.client.perform({ domain: 'vm1', destination: to.url }, true);
    t.equal(job.status, 'completed');
    ids.push(job.id);
  }
  const { job: other } = await a.client.perform({ domain: 'vm2', destination: b.url }, true);
  t.equal(other.status, 'completed');

  for (const agent of [a, b]) {
    const vm1Jobs = (await agent.client.jobs()).filter((j) => j.domain === 'vm1').map((j) => j.id);
    t.same(vm1Jobs.sort(), ids.slice(1).sort(), `${agent.url}: the newest two of vm1's three jobs are kept`);
    t.ok((await agent.client.jobs()).some((j) => j.id === other.id), `${agent.url}: another domain's job is its own count`);
    await t.rejects(agent.client.job(ids[0]!), { status: 404, code: 'job_not_found' });
    // A destination prunes after it answered Finish2: its records on disk follow a moment later.
    const kept = [...ids.slice(1), other.id].sort();
    const readIds = async () => (await readRecords(agent.config.stateDir, 'jobs')).map((r) => r.id).sort();
    await waitFor(`${agent.url}: old job records removed`, async () => JSON.stringify(await readIds()) === JSON.stringify(kept), { timeoutMs: 5000 }).catch(() => undefined);
    t.same(await readIds(), kept, 'and so are the records on disk');
  }

  // Finish2 replayed for the removed job: b runs vm1, so "no such migration" would be a lie.
  const uuid = (await b.client.domain('vm1')).uuid;
  await t.rejects(b.client.call('POST', '/finish2', { migrationId: ids[0], rc: 0, uuid }), { status: 409, code: 'guest_active_here' });
  await t.rejects(b.client.call('POST', '/finish2', { migrationId: ids[0], rc: 0 }), { status: 404, code: 'migration_not_found' }, 'without the uuid');
  await t.rejects(a.client.call('POST', '/finish2', { migrationId: ids[0], rc: 0, uuid }), { status: 404, code: 'migration_not_found' }, 'where the guest does not run');
  await assertOwnedBy(t, b, a, 'vm1');

  // A restart with a smaller history prunes at start.
  await a.app.close();
  const a2 = await startAgent(t, dir, 'a', { listenHost: '127.0.0.2', migrationAddress: '127.0.0.2', jobHistory: 1 });
  t.same((await a2.client.jobs()).filter((j) => j.domain === 'vm1').map((j) => j.id), [ids[2]], 'one left for vm1 after the restart');
  t.same((await readRecords(a2.config.stateDir, 'jobs')).map((r) => r.id).sort(), [ids[2], other.id].sort());
  for (const name of ['vm1', 'vm2']) await b.client.lifecycle(name, 'destroy');
});
