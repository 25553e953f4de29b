/**
 * The stream transport's agreement in Prepare2 (src/migration/params.ts), on the fast tier's
 * simulated qemus, whose stream fails when its two ends are set differently, as qemu's does:
 * what each end's qemu is set to, and what happens with a destination older than the agreement
 * or one that answers what was not offered.
 */
import t from 'tap';
import { randomUUID } from 'node:crypto';
import { AgentError } from '../../src/errors.js';
import type { Prepare2Request, Prepare2Response } from '../../src/migration/protocol.js';
import type { MigrationOptions } from '../../src/migration/params.js';
import { SimWorld, simDomainXml, type SimAgent, type SimHost } from './sim.js';

async function world(channels: { a: number; b: number }) {
  const w = new SimWorld();
  const a = w.addHost('a', '127.0.0.2');
  const b = w.addHost('b', '127.0.0.3');
  a.migrationChannels = channels.a;
  b.migrationChannels = channels.b;
  const uuid = randomUUID();
  const xml = simDomainXml('vm', uuid);
  a.definitions.set('vm', xml);
  a.startQemu({ domain: 'vm', uuid, xml, persistent: true, incoming: false }, { running: true, holdsGuest: true });
  await a.startAgent();
  await b.startAgent();
  return { a, b };
}

async function migrate(a: SimHost, b: SimHost, options: Partial<MigrationOptions> = {}) {
  const service = a.agent!.service;
  const job = await service.perform({ domain: 'vm', destination: b.url, options });
  return service.jobs.waitForEnd(job, 10_000);
}

/** The destination's Prepare2 as an agent older than the agreement answers it: it refuses the offer as an unknown property, and answers no transport. */
function asOlderDestination(agent: SimAgent, seen: Prepare2Request[]): void {
  const handle = agent.handle.bind(agent);
  agent.handle = async (path: string, body: unknown) => {
    if (path !== '/prepare2') return handle(path, body);
    const req = body as Prepare2Request;
    seen.push(req);
    if (req.transport) throw new AgentError(400, 'unknown_property', 'unknown body property: transport', { unknownProperties: ['transport'] });
    const { transport: _set, ...answer } = (await handle(path, body)) as Prepare2Response;
    return answer;
  };
}

function onlyQemu(host: SimHost) {
  const qemus = [...host.qemus];
  if (qemus.length !== 1) throw new Error(`${host.name} runs ${qemus.length} qemus`);
  return qemus[0]!;
}

t.test('both ends stream on the lower of the two agents\' channel limits, each qemu set to it', async (t) => {
  const { a, b } = await world({ a: 4, b: 3 });
  const ended = await migrate(a, b);
  t.equal(ended.status, 'completed');
  t.same(ended.transport, { multifd: true, channels: 3, compression: 'none' }, 'the source records what the destination answered');
  t.same(b.agent!.service.jobs.get(ended.id)!.record.transport, ended.transport, 'the destination records the same');
  const arrived = onlyQemu(b);
  t.equal(arrived.capabilities.get('multifd'), true);
  t.equal(arrived.parameters.get('multifd-channels'), 3);
  // Back, asking for one channel: the qemu that arrived with multifd on is turned off again.
  const back = await migrate(b, a, { multifdChannels: 1 });
  t.equal(back.status, 'completed');
  t.same(back.transport, { multifd: false, channels: 1, compression: 'none' });
  t.equal(arrived.capabilities.get('multifd'), false, 'multifd set off on the source, not left from its arrival');
});

t.test('a destination older than the agreement is asked again without the offer, and gets one plain stream', async (t) => {
  const { a, b } = await world({ a: 2, b: 2 });
  const seen: Prepare2Request[] = [];
  asOlderDestination(b.agent!, seen);
  const ended = await migrate(a, b);
  t.equal(ended.status, 'completed');
  t.same(seen.map((r) => r.transport !== undefined), [true, false], 'the offer, refused, then the Prepare2 without it');
  t.notOk('compression' in seen[1]!.options || 'multifdChannels' in seen[1]!.options || 'xbzrle' in seen[1]!.options, 'no transport option among the options an older destination would refuse');
  t.same(ended.transport, { multifd: false, channels: 1, compression: 'none' });
  t.equal(onlyQemu(b).capabilities.get('multifd'), false);
});

t.test('zstd compression with a destination older than the agreement fails before the stream; the guest stays', async (t) => {
  const { a, b } = await world({ a: 2, b: 2 });
  asOlderDestination(b.agent!, []);
  const ended = await migrate(a, b, { compression: 'zstd' });
  t.equal(ended.status, 'failed');
  t.equal(ended.error?.code, 'compression_unsupported');
  t.equal(onlyQemu(a).running, true, 'the guest runs on the source');
  t.equal(b.qemus.size, 0, 'no qemu left on the destination');
});

t.test('an answer the offer does not allow is a broken peer: the migration fails before the stream', async (t) => {
  const { a, b } = await world({ a: 2, b: 8 });
  const handle = b.agent!.handle.bind(b.agent!);
  b.agent!.handle = async (path: string, body: unknown) => {
    const answer = await handle(path, body);
    return path === '/prepare2' ? { ...(answer as Prepare2Response), transport: { multifd: true, channels: 8, compression: 'none' } } : answer;
  };
  const ended = await migrate(a, b);
  t.equal(ended.status, 'failed');
  t.equal(ended.error?.code, 'bad_peer_answer');
  t.equal(onlyQemu(a).running, true, 'the guest runs on the source');
  t.equal(b.qemus.size, 0, 'Finish2 ended the destination\'s qemu');
});

t.test('xbzrle with compression or more than one channel is refused before anything is sent', async (t) => {
  const { a, b } = await world({ a: 2, b: 2 });
  for (const options of [{ xbzrle: true, compression: 'zstd' as const }, { xbzrle: true, multifdChannels: 2 }]) {
    await t.rejects(a.agent!.service.perform({ domain: 'vm', destination: b.url, options }), { statusCode: 400, code: 'conflicting_options' }, JSON.stringify(options));
  }
  const ended = await migrate(a, b, { xbzrle: true });
  t.equal(ended.status, 'completed');
  t.same(ended.transport, { multifd: false, channels: 1, compression: 'none' }, 'xbzrle streams on one plain stream');
});
