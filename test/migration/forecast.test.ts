import t from 'tap';
import { forecastPrecopy } from '../../src/migration/forecast.js';
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
  t.match(busy.verdict, /does not converge/);

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
