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
import { ONE_STREAM_MIBPS, type MigrationOptions } from '../../src/migration/params.js';
import type { UserfaultfdAccess } from '../../src/qemu/userfaultfd.js';
import { SimWorld, simDomainXml, type SimAgent, type SimHost } from './sim.js';

async function world(channels: { a: number; b: number }, bUserfaultfd?: UserfaultfdAccess) {
  const w = new SimWorld();
  const a = w.addHost('a', '127.0.0.2');
  const b = w.addHost('b', '127.0.0.3');
  a.migrationChannels = channels.a;
  b.migrationChannels = channels.b;
  if (bUserfaultfd) b.userfaultfd = bUserfaultfd;
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
  t.same(back.transport, { multifd: false, channels: 1, compression: 'none', postcopy: true }, 'one plain stream, set up for postcopy (it costs nothing until needed)');
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
  t.same(ended.transport, { multifd: false, channels: 1, compression: 'none', postcopy: true }, 'xbzrle streams on one plain stream');
});

t.test('postcopy by default: armed on one plain stream (a bandwidth cap one stream carries), both qemus set to it; a fast link keeps multifd without it', async (t) => {
  const { a, b } = await world({ a: 2, b: 2 });
  const slow = await migrate(a, b, { bandwidthMiBps: ONE_STREAM_MIBPS });
  t.equal(slow.status, 'completed');
  t.same(slow.transport, { multifd: false, channels: 1, compression: 'none', postcopy: true }, `at ${ONE_STREAM_MIBPS} MiB/s: one plain stream, postcopy armed`);
  t.same(b.agent!.service.jobs.get(slow.id)!.record.transport, slow.transport, 'the destination records the same');
  const arrived = onlyQemu(b);
  t.equal(arrived.capabilities.get('postcopy-ram'), true, "the destination's qemu takes postcopy");
  const fast = await migrate(b, a, { bandwidthMiBps: ONE_STREAM_MIBPS + 1 });
  t.equal(fast.status, 'completed');
  t.same(fast.transport, { multifd: true, channels: 2, compression: 'none' }, 'above it: multifd, no postcopy (qemu 7.2 has no multifd postcopy)');
  t.equal(arrived.capabilities.get('postcopy-ram'), false, 'postcopy set off on the source, not left from its arrival');
  const never = await migrate(a, b, { bandwidthMiBps: 32, allowPostcopy: false });
  t.same(never.transport, { multifd: false, channels: 1, compression: 'none' }, 'allowPostcopy false: never armed');
  t.equal(onlyQemu(b).capabilities.get('postcopy-ram'), undefined, 'nor asked of the destination');
});

t.test('a destination that cannot receive postcopy answers the offer without it: the stream runs pre-copy only; asked for with allowPostcopy, it refuses before any qemu', async (t) => {
  const { a, b } = await world({ a: 2, b: 2 }, { via: 'none', reason: 'no userfaultfd here' });
  const asked = await migrate(a, b, { bandwidthMiBps: 32, allowPostcopy: true });
  t.equal(asked.status, 'failed');
  t.equal(asked.error?.code, 'postcopy_unavailable');
  t.match(asked.error?.message, /no userfaultfd here/, "the destination's reason");
  t.equal(b.qemus.size, 0, 'no qemu was started there');
  t.equal(onlyQemu(a).running, true, 'the guest runs on the source');
  const offered = await migrate(a, b, { bandwidthMiBps: 32 });
  t.equal(offered.status, 'completed');
  t.same(offered.transport, { multifd: false, channels: 1, compression: 'none', postcopy: false }, 'offered, answered without it');
  t.notOk(onlyQemu(b).capabilities.get('postcopy-ram'), 'the destination qemu was not set to postcopy');
});

t.test('a destination older than postcopy in the offer is asked again without it; an answer arming postcopy that was not offered is a broken peer', async (t) => {
  const { a, b } = await world({ a: 2, b: 2 });
  const seen: Prepare2Request[] = [];
  const handle = b.agent!.handle.bind(b.agent!);
  b.agent!.handle = async (path: string, body: unknown) => {
    const req = body as Prepare2Request;
    if (path === '/prepare2') {
      seen.push(req);
      if (req.transport?.postcopy !== undefined) throw new AgentError(400, 'unknown_property', 'unknown body property: postcopy', { unknownProperties: ['postcopy'] });
    }
    return handle(path, body);
  };
  const older = await migrate(a, b, { bandwidthMiBps: 32 });
  t.equal(older.status, 'completed');
  t.same(seen.map((r) => r.transport?.postcopy), [true, undefined], 'the offer with postcopy, refused, then without it');
  t.same(older.transport, { multifd: false, channels: 1, compression: 'none', postcopy: false }, 'offered, and not taken');
  const handleA = a.agent!.handle.bind(a.agent!);
  a.agent!.handle = async (path: string, body: unknown) => {
    const answer = await handleA(path, body);
    return path === '/prepare2' ? { ...(answer as Prepare2Response), transport: { multifd: false, channels: 1, compression: 'none', postcopy: true } } : answer;
  };
  const broken = await migrate(b, a, { bandwidthMiBps: 32, allowPostcopy: false });
  t.equal(broken.status, 'failed');
  t.equal(broken.error?.code, 'bad_peer_answer');
});
