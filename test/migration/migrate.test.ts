import t from 'tap';
import { processMatches } from '../../src/qemu/process.js';
import { portIsFree } from '../../src/migration/ports.js';
import { testGuest, waitFor } from '../helpers/agents.js';
import { assertOwnedBy, counters, sendPrepare2, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

t.test('migrate A -> B -> A repeatedly; the guest keeps running and never reboots', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'vm1');
  let last = boot.passes;
  let [from, to] = [a, b];
  for (let round = 1; round <= 4; round++) {
    const fromPid = from.app.agent.domains.get('vm1').run!.record;
    const { job } = await from.client.perform({ domain: 'vm1', destination: to.url }, true);
    t.equal(job.status, 'completed', `round ${round}: source job completed`);
    t.equal(job.role, 'source');
    // qemu's stream time of a stream that ran is never 0 (7.2 says 0 for a moment after `completed`);
    // its downtime, counted in whole milliseconds, may be 0 for this small guest.
    const { prepare2Ms, firstByteMs, streamEndToRunningMs, aroundStreamMs, qemuTotalMs } = job.timings;
    t.ok(qemuTotalMs! > 0 && job.timings.qemuDowntimeMs! >= 0, `round ${round}: qemu's stream time ${qemuTotalMs} ms and downtime ${job.timings.qemuDowntimeMs} ms recorded`);
    // The control plane's cost, step by step: request -> Prepare2 answered -> first byte -> ... -> running there.
    t.ok(prepare2Ms! > 0 && prepare2Ms! <= firstByteMs! && firstByteMs! < job.timings.totalMs!, `round ${round}: Prepare2 answered at ${prepare2Ms} ms, first byte at ${firstByteMs} ms`);
    t.ok(streamEndToRunningMs! >= 0 && streamEndToRunningMs! < job.timings.totalMs!, `round ${round}: stream end -> running there ${streamEndToRunningMs} ms`);
    t.equal(aroundStreamMs, job.timings.totalMs! - qemuTotalMs!, `round ${round}: ${aroundStreamMs} ms around the stream`);
    // The pause the guest saw runs from the source's STOP to the destination running: qemu's
    // downtime plus the agents' hand-over, never less than qemu's own figure.
    const { switchoverMs, qemuDowntimeMs, totalMs } = job.timings;
    t.ok(switchoverMs! + 1 >= (qemuDowntimeMs ?? 0) && switchoverMs! < totalMs!, `switch-over ${switchoverMs} ms >= qemu downtime ${qemuDowntimeMs} ms`);
    t.ok(job.stats && job.stats.transferredBytes > 0, 'bytes transferred recorded');
    const destJob = await to.client.job(job.id);
    t.equal(destJob.status, 'completed', `round ${round}: destination job completed`);
    t.equal(destJob.role, 'destination');
    t.equal(destJob.finish?.outcome, 'finished');
    // Resumed before its records were written and Finish2 answered; the source's switch-over counts to that moment.
    const resumedAt = destJob.role === 'destination' && destJob.resumedAt ? Date.parse(destJob.resumedAt) : NaN;
    t.ok(resumedAt >= Date.parse(destJob.createdAt) && resumedAt <= Date.parse(destJob.endedAt!), `round ${round}: the destination recorded when the guest resumed there`);

    t.notOk(processMatches(fromPid), 'source qemu ended');
    await assertOwnedBy(t, to, from, 'vm1');
    const now = await waitForPasses(to, 'vm1', last);
    t.equal(now.bootId, boot.bootId, `round ${round}: same boot id (no reboot)`);
    t.ok(now.passes > last, `round ${round}: pass counter went on (${last} -> ${now.passes})`);
    last = now.passes;
    const port = Number(job.uri!.split(':').pop());
    t.ok(await portIsFree(to.config.migrationAddress, port), 'incoming port released');
    const left = await from.client.domain('vm1');
    t.equal(left.state, 'shutoff');
    t.equal(left.reason, 'migrated', 'the source keeps the definition, shut off (migrated)');
    [from, to] = [to, from];
  }
  await from.client.lifecycle('vm1', 'destroy');
});

