// Postcopy against real qemu: the switch by the convergence policy (asked for, and by default on
// a slow link) and by a caller, a broken stream recovered by the agents themselves, and the
// refusals before any stream starts. The agents run qemu as they do by default, each as a user
// of its own: qemu 7.2 takes the pages a postcopy lacks through userfaultfd, which this kernel
// refuses to an unprivileged process while vm.unprivileged_userfaultfd is 0, so a receiving qemu
// is handed /dev/userfaultfd (src/qemu/userfaultfd.ts; README, Postcopy).
import { promises as fs } from 'node:fs';
import t from 'tap';
import { parseSerialLog } from '../../src/guest/image.js';
import { resetOutgoingStream, streamAddressOf } from '../../src/migration/stream-sockets.js';
import { assertOwnedBy, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';
import { waitFor, waitForJobEnd, type TestAgent } from '../helpers/agents.js';
import type { JobRecord } from '../../src/migration/jobs.js';
import type { MigrationOptions } from '../../src/migration/params.js';
import type { Test } from 'tap';

/** All of its 4 MiB rewritten continuously: no pre-copy over a few MiB/s converges. */
const BUSY = { fillMiB: 4, hotMiB: 4, reportEvery: 64 };

/**
 * A migration of `domain` from a to b at 2 MiB/s, switched to postcopy by a caller as soon as it
 * streams: most of the guest's memory still follows, for several seconds. The source job once qemu
 * reports postcopy-active.
 */
async function switchedAtOnce(a: TestAgent, b: TestAgent, domain: string, options: Partial<MigrationOptions> = {}): Promise<JobRecord> {
  const { job } = await a.client.perform({ domain, destination: b.url, bandwidthMiBps: 2, allowPostcopy: true, completionTimeoutPerGiBSeconds: 0, ...options });
  await waitFor('the stream to run', async () => ((await a.client.job(job.id)).phase === 'streaming' ? true : null), { timeoutMs: 30_000 });
  await a.client.complete(job.id, 'postcopy');
  return waitFor('postcopy', async () => {
    const j = await a.client.job(job.id);
    return j.stats?.qemuStatus === 'postcopy-active' ? j : null;
  }, { timeoutMs: 10_000 });
}

/** The guest arrived whole: its job completed on b too, b alone runs it, the same boot, never rebooted. */
async function assertArrivedWhole(t: Test, a: TestAgent, b: TestAgent, job: JobRecord, guest: { serialLog: string }, boot: { passes: number; bootId: number }): Promise<void> {
  t.equal(b.app.agent.migrations.jobs.require(job.id).record.status, 'completed', 'the destination job completed');
  await assertOwnedBy(t, b, a, job.domain);
  t.equal((await waitForPasses(b, job.domain, boot.passes)).bootId, boot.bootId, 'same guest, running on the destination');
  t.equal(parseSerialLog(await fs.readFile(guest.serialLog, 'utf8')).boots.length, 1, 'never rebooted');
}


t.test('with allowPostcopy a guest that never converges switches to postcopy once the downtime schedule is spent, and runs on at the destination', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { guest, boot } = await startGuest(a, dir, 'pc1', BUSY);
  const { job } = await a.client.perform({ domain: 'pc1', destination: b.url, bandwidthMiBps: 4, maxDowntimeMs: 300, allowPostcopy: true }, true);
  t.equal(job.status, 'completed', `completed (${job.error?.message ?? ''})`);
  t.same(job.transport, { multifd: false, channels: 1, compression: 'none', postcopy: true }, 'one plain stream: qemu 7.2 has no multifd postcopy');
  t.equal(job.options.deadlineAction, 'postcopy', 'allowPostcopy makes postcopy the deadline action');
  t.equal(job.stats?.convergence?.step, 'postcopy', 'the policy switched');
  t.equal(job.stats?.convergence?.autoConverge, 'held', 'the guest was never throttled: postcopy came instead');
  t.ok(job.phaseHistory.some((p) => p.phase === 'postcopy'), 'the source passed through phase postcopy');
  t.ok(job.timings.postcopyMs! > 0, `${job.timings.postcopyMs} ms in postcopy`);
  t.ok(job.timings.qemuDowntimeMs! >= 0 && job.timings.qemuDowntimeMs! < 1000, `qemu's downtime ${job.timings.qemuDowntimeMs} ms`);
  t.ok(b.app.agent.migrations.jobs.require(job.id).record.phaseHistory.some((p) => p.phase === 'postcopy-active'), 'the destination ran the guest in postcopy-active');
  await assertArrivedWhole(t, a, b, job, guest, boot);
  await b.client.lifecycle('pc1', 'destroy');
});

