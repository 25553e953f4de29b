// A destination, or whoever answers in its place, must not get the source's qemu to do anything
// but stream to a tcp address: its Prepare2 answer is data, never a command line.
import t, { type Test } from 'tap';
import http from 'node:http';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { freePort, testGuest, waitFor, waitForJobEnd } from '../helpers/agents.js';
import { guestQmp, sendPrepare2, startGuest, twoAgents } from '../helpers/migration.js';
import type { Finish2Request } from '../../src/migration/protocol.js';

const FAKE_FINISH_TOKEN = 'ab'.repeat(32);

/** An HTTP server on 127.0.0.4 that plays a destination agent: every Prepare2 gets `uri`. */
async function fakeDestination(t: Test, uri: string): Promise<{ url: string; finish2: Finish2Request[] }> {
  const finish2: Finish2Request[] = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (c: Buffer) => (body += c.toString()));
    req.on('end', () => {
      const parsed = body ? (JSON.parse(body) as { migrationId?: string }) : {};
      res.setHeader('content-type', 'application/json');
      if (req.url === '/prepare2') {
        res.end(JSON.stringify({ migrationId: parsed.migrationId, uri, destination: { hostUuid: '00000000-0000-4000-8000-000000000bad', hostname: 'evil' }, finishToken: FAKE_FINISH_TOKEN }));
      } else if (req.url === '/finish2') {
        finish2.push(parsed as Finish2Request);
        res.end(JSON.stringify({ migrationId: parsed.migrationId, outcome: 'finished' }));
      } else {
        res.statusCode = 404;
        res.end('{}');
      }
    });
  });
  const port = await freePort('127.0.0.4');
  await new Promise<void>((r) => server.listen(port, '127.0.0.4', r));
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  return { url: `http://127.0.0.4:${port}`, finish2 };
}

t.test('a Prepare2 answer with any URI but tcp:HOST:PORT never reaches qemu', async (t) => {
  const { dir, a } = await twoAgents(t);
  await startGuest(a, dir, 'vm1');
  const marker = path.join(dir, 'pwned');
  const hostile = [
    `exec:touch ${marker}`,
    `exec:cat > ${marker}`,
    `unix:${marker}`,
    `file:${marker}`,
    'fd:3',
    'rdma:127.0.0.1:4444',
    'tcp:0.0.0.0:49999',
    'tcp:127.0.0.1:49999,ipv4=on',
    'tcp:127.0.0.1:0',
    'tcp:127.0.0.1:99999',
    'tcp:999.0.0.1:49999',
  ];
  for (const uri of hostile) {
    const fake = await fakeDestination(t, uri);
    const { job } = await a.client.perform({ domain: 'vm1', destination: fake.url }, true);
    t.equal(job.status, 'failed', `${uri}: the migration fails`);
    t.equal(job.error?.code, 'bad_peer_answer', `${uri}: as a bad peer answer`);
    t.equal((await a.client.domain('vm1')).state, 'running', `${uri}: the guest runs on at the source, whatever the peer says in Finish2`);
    // With the token of its answer: a destination ends its empty qemu only on a Finish2 that carries it.
    t.match(fake.finish2, [{ rc: 1, finishToken: FAKE_FINISH_TOKEN }], `${uri}: the peer is told the migration failed`);
  }
  t.notOk(await fs.stat(marker).catch(() => null), 'qemu ran nothing and wrote nothing');
  await a.client.lifecycle('vm1', 'destroy');
});

t.test('a peer answer is read up to 1 MiB, no further', async (t) => {
  const { dir, a } = await twoAgents(t);
  await startGuest(a, dir, 'vm4');
  const fake = await fakeDestination(t, `tcp:127.0.0.4:${'9'.repeat(4 * 1024 * 1024)}`);
  const { job } = await a.client.perform({ domain: 'vm4', destination: fake.url }, true);
  t.equal(job.status, 'failed');
  t.match(job.error, { code: 'peer_failed', message: /answer larger than 1048576 bytes/ }, 'refused by size, not parsed');
  t.equal((await a.client.domain('vm4')).state, 'running', 'the guest stays on the source');
  await a.client.lifecycle('vm4', 'destroy');
});

