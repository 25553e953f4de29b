import t from 'tap';
import { waitFor } from '../helpers/agents.js';
import { assertOwnedBy, guestQmp, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

t.test("a running migration's bandwidth and downtime limit change live (PATCH /jobs/{id})", async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'vm1', { fillMiB: 64, hotMiB: 1, reportEvery: 16 });
  const source = guestQmp(a, 'vm1');
  // At 1 MiB/s the 64 MiB guest would stream for a minute.
  const { job } = await a.client.perform({ domain: 'vm1', destination: b.url, bandwidthMiBps: 1 });
  await waitFor('the stream under way', async () => (await a.client.job(job.id)).stats?.qemuStatus === 'active', { timeoutMs: 30_000, intervalMs: 50 });

  const before = await waitFor('an ETA', async () => (await a.client.job(job.id)).stats?.etaMs, { timeoutMs: 10_000, intervalMs: 100 });
  t.ok(before > 10_000, `at 1 MiB/s the stream has ${before} ms left`);
  const tuned = await a.client.tune(job.id, { bandwidthMiBps: 4096, downtimeLimitMs: 750 });
  t.equal(tuned.options.bandwidthMiBps, 4096, 'the job keeps the new bandwidth');
  t.equal(tuned.options.downtimeLimitMs, 750, 'and the new downtime limit');
  const params = await source.execute<{ 'max-bandwidth': number; 'downtime-limit': number }>('query-migrate-parameters');
  t.equal(params['max-bandwidth'], 4096 * 1024 * 1024, "qemu's stream runs at the new bandwidth");
  t.equal(params['downtime-limit'], 750, 'with the new downtime limit');

  const ended = await waitFor('the job to end', async () => {
    const j = await a.client.job(job.id);
    return j.status === 'running' ? null : j;
  }, { timeoutMs: 30_000, intervalMs: 100 });
  t.equal(ended.status, 'completed', 'the stream finished at the new rate, long before the old one allowed');
  await t.rejects(a.client.tune(job.id, { bandwidthMiBps: 10 }), { status: 409, code: 'job_ended' }, 'an ended job is not tuned');
  await t.rejects(b.client.tune(job.id, { bandwidthMiBps: 10 }), { status: 409, code: 'not_tunable' }, 'nor the destination side');
  await t.rejects(a.client.tune(job.id, {}), { status: 400, code: 'invalid_request' }, 'an empty tuning is refused');
  await t.rejects(a.client.tune(job.id, { bandwidthMiBps: 0 }), { status: 400, code: 'invalid_request' }, 'as is a bandwidth below 1 MiB/s');

  await assertOwnedBy(t, b, a, 'vm1');
  t.equal((await waitForPasses(b, 'vm1', boot.passes)).bootId, boot.bootId, 'the same guest runs on the destination');
  await b.client.lifecycle('vm1', 'destroy');
});
