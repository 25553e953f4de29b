import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from '../../src/store/atomic.js';
import { readRecords, StateStore } from '../../src/store/state-store.js';
import { parseRecordFile, RECORD_FILE_SUFFIX } from '../../src/store/record-pool.js';
import { processMatches } from '../../src/qemu/process.js';
import { freePort, startAgent, testGuest, tmpDir, type TestContext } from '../helpers/agents.js';

t.test('atomic write replaces whole files and leaves no temp file', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'x.json');
  await writeFileAtomic(file, 'one');
  await writeFileAtomic(file, 'two');
  t.equal(await fs.readFile(file, 'utf8'), 'two');
  t.same(await fs.readdir(dir), ['x.json']);
});

/** A store on `dir`, closed when the test ends. */
async function openStore(t: TestContext, dir: string): Promise<StateStore> {
  const store = new StateStore(dir);
  await store.init();
  t.teardown(() => store.close());
  return store;
}

async function onDisk(dir: string, id: string): Promise<unknown> {
  return (await readRecords(dir, 'jobs')).find((r) => r.id === id)?.value;
}

const recordFiles = async (dir: string) => (await fs.readdir(path.join(dir, 'jobs'))).filter((f) => f.endsWith(RECORD_FILE_SUFFIX));

t.test('overlapping saves of one record: the disk ends with the last one issued, every time', async (t) => {
  const dir = await tmpDir(t);
  const store = await openStore(t, dir);
  for (let round = 0; round < 20; round++) {
    const saves = Array.from({ length: 20 }, (_, version) => store.saveRecord('jobs', 'j', { version, round }));
    await Promise.all(saves);
    const written = (await onDisk(dir, 'j')) as { version: number; round: number };
    if (written.version !== 19) t.fail(`round ${round}: version ${written.version} on disk, 19 was written last`);
  }
  t.same((await fs.readdir(path.join(dir, 'jobs'))).filter((f) => !f.endsWith(RECORD_FILE_SUFFIX)), [], 'only record files, no temp file');
  await store.saveRecord('jobs', 'j', { version: 20 });
  const removed = store.removeRecord('jobs', 'j');
  await Promise.all([store.saveRecord('jobs', 'j', { version: 21 }), removed]);
  t.same(await onDisk(dir, 'j'), { version: 21 }, 'a save issued after a remove is what stays');
  t.same((await (await openStore(t, dir)).loadRecords('jobs', () => true)).map((r) => r.value), [{ version: 21 }], 'and what a new store loads');
});

t.test('a torn write leaves the record as it was before it', async (t) => {
  const dir = await tmpDir(t);
  const store = await openStore(t, dir);
  await store.saveRecord('jobs', 'j', { version: 1 });
  await store.saveRecord('jobs', 'j', { version: 2 });
  const [name] = await recordFiles(dir);
  const file = path.join(dir, 'jobs', name!);
  const bytes = await fs.readFile(file);
  const content = parseRecordFile(bytes);
  if (content.kind !== 'valid') throw new Error(`record file is ${content.kind}`);
  // The crash came in the middle of the newest copy: its last bytes never reached the disk.
  const at = content.newest.index * content.slotBytes;
  bytes.fill(0, at + 30, at + content.slotBytes);
  await fs.writeFile(file, bytes);
  const reloaded = await openStore(t, dir);
  t.same(await reloaded.loadRecord('jobs', 'j', () => true), { version: 1 }, 'the copy before it');
  t.same(reloaded.quarantined, [], 'nothing set aside: one slot was whole');
  await reloaded.saveRecord('jobs', 'j', { version: 3 });
  t.same(await onDisk(dir, 'j'), { version: 3 }, 'and the next save goes on from there');
});

t.test('new records take the files of removed ones: the directory does not grow', async (t) => {
  const dir = await tmpDir(t);
  const store = await openStore(t, dir);
  for (let i = 0; i < 40; i++) {
    await store.saveRecord('jobs', `job-${i}`, { i });
    if (i >= 3) await store.removeRecord('jobs', `job-${i - 3}`);
  }
  t.same((await readRecords(dir, 'jobs')).map((r) => r.id).sort(), ['job-37', 'job-38', 'job-39']);
  t.ok((await recordFiles(dir)).length <= 4 + 2, `files: ${(await recordFiles(dir)).length} for 3 records (and at most 2 spares)`);
});