t.test("the agent's qemu runs under its seccomp sandbox: even an exec: migration cannot spawn", async (t) => {
  const { dir, a } = await twoAgents(t);
  await startGuest(a, dir, 'vm2');
  const pid = (await a.client.domain('vm2')).pid!;
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  t.match(status, /^Seccomp:\s+2$/m, 'a seccomp filter is installed');
  const marker = path.join(dir, 'spawned');
  await guestQmp(a, 'vm2').execute('migrate', { uri: `exec:touch ${marker}` }).catch(() => undefined);
  await waitFor('qemu to be stopped by its sandbox', async () => (await a.client.domain('vm2')).state === 'shutoff', { timeoutMs: 10_000 });
  t.notOk(await fs.stat(marker).catch(() => null), 'no process was spawned');
});

t.test('desturi may choose a port of the range on the migration address, nothing else', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  await startGuest(a, dir, 'vm3');
  await t.rejects(a.client.perform({ domain: 'vm3', destination: b.url, desturi: 'tcp://127.0.0.3:99999' }), { status: 400, code: 'invalid_desturi' });
  for (const desturi of ['tcp://0.0.0.0:49190', 'tcp://127.0.0.1:49190', 'tcp://127.0.0.3:22']) {
    const { job } = await a.client.perform({ domain: 'vm3', destination: b.url, desturi }, true);
    t.equal(job.status, 'failed', `${desturi}: refused`);
    t.match(job.error, { code: 'desturi_not_allowed' }, `${desturi}: by the destination, naming the rule`);
    t.equal((await a.client.domain('vm3')).state, 'running', 'the guest stays on the source');
  }
  const port = 49200;
  t.ok(await new Promise((r) => {
    const probe = net.createServer().once('error', () => r(false)).listen(port, '127.0.0.3', () => probe.close(() => r(true)));
  }), 'the chosen port is free');
  const { job } = await a.client.perform({ domain: 'vm3', destination: b.url, desturi: `tcp://127.0.0.3:${port}` }, true);
  t.equal(job.status, 'completed', 'a port inside the range on the migration address is honoured');
  t.equal(job.uri, `tcp:127.0.0.3:${port}`);
  await waitForJobEnd(b.client, job.id, 'the destination job');
  await b.client.lifecycle('vm3', 'destroy');
});

t.test('a forged Finish2 ends nothing: only the finishToken of the Prepare2 answer counts', async (t) => {
  const { dir, b } = await twoAgents(t);
  const guest = await testGuest(dir, 'vm5');
  const prepared = await sendPrepare2(b, 'forged-finish', guest.xml, { hostUuid: '00000000-0000-4000-8000-00000000000a', hostname: 'the real source' });
  t.match(prepared.finishToken, /^[0-9a-f]{64}$/, 'the answer carries a finishToken');
  const served = JSON.stringify([await b.client.jobs(), await b.client.job('forged-finish')]);
  t.notMatch(served, prepared.finishToken, 'the API never serves it');
  for (const finishToken of [undefined, '0'.repeat(64), prepared.finishToken.replace(/.$/, (c) => (c === '0' ? '1' : '0'))]) {
    await t.rejects(
      b.client.call('POST', '/finish2', { migrationId: 'forged-finish', rc: 1, ...(finishToken ? { finishToken } : {}) }),
      { status: 403, code: 'finish2_not_from_source' },
      `finishToken ${finishToken ?? 'missing'}: refused`,
    );
  }
  t.equal((await b.client.domain('vm5')).state, 'incoming', 'the incoming qemu still waits for its stream');
  const real = await b.client.call<{ outcome: string }>('POST', '/finish2', { migrationId: 'forged-finish', rc: 1, finishToken: prepared.finishToken });
  t.equal(real.outcome, 'aborted', 'the real source can end it');
  await t.rejects(b.client.domain('vm5'), { status: 404, code: 'domain_not_found' }, 'and its empty qemu is gone');
});
