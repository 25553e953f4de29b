import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import type { QmpClient } from '../../src/qemu/qmp.js';
import { waitFor, type TestAgent } from '../helpers/agents.js';
import { assertOwnedBy, guestQmp, startGuest, twoAgents, waitForPasses } from '../helpers/migration.js';

interface Transport {
  multifd: boolean;
  channels: number;
  compression: string;
  xbzrle: boolean;
}

/** What one qemu is set to: capabilities multifd and xbzrle, parameters multifd-channels and multifd-compression. */
async function qemuTransport(qmp: QmpClient): Promise<Transport> {
  const caps = await qmp.execute<Array<{ capability: string; state: boolean }>>('query-migrate-capabilities');
  const params = await qmp.execute<{ 'multifd-channels': number; 'multifd-compression': string }>('query-migrate-parameters');
  const cap = (name: string) => caps.find((c) => c.capability === name)?.state === true;
  return { multifd: cap('multifd'), channels: params['multifd-channels'], compression: params['multifd-compression'], xbzrle: cap('xbzrle') };
}

/** Wait until an agent stands at its hold point, then let it go once `check` has run. */
async function atHold<T>(agent: TestAgent, point: string, check: () => Promise<T>): Promise<T> {
  const marker = path.join(agent.config.stateDir, `hold.${point}`);
  await waitFor(`${point} hold`, () => fs.access(marker).then(() => true));
  try {
    return await check();
  } finally {
    await fs.rm(marker, { force: true });
  }
}

t.test('a default migration streams on multifd with the lower of the two channel limits, set on both qemus; the guest keeps running', async (t) => {
  const { dir, a, b } = await twoAgents(t, { a: { migrationChannels: 3, debugHolds: ['before-migrate'] } });
  const limits = [(await a.client.host()).migrationChannels, (await b.client.host()).migrationChannels];
  t.same(limits, [3, 8], 'a configured limit; the default for plain streams: 8');
  const channels = Math.min(...limits);
  const { boot } = await startGuest(a, dir, 'vm1');
  const { job } = await a.client.perform({ domain: 'vm1', destination: b.url });
  // Between set-up and `migrate`: both qemus are set, the stream has not started.
  const [source, destination] = await atHold(a, 'before-migrate', () => Promise.all([qemuTransport(guestQmp(a, 'vm1')), qemuTransport(guestQmp(b, 'vm1'))]));
  const expected = channels > 1 ? { multifd: true, channels, compression: 'none', xbzrle: false } : { multifd: false, xbzrle: false };
  t.match(source, expected, `the source's qemu: multifd on ${channels} channels`);
  t.match(destination, { ...expected, xbzrle: false }, "the destination's qemu: the same");
  const ended = await a.app.agent.migrations.jobs.waitForEnd(a.app.agent.migrations.jobs.require(job.id), 60_000);
  t.equal(ended.status, 'completed');
  t.same(ended.transport, { multifd: channels > 1, channels, compression: 'none' }, 'the job records the agreed transport');
  t.same((await b.client.job(job.id)).transport, ended.transport, "the destination's job records the same");
  await assertOwnedBy(t, b, a, 'vm1');
  const now = await waitForPasses(b, 'vm1', boot.passes);
  t.equal(now.bootId, boot.bootId, 'same boot id (no reboot)');
  await b.client.lifecycle('vm1', 'destroy');
});