t.test('by default, over a slow link, a guest that never converges switches to postcopy too, its qemus running as users of their own', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  t.match((await b.client.host()).postcopy, { receives: true }, 'the destination says it receives postcopy');
  const { guest, boot } = await startGuest(a, dir, 'pc6', BUSY);
  const { job } = await a.client.perform({ domain: 'pc6', destination: b.url, bandwidthMiBps: 4, maxDowntimeMs: 300 }, true);
  t.equal(job.status, 'completed', `completed (${job.error?.message ?? ''})`);
  t.notOk('allowPostcopy' in job.options, 'nothing asked of postcopy');
  t.same(job.transport, { multifd: false, channels: 1, compression: 'none', postcopy: true }, 'under 512 MiB/s one plain stream, postcopy armed');
  t.equal(job.stats?.convergence?.step, 'postcopy', 'the policy switched');
  t.ok(job.phaseHistory.some((p) => p.phase === 'postcopy'), 'the source passed through phase postcopy');
  const qemuUser = (await b.client.host()).qemuUser;
  t.match(qemuUser, /user of its own/, `the destination's qemu is unprivileged (${qemuUser})`);
  await assertArrivedWhole(t, a, b, job, guest, boot);
  await b.client.lifecycle('pc6', 'destroy');
});

t.test('a caller completes a stream by postcopy (POST /jobs/{id}/complete); from then it cannot be cancelled', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'pc2', BUSY);
  const { job: started } = await a.client.perform({ domain: 'pc2', destination: b.url, bandwidthMiBps: 4, allowPostcopy: true, completionTimeoutPerGiBSeconds: 0 });
  await waitFor('the stream to run', async () => ((await a.client.job(started.id)).phase === 'streaming' ? true : null), { timeoutMs: 30_000 });
  const asked = await a.client.complete(started.id);
  t.equal(asked.completeRequested?.mode, 'postcopy', 'postcopy is the default mode where allowed');
  await waitFor('the switch', async () => ((await a.client.job(started.id)).phase !== 'streaming' ? true : null), { timeoutMs: 10_000 });
  await t.rejects(a.client.cancel(started.id), { status: 409, code: 'too_late_to_cancel' }, 'a cancel after the switch is refused');
  if ((await a.client.job(started.id)).status === 'running') {
    await t.rejects(b.client.lifecycle('pc2', 'destroy'), { status: 409, code: 'domain_busy' }, 'the destination refuses to end a qemu that still pulls pages');
  }
  const job = await waitForJobEnd(a.client, started.id, 'the migration', 60_000);
  t.equal(job.status, 'completed', `completed (${job.error?.message ?? ''})`);
  t.ok(job.phaseHistory.some((p) => p.phase === 'postcopy'));
  await assertOwnedBy(t, b, a, 'pc2');
  t.equal((await waitForPasses(b, 'pc2', boot.passes)).bootId, boot.bootId, 'same guest, running on the destination');
  await b.client.lifecycle('pc2', 'destroy');
});

t.test('a postcopy stream whose connection is reset is recovered by the agents, and completes', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { guest, boot } = await startGuest(a, dir, 'pc3', BUSY);
  const started = await switchedAtOnce(a, b, 'pc3');
  const { host, port } = streamAddressOf(started.uri!);
  await resetOutgoingStream(host, port);
  const broken = await waitFor('the break to be seen', async () => {
    const j = await a.client.job(started.id);
    return (j.stats?.postcopy?.recoveries ?? 0) >= 1 || j.status !== 'running' ? j : null;
  }, { timeoutMs: 30_000 });
  t.equal(broken.status === 'running' || broken.status === 'completed', true, `the job goes on (${broken.status})`);
  const job = await waitForJobEnd(a.client, started.id, 'the migration', 90_000);
  t.equal(job.status, 'completed', `completed (${job.error?.message ?? ''})`);
  t.ok(job.stats!.postcopy!.recoveries >= 1, `${job.stats!.postcopy!.recoveries} recovery`);
  await assertArrivedWhole(t, a, b, job, guest, boot);
  await b.client.lifecycle('pc3', 'destroy');
});

t.test('refused before any stream: postcopy with multifd, deadline postcopy without allowPostcopy, complete by postcopy on a stream without it', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await startGuest(a, dir, 'pc4', BUSY);
  for (const [body, why] of [
    [{ allowPostcopy: true, multifdChannels: 2 }, 'multifd'],
    [{ allowPostcopy: true, compression: 'zstd' as const }, 'compression'],
    [{ deadlineAction: 'postcopy' as const }, 'no allowPostcopy'],
  ] as const) {
    await t.rejects(a.client.perform({ domain: 'pc4', destination: b.url, ...body }), { status: 400, code: 'conflicting_options' }, why);
  }
  const { job: started } = await a.client.perform({ domain: 'pc4', destination: b.url, bandwidthMiBps: 4, completionTimeoutPerGiBSeconds: 0, allowPostcopy: false });
  await t.rejects(a.client.complete(started.id, 'postcopy'), { status: 409, code: 'postcopy_not_allowed' });
  // Pause and finish instead: the guest pauses, the rest copies, it runs on at the destination.
  await a.client.complete(started.id, 'pause');
  const job = await waitForJobEnd(a.client, started.id, 'the migration', 60_000);
  t.equal(job.status, 'completed', `completed by pausing (${job.error?.message ?? ''})`);
  t.equal(job.stats?.convergence?.step, 'paused');
  t.notOk(job.phaseHistory.some((p) => p.phase === 'postcopy'), 'never in postcopy');
  await assertOwnedBy(t, b, a, 'pc4');
  await b.client.lifecycle('pc4', 'destroy');
});

