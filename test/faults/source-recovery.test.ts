import t from 'tap';
import type { SourceJobRecord } from '../../src/migration/jobs.js';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { processMatches } from '../../src/qemu/process.js';
import { parseSerialLog } from '../../src/guest/image.js';
import { freePort, qemuRecords, spawnAgent, testGuest, waitFor, waitForJobEnd, tmpDir, type TestContext } from '../helpers/agents.js';

/**
 * Source agent A (held before QMP migrate) and destination B as processes, with guest `name`
 * running on A; `aArgs` restarts A without the hold.
 */
async function sourceHeldBeforeMigrate(t: TestContext, name: string) {
  const dir = await tmpDir(t);
  const aState = path.join(dir, 'a');
  const aArgs = { host: '127.0.0.2', port: await freePort('127.0.0.2'), stateDir: aState, allowPath: dir, extra: ['--migration-address', '127.0.0.2'] };
  const a = await spawnAgent(t, { ...aArgs, extra: [...aArgs.extra, '--debug-hold', 'before-migrate'] });
  const b = await spawnAgent(t, { host: '127.0.0.3', stateDir: path.join(dir, 'b'), allowPath: dir, extra: ['--migration-address', '127.0.0.3'] });
  const guest = await testGuest(dir, name);
  await a.client.define(guest.xml);
  await a.client.lifecycle(name, 'start');
  return { aState, aArgs, a, b, guest };
}

t.test('a guest paused before the migration stays paused when a restarted source rolls the migration back', async (t) => {
  const setUp = await sourceHeldBeforeMigrate(t, 'vm1');
  const { aState, aArgs, b, guest } = setUp;
  let { a } = setUp;
  await waitFor('guest progress', async () => (parseSerialLog(await fs.readFile(guest.serialLog, 'utf8').catch(() => '')).lastPass ?? 0) > 0);
  await a.client.lifecycle('vm1', 'suspend');
  await a.client.perform({ domain: 'vm1', destination: b.url, migrationId: 'paused-rollback' });
  await waitFor('source holding before migrate', () => fs.access(path.join(aState, 'hold.before-migrate')).then(() => true));
  await a.kill9();
  await fs.rm(path.join(aState, 'hold.before-migrate'), { force: true });
  a = await spawnAgent(t, aArgs);
  const job = (await waitForJobEnd(a.client, 'paused-rollback', 'source recovery', 30_000)) as SourceJobRecord;
  t.equal(job.status, 'failed');
  t.equal(job.error?.code, 'agent_restarted');
  t.equal(job.runningBeforeMigration, false, 'the job recorded the run state before the migration');
  const info = await a.client.domain('vm1');
  t.equal(info.state, 'paused', 'the guest is paused, as it was before the migration');
  await waitFor('no qemu on the destination', async () => (await qemuRecords(b.stateDir)).filter(processMatches).length === 0);
  t.same((await qemuRecords(aState)).filter(processMatches).length, 1, 'one copy, on the source');
  await a.client.lifecycle('vm1', 'destroy');
});

t.test('a cancel answered before the source agent died is honoured by its recovery', async (t) => {
  const setUp = await sourceHeldBeforeMigrate(t, 'vm2');
  const { aState, aArgs, b } = setUp;
  let { a } = setUp;
  await a.client.perform({ domain: 'vm2', destination: b.url, migrationId: 'cancel-restart' });
  await waitFor('source holding before migrate', () => fs.access(path.join(aState, 'hold.before-migrate')).then(() => true));
  t.equal((await a.client.cancel('cancel-restart')).cancelRequested, true, 'cancel answered');
  await a.kill9();
  await fs.rm(path.join(aState, 'hold.before-migrate'), { force: true });
  a = await spawnAgent(t, aArgs);
  const job = await waitForJobEnd(a.client, 'cancel-restart', 'source recovery', 30_000);
  t.equal(job.status, 'cancelled', 'the restarted agent carried out the cancel it had answered');
  t.equal(job.error?.code, 'cancelled');
  t.equal((await a.client.domain('vm2')).state, 'running', 'the guest runs on the source');
  await waitFor('no qemu on the destination', async () => (await qemuRecords(b.stateDir)).filter(processMatches).length === 0);
  await a.client.lifecycle('vm2', 'destroy');
});