t.test('a zstd migration and an xbzrle one complete; the guest keeps running', async (t) => {
  const { dir, a, b } = await twoAgents(t, { b: { debugHolds: ['before-finish2'] } });
  const { boot } = await startGuest(a, dir, 'vm2', { fillMiB: 64, hotMiB: 8, reportEvery: 0 });
  const zstd = await a.client.perform({ domain: 'vm2', destination: b.url, compression: 'zstd' }, true);
  t.equal(zstd.job.status, 'completed', 'zstd migration completed');
  t.equal(zstd.job.transport?.compression, 'zstd');
  t.match(await qemuTransport(guestQmp(b, 'vm2')), { multifd: true, compression: 'zstd' }, 'the arrived qemu read zstd pages');
  const afterZstd = await waitForPasses(b, 'vm2', boot.passes);
  t.equal(afterZstd.bootId, boot.bootId);

  // Back with xbzrle, from the qemu that arrived with multifd and zstd set.
  const { job } = await b.client.perform({ domain: 'vm2', destination: a.url, xbzrle: true });
  const held = await atHold(b, 'before-finish2', async () => {
    const qmp = guestQmp(b, 'vm2');
    return { transport: await qemuTransport(qmp), info: await qmp.execute<{ status: string; 'xbzrle-cache'?: { 'cache-size': number } }>('query-migrate') };
  });
  t.match(held.transport, { multifd: false, xbzrle: true }, 'xbzrle on one plain stream: multifd set off again');
  t.equal(held.info.status, 'completed');
  t.ok(held.info['xbzrle-cache'], 'qemu reports its xbzrle cache for the stream');
  const ended = await b.app.agent.migrations.jobs.waitForEnd(b.app.agent.migrations.jobs.require(job.id), 60_000);
  t.equal(ended.status, 'completed', 'xbzrle migration completed');
  await assertOwnedBy(t, a, b, 'vm2');
  const afterXbzrle = await waitForPasses(a, 'vm2', afterZstd.passes);
  t.equal(afterXbzrle.bootId, boot.bootId, 'same boot id after both');
  await a.client.lifecycle('vm2', 'destroy');
});

t.test('a destination whose limit is one channel answers no multifd: one plain stream', async (t) => {
  const { dir, a, b } = await twoAgents(t, { b: { migrationChannels: 1 } });
  const { boot } = await startGuest(a, dir, 'vm3');
  const { job } = await a.client.perform({ domain: 'vm3', destination: b.url, multifdChannels: 4 }, true);
  t.equal(job.status, 'completed');
  t.same(job.transport, { multifd: false, channels: 1, compression: 'none' });
  t.match(await qemuTransport(guestQmp(b, 'vm3')), { multifd: false }, 'the arrived qemu listened plain');
  t.equal((await waitForPasses(b, 'vm3', boot.passes)).bootId, boot.bootId);
  await b.client.lifecycle('vm3', 'destroy');
});

t.test('channel counts and transport options outside the schema are refused', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await startGuest(a, dir, 'vm4');
  // (A numeric string such as "4" is 4: Fastify coerces scalars to the schema's type, as for every option.)
  for (const bad of [0, -1, 65, 2.5, 'four', 1e9]) {
    await t.rejects(a.client.perform({ domain: 'vm4', destination: b.url, multifdChannels: bad }), { status: 400, code: 'invalid_request' }, `multifdChannels ${JSON.stringify(bad)}`);
  }
  await t.rejects(a.client.perform({ domain: 'vm4', destination: b.url, compression: 'lz4' }), { status: 400, code: 'invalid_request' }, 'an unknown compression');
  // A hostile source's offer is bounded by the same schema at the destination.
  const source = { hostUuid: '00000000-0000-4000-8000-000000000001' };
  const offers: Array<[object, string]> = [
    [{ multifd: true, channels: 255, compression: 'none' }, 'invalid_request'],
    [{ multifd: true, channels: 0, compression: 'none' }, 'invalid_request'],
    [{ multifd: true, channels: 2, compression: 'zlib' }, 'invalid_request'],
    [{ multifd: true, channels: 2, compression: 'none', threads: 9 }, 'unknown_property'],
  ];
  for (const [transport, code] of offers) {
    await t.rejects(
      b.client.call('POST', '/prepare2', { protocolVersion: 2, migrationId: 'hostile-1', xml: '<domain/>', source, transport }),
      { status: 400, code },
      `Prepare2 offering ${JSON.stringify(transport)}`,
    );
  }
  t.same(b.app.agent.domains.list().map((d) => d.name), [], 'the destination started nothing');
  t.equal((await a.client.domain('vm4')).state, 'running', 'the guest runs on');
  await a.client.lifecycle('vm4', 'destroy');
});
