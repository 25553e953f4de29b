/**
 * A guest that comes back to a host which still holds its older, inactive definition (the same
 * name and uuid): the definition stored there becomes the one that arrived and runs, and stays so
 * across a restart of that agent, rather than the stale one winning.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { freePort, spawnAgent, testGuest, tmpDir, waitFor, waitForJobEnd } from '../helpers/agents.js';

const titled = (xml: string, title: string) => xml.replace(/(<name>[^<]*<\/name>)/, `$1<title>${title}</title>`);

t.test('migrating back into a stale inactive definition stores the arriving one, also after a restart', async (t) => {
  const dir = await tmpDir(t);
  const aOpts = { host: '127.0.0.2', port: await freePort('127.0.0.2'), stateDir: path.join(dir, 'a'), allowPath: dir, extra: ['--migration-address', '127.0.0.2'] };
  const bOpts = { host: '127.0.0.3', port: await freePort('127.0.0.3'), stateDir: path.join(dir, 'b'), allowPath: dir, extra: ['--migration-address', '127.0.0.3'] };
  let a = await spawnAgent(t, aOpts);
  const b = await spawnAgent(t, bOpts);
  const guest = await testGuest(dir, 'vm1');
  await a.client.define(titled(guest.xml, 'first'));
  await a.client.lifecycle('vm1', 'start');
  const there = await a.client.perform({ domain: 'vm1', destination: b.url }, true);
  t.equal(there.job.status, 'completed', 'A -> B');
  t.match(await a.client.xml('vm1'), /<title>first<\/title>/, 'A keeps its definition, inactive');

  // On B the guest is redefined while it is shut off, then sent back.
  await b.client.lifecycle('vm1', 'destroy');
  await b.client.define((await b.client.xml('vm1')).replace('<title>first</title>', '<title>second</title>'));
  await b.client.lifecycle('vm1', 'start');
  const back = await b.client.perform({ domain: 'vm1', destination: a.url }, true);
  t.equal(back.job.status, 'completed', 'B -> A');
  t.match(await a.client.xml('vm1'), /<title>second<\/title>/, 'A describes the guest that runs');
  // Written just after the guest resumed there (Finish2 is answered first).
  t.ok(await waitFor('A stores the definition that arrived', async () => /<title>second<\/title>/.test(await fs.readFile(path.join(aOpts.stateDir, 'domains', 'vm1.xml'), 'utf8'))), 'and stores it');

  await a.kill9();
  a = await spawnAgent(t, aOpts);
  t.equal((await a.client.domain('vm1')).state, 'running', 'the restarted agent re-attached');
  t.match(await a.client.xml('vm1'), /<title>second<\/title>/, 'after the restart the arrived definition still holds');
  await a.client.lifecycle('vm1', 'destroy');
});

t.test('the arriving definition survives a restart of the destination in the middle of the hand-over', async (t) => {
  const dir = await tmpDir(t);
  const aOpts = { host: '127.0.0.2', port: await freePort('127.0.0.2'), stateDir: path.join(dir, 'a'), allowPath: dir, extra: ['--migration-address', '127.0.0.2'] };
  const bOpts = { host: '127.0.0.3', port: await freePort('127.0.0.3'), stateDir: path.join(dir, 'b'), allowPath: dir, extra: ['--migration-address', '127.0.0.3'] };
  // A holds the guest's older definition, inactive; B runs a newer one of the same guest.
  let a = await spawnAgent(t, { ...aOpts, extra: [...aOpts.extra, '--debug-hold', 'finish2'] });
  const b = await spawnAgent(t, bOpts);
  const guest = await testGuest(dir, 'vm1');
  await a.client.define(titled(guest.xml, 'first'));
  // The same guest (A gave it its uuid), redefined.
  await b.client.define((await a.client.xml('vm1')).replace('<title>first</title>', '<title>second</title>'));
  await b.client.lifecycle('vm1', 'start');

  const { job } = await b.client.perform({ domain: 'vm1', destination: a.url });
  // A accepted Finish2(rc=0) and wrote `taking-over`: it dies there, before the guest is its own.
  await waitFor('A holding at finish2', () => fs.access(path.join(aOpts.stateDir, 'hold.finish2')).then(() => true, () => false), { timeoutMs: 60_000 });
  await a.kill9();
  a = await spawnAgent(t, aOpts);
  const ended = await waitForJobEnd(b.client, job.id, 'B -> A after the restart');
  t.equal(ended.status, 'completed', 'the restarted destination completed the hand-over');
  t.equal((await a.client.domain('vm1')).state, 'running', 'the guest runs on A');
  t.match(await a.client.xml('vm1'), /<title>second<\/title>/, 'A describes the guest that arrived');
  t.match(await fs.readFile(path.join(aOpts.stateDir, 'domains', 'vm1.xml'), 'utf8'), /<title>second<\/title>/, 'and stores it, not the definition it held before');
  await a.client.lifecycle('vm1', 'destroy');
});
