import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from '../../src/store/atomic.js';
import { StateStore } from '../../src/store/state-store.js';
import { processMatches } from '../../src/qemu/process.js';
import { freePort, startAgent, testGuest, tmpDir } from '../helpers/agents.js';

t.test('atomic write replaces whole files and leaves no temp file', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'x.json');
  await writeFileAtomic(file, 'one');
  await writeFileAtomic(file, 'two');
  t.equal(await fs.readFile(file, 'utf8'), 'two');
  t.same(await fs.readdir(dir), ['x.json']);
});

t.test('overlapping saves of one record: the file ends with the last one issued, every time', async (t) => {
  const dir = await tmpDir(t);
  const store = new StateStore(dir);
  await store.init();
  for (let round = 0; round < 20; round++) {
    const saves = Array.from({ length: 20 }, (_, version) => store.saveRecord('jobs', 'j', { version, round }));
    await Promise.all(saves);
    const onDisk = JSON.parse(await fs.readFile(path.join(dir, 'jobs', 'j.json'), 'utf8')) as { version: number; round: number };
    if (onDisk.version !== 19) t.fail(`round ${round}: version ${onDisk.version} on disk, 19 was written last`);
  }
  t.same(await fs.readdir(path.join(dir, 'jobs')), ['j.json'], 'no temp file left');
  await store.saveRecord('jobs', 'j', { version: 20 });
  const removed = store.removeRecord('jobs', 'j');
  await Promise.all([store.saveRecord('jobs', 'j', { version: 21 }), removed]);
  t.equal(JSON.parse(await fs.readFile(path.join(dir, 'jobs', 'j.json'), 'utf8')).version, 21, 'a save issued after a remove is what stays');
});

t.test('stale temp files of an interrupted write are removed at start', async (t) => {
  const dir = await tmpDir(t);
  const store = new StateStore(dir);
  await store.init();
  await fs.writeFile(path.join(dir, 'jobs', '.abc.json.123.tmp'), '{"half');
  await new StateStore(dir).init();
  t.same(await fs.readdir(path.join(dir, 'jobs')), []);
});

t.test('corrupt state files are set aside and reported; the agent starts', async (t) => {
  const dir = await tmpDir(t);
  const first = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'good');
  await first.client.define(guest.xml);
  await first.app.close();
  const state = first.config.stateDir;
  await fs.writeFile(path.join(state, 'domains', 'broken.xml'), '<domain type="kvm"><name>broken</na');
  await fs.writeFile(path.join(state, 'runtime', 'ghost.json'), '{"name": "ghost", "pid": ');
  await fs.writeFile(path.join(state, 'jobs', 'j1.json'), '[1,2,3]');
  await fs.writeFile(path.join(state, 'host.json'), '{"uuid":');

  const second = await startAgent(t, dir, 'a');
  const host = await second.client.call<{ quarantined: Array<{ file: string; reason: string }> }>('GET', '/host');
  const names = host.quarantined.map((q) => path.basename(q.file)).sort();
  t.same(names, ['broken.xml', 'ghost.json', 'host.json', 'j1.json'], 'each corrupt file reported');
  t.same((await second.client.domains()).map((d) => d.name), ['good'], 'the good definition is still there');
  const quarantine = await fs.readdir(path.join(state, 'quarantine'));
  t.equal(quarantine.length, 4, 'set aside under quarantine/');
});

t.test('a domain and a migration id starting with a dot survive a restart (libvirt allows such names)', async (t) => {
  const dir = await tmpDir(t);
  const first = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, '.hidden');
  await first.client.define(guest.xml);
  const started = await first.client.lifecycle('.hidden', 'start');
  // A migration that fails at once (nobody listens there) leaves an ended job named by the caller.
  const nobody = `http://127.0.0.1:${await freePort('127.0.0.1')}`;
  const { job } = await first.client.perform({ domain: '.hidden', destination: nobody, migrationId: '.dotjob' }, true);
  t.equal(job.status, 'failed', 'the migration failed, the guest stays');
  const run = first.app.agent.domains.find('.hidden')!.run!;
  await first.app.close();

  const second = await startAgent(t, dir, 'a');
  t.ok(processMatches(run.record), 'the guest outlived the restart');
  const info = await second.client.domain('.hidden');
  t.equal(info.state, 'running', 'found again and running');
  t.equal(info.pid, started.pid, 'the same qemu');
  t.equal((await second.client.job('.dotjob')).status, 'failed', 'the job is still on record');
  await second.client.lifecycle('.hidden', 'destroy');
  await second.app.close();

  const third = await startAgent(t, dir, 'a');
  t.equal((await third.client.domain('.hidden')).state, 'shutoff', 'its definition stays when it no longer runs');
});
