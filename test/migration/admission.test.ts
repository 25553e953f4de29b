import t from 'tap';
import { AgentHttpError } from '../../src/client.js';
import { TEST_TOKEN, testGuest } from '../helpers/agents.js';
import { assertOwnedBy, twoAgents, waitForPasses } from '../helpers/migration.js';

t.test('admission: beyond --max-incoming the destination answers 503 + Retry-After and the source retries', async (t) => {
  const { dir, a, b } = await twoAgents(t, { b: { maxIncoming: 1 } });
  for (const name of ['vm1', 'vm2']) {
    await a.client.define((await testGuest(dir, name, { fillMiB: 24, hotMiB: 1, reportEvery: 16 })).xml);
    await a.client.lifecycle(name, 'start');
    await waitForPasses(a, name, 0);
  }
  // The first stream is slowed so the second Prepare2 meets a full destination.
  const first = await a.client.perform({ domain: 'vm1', destination: b.url, bandwidthMiBps: 8 });
  const second = await a.client.perform({ domain: 'vm2', destination: b.url });
  // Whichever Prepare2 came second met a full destination and waits, saying so.
  const waiting = await (async () => {
    for (let i = 0; i < 200; i++) {
      for (const id of [first.job.id, second.job.id]) {
        const j = await a.client.job(id);
        if (j.waiting) return j.waiting;
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    return '';
  })();
  t.match(waiting, /destination busy/, 'the source says it waits for the destination');
  const jobs = a.app.agent.migrations.jobs;
  const [r1, r2] = await Promise.all([
    jobs.waitForEnd(jobs.require(first.job.id), 120_000),
    jobs.waitForEnd(jobs.require(second.job.id), 120_000),
  ]);
  t.equal(r1.status, 'completed');
  t.equal(r2.status, 'completed', 'the queued migration went through once there was room');
  await assertOwnedBy(t, b, a, 'vm1');
  await assertOwnedBy(t, b, a, 'vm2');
  for (const name of ['vm1', 'vm2']) await b.client.lifecycle(name, 'destroy');
});

t.test('admission: beyond --max-outgoing Perform answers 503 with Retry-After', async (t) => {
  const { dir, a, b } = await twoAgents(t, { a: { maxOutgoing: 1 } });
  for (const name of ['vm3', 'vm4']) {
    await a.client.define((await testGuest(dir, name)).xml);
    await a.client.lifecycle(name, 'start');
  }
  const first = await a.client.perform({ domain: 'vm3', destination: b.url, bandwidthMiBps: 8 });
  const err = (await a.client.perform({ domain: 'vm4', destination: b.url }).catch((e: unknown) => e)) as AgentHttpError;
  t.equal(err.status, 503);
  t.equal(err.code, 'too_many_migrations');
  const res = await fetch(`${a.url}/perform`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${TEST_TOKEN}` },
    body: JSON.stringify({ domain: 'vm4', destination: b.url }),
  });
  t.equal(res.status, 503);
  t.ok(Number(res.headers.get('retry-after')) > 0, 'Retry-After header');
  await a.app.agent.migrations.jobs.waitForEnd(a.app.agent.migrations.jobs.require(first.job.id), 120_000);
  await b.client.lifecycle('vm3', 'destroy');
  await a.client.lifecycle('vm4', 'destroy');
});

t.test('races: concurrent Performs of one domain -> one wins, the other 409; destroy during migration refused', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await a.client.define((await testGuest(dir, 'vm5')).xml);
  await a.client.lifecycle('vm5', 'start');
  const results = await Promise.allSettled([
    a.client.perform({ domain: 'vm5', destination: b.url, bandwidthMiBps: 8 }),
    a.client.perform({ domain: 'vm5', destination: b.url, bandwidthMiBps: 8 }),
    a.client.lifecycle('vm5', 'destroy'),
  ]);
  const performs = results.slice(0, 2);
  const won = performs.filter((r) => r.status === 'fulfilled');
  const lost = performs.filter((r) => r.status === 'rejected') as PromiseRejectedResult[];
  t.equal(won.length + (results[2]!.status === 'fulfilled' ? 1 : 0), 1, 'exactly one operation won');
  for (const r of lost) t.equal((r.reason as AgentHttpError).status, 409);
  if (won.length === 1) {
    const { job } = (won[0] as PromiseFulfilledResult<{ job: { id: string } }>).value;
    t.equal((results[2] as PromiseRejectedResult).reason.status, 409, 'destroy refused while migrating');
    const ended = await a.app.agent.migrations.jobs.waitForEnd(a.app.agent.migrations.jobs.require(job.id), 120_000);
    t.equal(ended.status, 'completed');
    await assertOwnedBy(t, b, a, 'vm5');
    await b.client.lifecycle('vm5', 'destroy');
  } else {
    t.equal((await a.client.domain('vm5')).state, 'shutoff', 'destroy won: nothing migrated');
  }
});