t.test('a record that outgrows its slots moves to a bigger file, and only its newest copy is read', async (t) => {
  const dir = await tmpDir(t);
  const store = await openStore(t, dir);
  await store.saveRecord('jobs', 'j', { note: 'small' });
  const big = { note: 'x'.repeat(100_000) };
  await store.saveRecord('jobs', 'j', big);
  t.same(await onDisk(dir, 'j'), big);
  t.equal((await readRecords(dir, 'jobs')).length, 1, 'one record');
  const reloaded = await openStore(t, dir);
  t.same(await reloaded.loadRecords('jobs', () => true), [{ id: 'j', value: big }]);
});

t.test('two files holding one record (a crash while it moved): the newer version is kept, the other freed', async (t) => {
  const dir = await tmpDir(t);
  const store = await openStore(t, dir);
  await store.saveRecord('jobs', 'j', { version: 1 });
  const [name] = await recordFiles(dir);
  await fs.copyFile(path.join(dir, 'jobs', name!), path.join(dir, 'jobs', `copy${RECORD_FILE_SUFFIX}`));
  await store.saveRecord('jobs', 'j', { version: 2 });
  await store.close();
  const reloaded = await openStore(t, dir);
  t.same(await reloaded.loadRecords('jobs', () => true), [{ id: 'j', value: { version: 2 } }]);
  t.same(await readRecords(dir, 'jobs'), [{ id: 'j', value: { version: 2 } }], 'the older copy is free on disk');
});

t.test('records of older agents (<id>.json) are read, and moved into the pool at their next save', async (t) => {
  const dir = await tmpDir(t);
  await fs.mkdir(path.join(dir, 'jobs'), { recursive: true });
  await fs.writeFile(path.join(dir, 'jobs', 'old.json'), JSON.stringify({ version: 1 }));
  const store = await openStore(t, dir);
  t.same(await store.loadRecord('jobs', 'old', () => true), { version: 1 });
  await store.saveRecord('jobs', 'old', { version: 2 });
  t.notOk((await fs.readdir(path.join(dir, 'jobs'))).includes('old.json'), 'the old file is gone');
  t.same(await onDisk(dir, 'old'), { version: 2 });
  await fs.writeFile(path.join(dir, 'jobs', 'gone.json'), JSON.stringify({ version: 1 }));
  const again = await openStore(t, dir);
  await again.removeRecord('jobs', 'gone');
  t.same((await readRecords(dir, 'jobs')).map((r) => r.id), ['old'], 'an old record removed is gone too');
});

t.test('record files that are not whole are set aside; blank ones (a file being made) are spares', async (t) => {
  const dir = await tmpDir(t);
  await fs.mkdir(path.join(dir, 'jobs'), { recursive: true });
  await fs.writeFile(path.join(dir, 'jobs', `noise${RECORD_FILE_SUFFIX}`), Buffer.alloc(32 * 1024, 7));
  await fs.writeFile(path.join(dir, 'jobs', `blank${RECORD_FILE_SUFFIX}`), Buffer.alloc(32 * 1024));
  await fs.writeFile(path.join(dir, 'jobs', `short${RECORD_FILE_SUFFIX}`), Buffer.alloc(100));
  const store = await openStore(t, dir);
  t.same(store.quarantined.map((q) => [path.basename(q.file), q.reason]), [[`noise${RECORD_FILE_SUFFIX}`, 'neither slot is whole']]);
  t.same(await store.loadRecords('jobs', () => true), []);
  t.same(await recordFiles(dir), [`blank${RECORD_FILE_SUFFIX}`], 'the cut-short one is removed');
  await store.saveRecord('jobs', 'j', { version: 1 });
  t.same(await recordFiles(dir), [`blank${RECORD_FILE_SUFFIX}`], 'the spare took the new record');
});

t.test('a record not of the kind\'s shape is set aside when loaded', async (t) => {
  const dir = await tmpDir(t);
  const store = await openStore(t, dir);
  await store.saveRecord('jobs', 'j', [1, 2, 3]);
  await store.close();
  const reloaded = await openStore(t, dir);
  t.same(await reloaded.loadRecords('jobs', (v) => typeof v === 'object' && v !== null && !Array.isArray(v)), []);
  t.same(reloaded.quarantined.map((q) => q.reason), ['the record does not have the expected shape']);
  t.same(await readRecords(dir, 'jobs'), [], 'its file is no longer among the records');
});

t.test('stale temp files of an interrupted write are removed at start', async (t) => {
  const dir = await tmpDir(t);
  await openStore(t, dir);
  await fs.writeFile(path.join(dir, 'jobs', '.abc.json.123.tmp'), '{"half');
  await openStore(t, dir);
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
