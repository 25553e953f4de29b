// The convergence policy against real qemu: a guest that rewrites all of its memory faster than
// the stream carries it. The policy itself is tested without qemu in convergence.test.ts.
import { promises as fs } from 'node:fs';
import t from 'tap';
import { parseSerialLog } from '../../src/guest/image.js';
import { DEFAULT_OPTIONS } from '../../src/migration/params.js';
import { assertOwnedBy, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

/** All of its 4 MiB rewritten continuously (GiB/s under TCG): every iteration finds every page dirty again. */
const BUSY = { fillMiB: 4, hotMiB: 4, reportEvery: 64 };

t.test('a guest that dirties memory faster than the link completes under the default policy, with a bounded pause', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { guest, boot } = await startGuest(a, dir, 'busy1', BUSY);
  // 4 MiB dirty at 8 MiB/s needs ~500 ms of pause: more than qemu's 300 ms, within the schedule's 1000.
  const { job } = await a.client.perform({ domain: 'busy1', destination: b.url, bandwidthMiBps: 8 }, true);
  t.equal(job.status, 'completed', `completed (${job.error?.message ?? ''})`);
  t.equal(job.stats!.convergence!.step, 'downtime-raised', 'the downtime schedule was enough');
  t.ok(job.stats!.downtimeLimitMs! > 300 && job.stats!.downtimeLimitMs! <= DEFAULT_OPTIONS.maxDowntimeMs!, `downtime limit ${job.stats!.downtimeLimitMs} ms, within the default schedule`);
  // qemu's limit is an estimate from the last iteration's bandwidth; the bound leaves it 500 ms over.
  t.ok(job.timings.qemuDowntimeMs! > 0 && job.timings.qemuDowntimeMs! <= DEFAULT_OPTIONS.maxDowntimeMs! + 500, `qemu's downtime ${job.timings.qemuDowntimeMs} ms`);
  await assertOwnedBy(t, b, a, 'busy1');
  t.equal((await waitForPasses(b, 'busy1', boot.passes)).bootId, boot.bootId, 'same guest, running on the destination');
  t.equal(parseSerialLog(await fs.readFile(guest.serialLog, 'utf8')).boots.length, 1, 'never rebooted');
  await b.client.lifecycle('busy1', 'destroy');
});

t.test('deadline action abort: the stream is cancelled at the deadline (not_converging), the guest runs on at the source', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { boot } = await startGuest(a, dir, 'busy2', BUSY);
  // The throttle step first (no downtime schedule), as a dirty limit, which qemu refuses here:
  // this agent's guests never run with a KVM dirty ring. The first pass takes ~6 s at 4 MiB/s;
  // 670 s per GiB of this 23 MiB guest puts the deadline at ~15 s, after the throttle step. Without
  // postcopy, which this slow a stream would have by default (and switch to instead of throttling).
  const { job } = await a.client.perform(
    { domain: 'busy2', destination: b.url, bandwidthMiBps: 4, maxDowntimeMs: 300, dirtyLimitMiBps: 1, completionTimeoutPerGiBSeconds: 670, deadlineAction: 'abort', allowPostcopy: false },
    true,
  );
  t.equal(job.status, 'failed');
  t.equal(job.error?.code, 'not_converging');
  t.match(job.error?.message, /completion deadline passed/);
  const c = job.stats!.convergence!;
  t.equal(c.dirtyLimit?.state, 'unavailable', `the dirty limit was refused: ${c.dirtyLimit?.reason}`);
  t.match(c.dirtyLimit?.reason, /dirty/i, "qemu's own reason is kept");
  t.equal(c.autoConverge, 'engaged', 'the throttle step fell back to auto-converge');
  await assertOwnedBy(t, a, b, 'busy2');
  t.equal((await waitForPasses(a, 'busy2', boot.passes)).bootId, boot.bootId, 'same guest, running on the source');
  await a.client.lifecycle('busy2', 'destroy');
});
