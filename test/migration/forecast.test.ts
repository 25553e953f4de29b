import t from 'tap';
import { buildForecast, EtaCountdown, forecastPrecopy } from '../../src/migration/forecast.js';
import { startGuest, twoAgents } from '../helpers/migration.js';

t.test('the pre-copy model', async (t) => {
  const GiB = 1024 ** 3;
  const idle = forecastPrecopy({ memoryBytes: GiB, dirtyRateBytesPerSec: 0, streamRateBytesPerSec: GiB, downtimeLimitMs: 300 });
  t.same(idle, { converges: true, iterations: 2, predictedTotalMs: 1000, predictedDowntimeMs: 0 }, 'an idle guest: one pass, then nothing left');
  const busy = forecastPrecopy({ memoryBytes: GiB, dirtyRateBytesPerSec: GiB / 10, streamRateBytesPerSec: GiB, downtimeLimitMs: 300 });
  t.ok(busy.converges && busy.iterations === 2, `dirtying a tenth of the stream rate: converges in ${busy.iterations} passes`);
  t.equal(busy.predictedTotalMs, 1100, '1 s for memory, then 0.1 s for what was dirtied meanwhile');
  t.equal(busy.predictedDowntimeMs, 100, 'the last pass is the pause');
  const never = forecastPrecopy({ memoryBytes: GiB, dirtyRateBytesPerSec: GiB, streamRateBytesPerSec: GiB / 2, downtimeLimitMs: 300 });
  t.equal(never.converges, false, 'a guest dirtying faster than the stream never converges');
  t.notOk(never.predictedTotalMs, 'and gets no predicted time');
});

t.test('the strategy the convergence policy will take', async (t) => {
  const MiB = 1048576;
  const base = { domain: 'vm', memoryBytes: 1024 * MiB, measuredForMs: 1000 };
  const quiet = buildForecast({ ...base, dirtyRateBytesPerSec: 0, options: { bandwidthMiBps: 100 } });
  t.same(quiet.strategy, { kind: 'precopy', downtimeLimitMs: 300 }, 'a quiet guest: pre-copy at the caller\'s downtime limit');
  // Each pass sends what the guest dirtied during the previous one: 90 MiB/s of dirt over a
  // 100 MiB/s stream shrinks the rest by a tenth a pass, too slowly to fit 300 ms within the
  // model's 30 passes; 1000 ms it fits.
  const warm = buildForecast({ ...base, dirtyRateBytesPerSec: 90 * MiB, options: { bandwidthMiBps: 100 } });
  t.equal(warm.precopy?.converges, false, 'not within 300 ms');
  t.same(warm.strategy, { kind: 'precopy', downtimeLimitMs: 1000 }, 'but within the schedule\'s 1000 ms');
  const hot = buildForecast({ ...base, dirtyRateBytesPerSec: 200 * MiB, options: { bandwidthMiBps: 100 } });
  t.same(hot.strategy, { kind: 'deadline', action: 'abort', atMs: 150_000 }, 'a guest dirtying faster than the stream: aborted at 150 s/GiB');
  t.match(hot.verdict, /aborted at the deadline/);
  const paused = buildForecast({ ...base, dirtyRateBytesPerSec: 200 * MiB, options: { bandwidthMiBps: 100, deadlineAction: 'pause' } });
  t.same(paused.strategy, { kind: 'deadline', action: 'pause', atMs: 150_000, pauseMs: 10_240 }, 'pause and finish: the guest pauses for up to all of its memory');
  const noDeadline = buildForecast({ ...base, dirtyRateBytesPerSec: 200 * MiB, options: { bandwidthMiBps: 100, completionTimeoutPerGiBSeconds: 0 } });
  t.same(noDeadline.strategy, { kind: 'progress-timeout', afterMs: 150_000 }, 'without a deadline only the progress timeout ends it');
  // 1 GiB at 100 MiB/s: a first pass of 10.24 s, two stalls of 3 s (300 -> 600 -> 1000 ms), a third before the switch; then up to all of memory again.
  const postcopy = buildForecast({ ...base, dirtyRateBytesPerSec: 200 * MiB, options: { bandwidthMiBps: 100, allowPostcopy: true } });
  t.same(postcopy.strategy, { kind: 'postcopy', atMs: 19_240, postcopyMs: 10_240, predictedTotalMs: 29_480 }, 'with postcopy allowed: the switch after the downtime schedule');
  t.match(postcopy.verdict, /switches to postcopy after about 19240 ms/);
});