t.test('a destination that receives no postcopy (--no-postcopy) refuses it in Prepare2 (409 postcopy_unavailable); by default the stream then runs without it', async (t) => {
  const { dir, a, b } = await twoAgents(t, { b: { refusePostcopy: true } });
  t.same((await b.client.host()).postcopy?.receives, false, 'the destination says it receives none');
  const { boot } = await startGuest(a, dir, 'pc5', BUSY);
  const { job } = await a.client.perform({ domain: 'pc5', destination: b.url, allowPostcopy: true }, true);
  t.equal(job.status, 'failed');
  t.equal(job.error?.code, 'postcopy_unavailable');
  t.match(job.error?.message, /--no-postcopy/, 'says why');
  t.notOk(job.phaseHistory.some((p) => p.phase === 'streaming'), 'refused before any stream');
  await assertOwnedBy(t, a, b, 'pc5');
  t.equal((await waitForPasses(a, 'pc5', boot.passes)).bootId, boot.bootId, 'same guest, running on the source');
  const { job: started } = await a.client.perform({ domain: 'pc5', destination: b.url, bandwidthMiBps: 4, completionTimeoutPerGiBSeconds: 0 });
  const streaming = await waitFor('the stream to run', async () => {
    const j = await a.client.job(started.id);
    return j.phase === 'streaming' ? j : null;
  }, { timeoutMs: 30_000 });
  t.same(streaming.transport, { multifd: false, channels: 1, compression: 'none', postcopy: false }, 'offered, and answered without it');
  await t.rejects(a.client.complete(started.id, 'postcopy'), { status: 409, code: 'postcopy_not_allowed' });
  await a.client.cancel(started.id);
  const cancelled = await waitForJobEnd(a.client, started.id, 'the cancel', 30_000);
  t.equal(cancelled.status, 'cancelled');
  await assertOwnedBy(t, a, b, 'pc5');
  await a.client.lifecycle('pc5', 'destroy');
});

t.test("the destination's qemu killed in postcopy: the guest is lost; both jobs fail and say so, and the source's copy is kept, never resumed", async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await startGuest(a, dir, 'pc7', BUSY);
  const started = await switchedAtOnce(a, b, 'pc7');
  process.kill(b.app.agent.domains.find('pc7')!.run!.record.pid, 'SIGKILL');
  const job = await waitFor('the source job to end', async () => {
    const j = await a.client.job(started.id);
    t.comment(`${j.phase} ${j.stats?.qemuStatus} ${JSON.stringify(j.stats?.postcopy)} ${j.waiting ?? ''}`);
    return j.status !== 'running' ? j : null;
  }, { timeoutMs: 60_000, intervalMs: 1000 });
  t.equal(job.status, 'failed');
  t.match(job.error, { code: 'postcopy_failed', message: /out of date/ });
  t.equal(b.app.agent.migrations.jobs.require(job.id).record.status, 'failed', 'the destination job failed too');
  const left = await a.client.domain('pc7');
  t.ok(left.pid !== undefined && left.state !== 'running', `the source copy is kept, not running (${left.state}, qemu ${left.qemuStatus})`);
  await a.client.lifecycle('pc7', 'destroy');
});

t.test('a broken postcopy stream whose destination agent is gone: recovery gives up at its bound, and an operator gives the guest up (resolve aborted); the copy here is kept, never resumed', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await startGuest(a, dir, 'pc8', BUSY);
  const started = await switchedAtOnce(a, b, 'pc8', { postcopyRecoverySeconds: 2 });
  // The destination's agent goes away (its qemu stays), then the stream breaks: nobody answers /recover2.
  await b.app.close();
  const { host, port } = streamAddressOf(started.uri!);
  await resetOutgoingStream(host, port);
  const gaveUp = await waitFor('recovery to give up', async () => {
    const j = await a.client.job(started.id);
    return j.stats?.postcopy?.gaveUp ? j : null;
  }, { timeoutMs: 30_000 });
  t.match(gaveUp, { status: 'running', phase: 'postcopy', waiting: /recovery gave up after \d+ attempt.*POST \/jobs\/.*\/recover/s }, 'the operator is told');
  t.ok(gaveUp.stats!.postcopy!.attempts >= 1, `${gaveUp.stats!.postcopy!.attempts} attempts`);
  await t.rejects(a.client.resolve(started.id, 'finished', 'x'), { status: 409, code: 'not_waiting_on_destination' }, 'finished is refused: the stream did not complete');
  await a.client.resolve(started.id, 'aborted', 'hostB is gone');
  const job = await waitForJobEnd(a.client, started.id, 'the job', 30_000);
  t.match(job, { status: 'failed', error: { code: 'operator_aborted' } });
  const left = await a.client.domain('pc8');
  t.ok(left.pid !== undefined && left.state !== 'running', `the copy here is kept, not running (${left.state})`);
  await a.client.lifecycle('pc8', 'destroy');
});
