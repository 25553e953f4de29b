import { randomUUID } from 'node:crypto';
import t from 'tap';
import { processMatches } from '../../src/qemu/process.js';
import type { Job, JobRecord } from '../../src/migration/jobs.js';
import type { Phase } from '../../src/migration/phases.js';
import { freePort, qemuRecords, startAgent, testGuest, tmpDir, waitFor } from '../helpers/agents.js';
import { assertOwnedBy, sendPrepare2, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

// Faults injected where a job's own handling does not expect them: a throw inside the job run or
// its clean-up (a bug, a failed write). The job must still end by the rule of its phase.

t.test('a throw while rolling back before the stream: the job ends failed (internal), the guest runs on, the domain is usable', async (t) => {
  const dir = await tmpDir(t);
  const a = await startAgent(t, dir, 'a');
  const { boot } = await startGuest(a, dir, 'vm1');
  const jobs = a.app.agent.migrations.jobs;
  const realSetPhase = jobs.setPhase.bind(jobs);
  let thrown = 0;
  jobs.setPhase = async (job: Job, phase: Phase, patch?: Partial<JobRecord>, via?: readonly Phase[]) => {
    if (phase === 'rolling-back' && thrown++ === 0) throw new Error('injected: the rollback crashed');
    return realSetPhase(job, phase, patch, via);
  };
  // Nobody listens there: Prepare2 fails, and the rollback that follows throws once.
  const nobody = `http://127.0.0.1:${await freePort('127.0.0.1')}`;
  const { job } = await a.client.perform({ domain: 'vm1', destination: nobody });
  const ended = await jobs.waitForEnd(jobs.require(job.id), 30_000);
  t.equal(ended.status, 'failed', 'the job ended');
  t.equal(ended.error?.code, 'internal', 'with the crash recorded');
  t.match(ended.error?.message, /injected: the rollback crashed/);
  t.equal(thrown, 2, 'the rollback was carried out again after the throw');
  t.notOk(a.app.agent.domains.find('vm1')?.activeJob, "the domain's claim is released");
  t.equal((await a.client.lifecycle('vm1', 'suspend')).state, 'paused', 'lifecycle works again');
  t.equal((await a.client.lifecycle('vm1', 'resume')).state, 'running');
  t.equal((await waitForPasses(a, 'vm1', boot.passes)).bootId, boot.bootId, 'the same guest runs on');
  t.equal((await qemuRecords(a.config.stateDir)).filter(processMatches).length, 1, 'one qemu');
  await a.client.lifecycle('vm1', 'destroy');
});

t.test('a throw after the destination took the guest: the source does not resume it, and ends its copy on the next attempt', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'vm2');
  const domains = a.app.agent.domains;
  const realStop = domains.stopQemu.bind(domains);
  let thrown = 0;
  let statusAtRetry: string | undefined;
  domains.stopQemu = async (...args: Parameters<typeof realStop>) => {
    if (thrown++ === 0) throw new Error('injected: ending the source copy crashed');
    statusAtRetry = (await args[0].run!.qmp.execute<{ status: string }>('query-status')).status;
    return realStop(...args);
  };
  const { job } = await a.client.perform({ domain: 'vm2', destination: b.url });
  const jobs = a.app.agent.migrations.jobs;
  const ended = await jobs.waitForEnd(jobs.require(job.id), 60_000);
  t.equal(ended.status, 'completed', 'the destination owns the guest: the job completes');
  t.equal(thrown, 2, 'the source copy was ended on the second attempt');
  t.equal(statusAtRetry, 'postmigrate', 'it stayed paused until then');
  await assertOwnedBy(t, b, a, 'vm2');
  t.equal((await waitForPasses(b, 'vm2', boot.passes)).bootId, boot.bootId, 'the same guest, on the destination');
  await b.client.lifecycle('vm2', 'destroy');
});

t.test('a throw while the destination ends an expired arrival: the empty qemu is ended all the same', async (t) => {
  const dir = await tmpDir(t);
  const b = await startAgent(t, dir, 'b', { incomingTimeoutSeconds: 1 });
  const guest = await testGuest(dir, 'vm3');
  const domains = b.app.agent.domains;
  const realStop = domains.stopQemu.bind(domains);
  let thrown = 0;
  domains.stopQemu = async (...args: Parameters<typeof realStop>) => {
    if (thrown++ === 0) throw new Error('injected: ending the incoming qemu crashed');
    return realStop(...args);
  };
  // A source that prepares and never streams: the lease ends the arrival, and that throws once.
  await sendPrepare2(b, 'crash-lease', guest.xml, { hostUuid: randomUUID() });
  const run = domains.find('vm3')!.run!;
  const jobs = b.app.agent.migrations.jobs;
  const ended = await jobs.waitForEnd(jobs.require('crash-lease'), 30_000);
  t.equal(ended.status, 'failed', 'the job ended');
  t.equal(ended.error?.code, 'internal');
  await waitFor('the incoming qemu ended', () => !processMatches(run.record));
  t.notOk(domains.find('vm3'), 'the transient arrival is gone');
  t.same((await qemuRecords(b.config.stateDir)).filter(processMatches), [], 'no qemu left');
});