t.test('the running ETA counts down and never rises', async (t) => {
  const MiB = 1048576;
  const eta = new EtaCountdown();
  const sample = (remainingMiB: number) => ({ remainingBytes: remainingMiB * MiB, dirtyRateBytesPerSec: 0, streamRateBytesPerSec: 100 * MiB, downtimeLimitMs: 300 });
  t.equal(eta.update(sample(1000), 0), 10_000, '1000 MiB at 100 MiB/s: 10 s');
  t.equal(eta.update(sample(900), 1000), 9000, 'as the stream goes on, the countdown goes down');
  t.equal(eta.update(sample(1000), 2000), 8000, 'a new pass that finds more to send does not raise it');
  t.equal(eta.update(sample(100), 3000), 1000, 'a better estimate lowers it');
  t.equal(eta.update({ ...sample(100), dirtyRateBytesPerSec: 200 * MiB }, 4000), undefined, 'while the stream does not converge there is none');
});

t.test('a forecast before migrating: measured dirty rate, the stream rate it expects, and whether pre-copy converges', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await startGuest(a, dir, 'quiet');
  await startGuest(a, dir, 'busy', { fillMiB: 64, hotMiB: 48, reportEvery: 16 });

  const unknown = await a.client.forecast({ domain: 'quiet' });
  t.equal(unknown.streamRateFrom, 'unknown', 'without a limit or a past migration the stream rate is unknown');
  t.notOk(unknown.precopy, 'and nothing is predicted');
  t.match(unknown.verdict, /stream rate is unknown/);

  const limited = await a.client.forecast({ domain: 'quiet', bandwidthMiBps: 512 });
  t.equal(limited.streamRateFrom, 'bandwidth-limit');
  t.equal(limited.streamRateBytesPerSec, 512 * 1048576);
  t.equal(limited.precopy?.converges, true, `a quiet guest converges (dirty rate ${limited.dirtyRateBytesPerSec} B/s)`);
  t.ok(limited.measuredForMs >= 1000, `measured for ${limited.measuredForMs} ms`);

  const busy = await a.client.forecast({ domain: 'busy', bandwidthMiBps: 1, downtimeLimitMs: 100 });
  t.ok(busy.dirtyRateBytesPerSec > 1048576, `the busy guest dirties ${(busy.dirtyRateBytesPerSec / 1048576).toFixed(0)} MiB/s`);
  t.equal(busy.precopy?.converges, false, 'over 1 MiB/s it does not converge');
  t.equal(busy.strategy?.kind, 'postcopy', 'by default a stream under 1 MiB/s is set up for postcopy, and the policy switches');
  t.match(busy.verdict, /does not converge.*switches to postcopy/);
  const precopyOnly = await a.client.forecast({ domain: 'busy', bandwidthMiBps: 1, downtimeLimitMs: 100, allowPostcopy: false });
  t.equal(precopyOnly.strategy?.kind, 'deadline', 'without postcopy the policy ends it at its deadline');
  const fastLink = await a.client.forecast({ domain: 'busy', bandwidthMiBps: 1024, downtimeLimitMs: 1 });
  t.not(fastLink.strategy?.kind, 'postcopy', `over ${1024} MiB/s the stream is multifd, without postcopy (${fastLink.strategy?.kind})`);

  const { job } = await a.client.perform({ domain: 'quiet', destination: b.url }, true);
  t.equal(job.status, 'completed');
  const { job: back } = await b.client.perform({ domain: 'quiet', destination: a.url }, true);
  t.equal(back.status, 'completed');
  const learned = await a.client.forecast({ domain: 'quiet', destination: b.url });
  t.equal(learned.streamRateFrom, 'last-migration', 'after a migration to b, its stream rate is known');
  t.ok(learned.streamRateBytesPerSec! > 0 && learned.precopy?.converges === true, `${((learned.streamRateBytesPerSec ?? 0) / 1048576).toFixed(0)} MiB/s: converges`);
  await t.rejects(a.client.forecast({ domain: 'nosuch' }), { status: 404, code: 'domain_not_found' });
  for (const name of ['quiet', 'busy']) await a.client.lifecycle(name, 'destroy');
});