t.test('offline migration and paused arrival', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'vm2');

  const offline = await a.client.perform({ domain: 'vm2', destination: b.url, live: false }, true);
  t.equal(offline.job.status, 'completed', 'offline migration completed');
  await assertOwnedBy(t, b, a, 'vm2');
  const afterOffline = await waitForPasses(b, 'vm2', boot.passes);
  t.equal(afterOffline.bootId, boot.bootId);

  const paused = await b.client.perform({ domain: 'vm2', destination: a.url, paused: true, undefineSource: true }, true);
  t.equal(paused.job.status, 'completed');
  await assertOwnedBy(t, a, b, 'vm2', 'paused');
  const held = await counters(a, 'vm2');
  await new Promise((r) => setTimeout(r, 500));
  t.equal((await counters(a, 'vm2')).passes, held.passes, 'a paused arrival does not run');
  await t.rejects(b.client.domain('vm2'), { status: 404, code: 'domain_not_found' }, 'undefined on the source');
  await a.client.lifecycle('vm2', 'resume');
  const resumed = await waitForPasses(a, 'vm2', held.passes);
  t.equal(resumed.bootId, boot.bootId, 'resumed, same boot');
  await a.client.lifecycle('vm2', 'destroy');
});

t.test('a transient arrival (not persisted) vanishes when it stops', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const guest = await testGuest(dir, 'vm3');
  await a.client.define(guest.xml);
  await a.client.lifecycle('vm3', 'start');
  const { job } = await a.client.perform({ domain: 'vm3', destination: b.url, persistDestination: false }, true);
  t.equal(job.status, 'completed');
  const arrived = await b.client.domain('vm3');
  t.equal(arrived.persistent, false);
  await b.client.lifecycle('vm3', 'destroy');
  await t.rejects(b.client.domain('vm3'), { status: 404, code: 'domain_not_found' }, 'gone once stopped');
});

t.test('two guests migrate at once', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const names = ['vm4', 'vm5'];
  const boots = new Map<string, number>();
  for (const name of names) {
    await a.client.define((await testGuest(dir, name)).xml);
    await a.client.lifecycle(name, 'start');
    boots.set(name, (await waitForPasses(a, name, 0)).bootId);
  }
  const results = await Promise.all(names.map((domain) => a.client.perform({ domain, destination: b.url }, true)));
  const ports = new Set<string>();
  for (const [i, { job }] of results.entries()) {
    t.equal(job.status, 'completed', `${names[i]} completed`);
    ports.add(job.uri!);
    await assertOwnedBy(t, b, a, names[i]!);
    t.equal((await waitForPasses(b, names[i]!, 0)).bootId, boots.get(names[i]!));
  }
  t.equal(ports.size, 2, 'each incoming stream had its own port');
  for (const name of names) await b.client.lifecycle(name, 'destroy');
});

