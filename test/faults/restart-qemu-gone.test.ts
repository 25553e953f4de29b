import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { processMatches } from '../../src/qemu/process.js';
import { freePort, qemuRecords, spawnAgent, testGuest, waitFor, waitForJobEnd, tmpDir } from '../helpers/agents.js';

// Found by the fast tier (test/fast): an arrival's job could not end from `listening` when its
// qemu, and with it the transient domain, was gone by the time the agent started again; it was
// retried for ever and held an incoming slot.
t.test('a destination restarted after its incoming qemu ended meanwhile ends the job', async (t) => {
  const dir = await tmpDir(t);
  const bState = path.join(dir, 'b');
  const bArgs = { host: '127.0.0.3', port: await freePort('127.0.0.3'), stateDir: bState, allowPath: dir, extra: ['--migration-address', '127.0.0.3'] };
  const a = await spawnAgent(t, { host: '127.0.0.2', stateDir: path.join(dir, 'a'), allowPath: dir, extra: ['--migration-address', '127.0.0.2'] });
  let b = await spawnAgent(t, { ...bArgs, extra: [...bArgs.extra, '--debug-hold', 'prepare2'] });
  const guest = await testGuest(dir, 'vm1');
  await a.client.define(guest.xml);
  await a.client.lifecycle('vm1', 'start');

  await a.client.perform({ domain: 'vm1', destination: b.url, migrationId: 'gone-while-down' });
  await waitFor('destination listening, holding before its answer', () => fs.access(path.join(bState, 'hold.prepare2')).then(() => true, () => false));
  await b.kill9();
  const incoming = (await qemuRecords(bState)).filter(processMatches);
  t.equal(incoming.length, 1, 'the incoming qemu outlived its agent');
  for (const rec of incoming) process.kill(rec.pid, 'SIGKILL');
  await waitFor('the incoming qemu gone', async () => (await qemuRecords(bState)).filter(processMatches).length === 0);
  await fs.rm(path.join(bState, 'hold.prepare2'), { force: true });

  b = await spawnAgent(t, bArgs);
  const ended = await waitForJobEnd(b.client, 'gone-while-down', 'the destination job', 20_000);
  t.equal(ended.status, 'failed', 'the job ended');
  t.equal(ended.error?.code, 'destination_qemu_ended');
  const source = await waitForJobEnd(a.client, 'gone-while-down', 'the source job', 30_000);
  t.equal(source.status, 'failed', 'the source rolled back');
  t.equal((await a.client.domain('vm1')).state, 'running', 'the guest runs on the source');
  await a.client.lifecycle('vm1', 'destroy');
});
