/**
 * The domain manager's claims: an arrival into a same-named, same-uuid inactive definition borrows
 * that entry for as long as the job runs, and a failed arrival gives the definition back.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { waitFor, waitForJobEnd } from '../helpers/agents.js';
import { assertOwnedBy, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

// A guest big enough that a bandwidth-limited stream takes a few seconds.
const SLOW_GUEST = { fillMiB: 24, hotMiB: 1, reportEvery: 16 };
const titled = (xml: string, title: string) => xml.replace(/(<name>[^<]*<\/name>)/, `$1<title>${title}</title>`);

t.test('a failed arrival into an inactive definition gives that definition back', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'vm1', SLOW_GUEST);
  // The same name and uuid (A gave the guest its uuid), another definition.
  await b.client.define(titled(await a.client.xml('vm1'), 'stale'));
  const { job } = await a.client.perform({ domain: 'vm1', destination: b.url, bandwidthMiBps: 4 });
  await waitFor('stream under way', async () => {
    const j = await a.client.job(job.id);
    return j.phase === 'streaming' && (j.stats?.transferredBytes ?? 0) > 1024 * 1024;
  });
  t.same(b.app.agent.domains.find('vm1')?.activeJob, { id: job.id, role: 'destination' }, 'the arrival claims the inactive definition');
  t.notMatch(await b.client.xml('vm1'), /<title>stale<\/title>/, 'which describes the arriving guest meanwhile');
  await t.rejects(b.client.lifecycle('vm1', 'start'), { status: 409, code: 'domain_busy' }, 'and cannot be started by hand');

  await a.client.cancel(job.id);
  const destJob = await waitForJobEnd(b.client, job.id, 'destination job ended');
  t.equal(destJob.status, 'cancelled');
  const entry = b.app.agent.domains.find('vm1');
  t.notOk(entry?.activeJob, 'the claim ended');
  t.equal(entry?.persistent, true, 'the domain is still defined on the destination');
  t.match(await b.client.xml('vm1'), /<title>stale<\/title>/, 'with its own definition given back');
  t.match(await fs.readFile(path.join(b.config.stateDir, 'domains', 'vm1.xml'), 'utf8'), /<title>stale<\/title>/, 'which is the one stored');
  await assertOwnedBy(t, a, b, 'vm1');
  t.equal((await waitForPasses(a, 'vm1', boot.passes)).bootId, boot.bootId, 'the guest kept running on the source');
  await a.client.lifecycle('vm1', 'destroy');
});