t.test('steps are idempotent on the migration id; a second Perform of a migrating domain is refused', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const guest = await testGuest(dir, 'vm6', { fillMiB: 24, hotMiB: 1, reportEvery: 16 });
  await a.client.define(guest.xml);
  await a.client.lifecycle('vm6', 'start');
  await waitForPasses(a, 'vm6', 0); // RAM filled: the stream below takes seconds
  // A slow stream keeps the first migration running while the others are tried.
  const first = await a.client.perform({ domain: 'vm6', destination: b.url, migrationId: 'mig-idem-1', bandwidthMiBps: 8, downtimeLimitMs: 250 });
  const params = await waitFor('parameters set on the source qemu', async () => {
    const p = await a.app.agent.domains.get('vm6').run!.qmp.execute<Record<string, number>>('query-migrate-parameters');
    return p['max-bandwidth'] === 8 * 1024 * 1024 ? p : null;
  });
  t.equal(params['downtime-limit'], 250, 'downtime limit passed to qemu');
  const replay = await a.client.perform({ domain: 'vm6', destination: b.url, migrationId: 'mig-idem-1' });
  t.equal(replay.job.id, first.job.id, 'a replayed Perform returns the recorded job');
  await t.rejects(a.client.perform({ domain: 'vm6', destination: b.url }), { status: 409, code: 'domain_busy' }, 'second Perform refused');
  const incoming = await waitFor('destination job', async () => {
    const j = await b.client.job('mig-idem-1').catch(() => null);
    return j?.uri ? j : null;
  });
  const replayPrepare = await sendPrepare2(b, 'mig-idem-1', guest.xml, { hostUuid: (await a.client.host()).uuid });
  t.equal(replayPrepare.uri, incoming.uri, 'a replayed Prepare2 answers the recorded URI and starts no second qemu');
  await t.rejects(a.client.lifecycle('vm6', 'destroy'), { status: 409, code: 'domain_busy' }, 'destroy refused while migrating');
  const ended = await a.client.call<{ job: { status: string; id: string } }>('POST', '/perform?wait=true', { domain: 'vm6', destination: b.url, migrationId: 'mig-idem-1' });
  t.equal(ended.job.status, 'completed');
  const { finishToken } = replayPrepare;
  t.equal(finishToken, a.app.agent.migrations.jobs.get('mig-idem-1')!.record.finishToken, 'the replayed answer carries the same finishToken');
  const finishAgain = await b.client.call<{ outcome: string }>('POST', '/finish2', { migrationId: 'mig-idem-1', rc: 0, finishToken });
  t.equal(finishAgain.outcome, 'finished', 'a replayed Finish2 returns the recorded outcome');
  const abortLate = await b.client.call<{ outcome: string }>('POST', '/finish2', { migrationId: 'mig-idem-1', rc: 1, finishToken });
  t.equal(abortLate.outcome, 'finished', 'a late rc!=0 does not undo a finished migration');
  await assertOwnedBy(t, b, a, 'vm6');
  await t.rejects(
    sendPrepare2(b, 'mig-idem-1', guest.xml, { hostUuid: (await a.client.host()).uuid }),
    { status: 409, code: 'migration_ended' },
    'a replayed Prepare2 of an ended migration starts nothing',
  );
  await b.client.lifecycle('vm6', 'destroy');
});

t.test('a migration to the same agent is refused', async (t) => {
  const { dir, a } = await twoAgents(t);
  const guest = await testGuest(dir, 'vm7');
  await a.client.define(guest.xml);
  await a.client.lifecycle('vm7', 'start');
  const { job } = await a.client.perform({ domain: 'vm7', destination: a.url }, true);
  t.equal(job.status, 'failed');
  t.equal(job.error?.code, 'same_host');
  t.equal((await a.client.domain('vm7')).state, 'running');
  await a.client.lifecycle('vm7', 'destroy');
});

t.test('a destination that would run the guest on another accelerator refuses it', async (t) => {
  const kvm = await (async () => {
    const { probeQemu } = await import('../../src/qemu/host.js');
    const { defaultQemuCredentials } = await import('../../src/agent/qemu-user.js');
    // Usable as the agents' qemu would use it: as a user of its own.
    return (await probeQemu(undefined, await defaultQemuCredentials())).kvmUsable;
  })();
  if (!kvm) {
    t.comment('no usable KVM here: only TCG, nothing to mismatch');
    t.pass('skipped without KVM');
    return;
  }
  const { dir, a, b } = await twoAgents(t, { a: { accel: 'kvm' }, b: { accel: 'tcg' } });
  await startGuest(a, dir, 'vm8');
  const { job } = await a.client.perform({ domain: 'vm8', destination: b.url }, true);
  t.equal(job.status, 'failed');
  t.equal(job.error?.code, 'accelerator_mismatch');
  await assertOwnedBy(t, a, b, 'vm8');
  await a.client.lifecycle('vm8', 'destroy');
});

t.test('a suspended guest arrives suspended', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'vm9');
  await a.client.lifecycle('vm9', 'suspend');
  const { job } = await a.client.perform({ domain: 'vm9', destination: b.url }, true);
  t.equal(job.status, 'completed');
  t.equal(job.options.paused, true, 'recorded as a paused arrival');
  await assertOwnedBy(t, b, a, 'vm9', 'paused');
  await b.client.lifecycle('vm9', 'resume');
  t.equal((await waitForPasses(b, 'vm9', boot.passes)).bootId, boot.bootId);
  await b.client.lifecycle('vm9', 'destroy');
});
