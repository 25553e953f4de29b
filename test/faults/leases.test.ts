import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { processMatches } from '../../src/qemu/process.js';
import { portIsFree } from '../../src/migration/ports.js';
import { parseSerialLog } from '../../src/guest/image.js';
import { freePort, qemuRecords, spawnAgent, startAgent, testGuest, tmpDir, waitFor, waitForJobEnd } from '../helpers/agents.js';
import { sendPrepare2 } from '../helpers/migration.js';

t.test('lease: a prepared destination whose stream never starts ends its empty qemu', async (t) => {
  const dir = await tmpDir(t);
  const b = await startAgent(t, dir, 'b', { incomingTimeoutSeconds: 2 });
  const guest = await testGuest(dir, 'vm1');
  // A source that sends Prepare2 and then vanishes.
  const prepared = await sendPrepare2(b, 'lease-no-stream', guest.xml, { hostUuid: '00000000-0000-4000-8000-000000000001', hostname: 'gone' });
  const run = b.app.agent.domains.find('vm1')!.run!;
  t.equal((await b.client.domain('vm1')).state, 'incoming');
  const job = await waitForJobEnd(b.client, 'lease-no-stream', 'lease expiry', 20_000);
  t.equal(job.status, 'failed');
  t.equal(job.error?.code, 'incoming_timeout');
  t.notOk(processMatches(run.record), 'the empty qemu was ended');
  await t.rejects(b.client.domain('vm1'), { status: 404, code: 'domain_not_found' }, 'the transient incoming domain is forgotten');
  t.ok(await portIsFree('127.0.0.1', Number(prepared.uri.split(':').pop())), 'its port is free');
  t.same(await fs.readdir(path.join(b.config.stateDir, 'run')), [], 'no socket or pidfile left');
  const late = await b.client.call<{ outcome: string }>('POST', '/finish2', { migrationId: 'lease-no-stream', rc: 0, finishToken: prepared.finishToken });
  t.equal(late.outcome, 'aborted', 'a late Finish2 learns the recorded outcome');
  await t.rejects(b.client.call('POST', '/finish2', { migrationId: 'lease-no-stream', rc: 0 }), { status: 403, code: 'finish2_not_from_source' }, 'not without its finishToken');
});

t.test('lease: the stream ended but the source agent died before Finish2', async (t) => {
  const dir = await tmpDir(t);
  const token = 'lease-token';
  const aState = path.join(dir, 'a');
  const aPort = await freePort('127.0.0.2');
  const aArgs = { host: '127.0.0.2', port: aPort, stateDir: aState, allowPath: dir, token, extra: ['--migration-address', '127.0.0.2'] };
  let a = await spawnAgent(t, { ...aArgs, extra: [...aArgs.extra, '--debug-hold', 'before-finish2'] });
  const b = await spawnAgent(t, { host: '127.0.0.3', stateDir: path.join(dir, 'b'), allowPath: dir, token, extra: ['--migration-address', '127.0.0.3', '--incoming-timeout', '2'] });
  const guest = await testGuest(dir, 'vm2');
  await a.client.define(guest.xml);
  await a.client.lifecycle('vm2', 'start');
  await waitFor('guest progress', async () => (parseSerialLog(await fs.readFile(guest.serialLog, 'utf8').catch(() => '')).lastPass ?? 0) > 0);
  await a.client.perform({ domain: 'vm2', destination: b.url, migrationId: 'lease-no-finish' });
  await waitFor('stream completed, source holding', () => fs.access(path.join(aState, 'hold.before-finish2')).then(() => true));
  await a.kill9();
  // The destination's lease runs out: it ends its copy, and records that it did.
  const destJob = await waitForJobEnd(b.client, 'lease-no-finish', 'destination lease expiry', 20_000);
  t.equal(destJob.error?.code, 'incoming_timeout');
  t.same((await qemuRecords(b.stateDir)).filter(processMatches), [], 'no qemu on the destination');
  t.same((await qemuRecords(aState)).filter(processMatches).length, 1, 'the paused source copy is still there');
  // The source comes back, asks, learns "aborted", and resumes its copy: never zero, never two.
  await fs.rm(path.join(aState, 'hold.before-finish2'), { force: true });
  a = await spawnAgent(t, aArgs);
  const srcJob = await waitForJobEnd(a.client, 'lease-no-finish', 'source recovery', 30_000);
  t.equal(srcJob.status, 'failed');
  t.equal(srcJob.finish?.outcome, 'aborted');
  const info = await a.client.domain('vm2');
  t.equal(info.state, 'running', 'the source resumed its guest');
  const before = parseSerialLog(await fs.readFile(guest.serialLog, 'utf8')).lastPass ?? 0;
  const after = await waitFor('guest progress after resume', async () => {
    const s = parseSerialLog(await fs.readFile(guest.serialLog, 'utf8'));
    return (s.lastPass ?? 0) > before ? s : null;
  });
  t.equal(after.boots.length, 1, 'same guest, no reboot');
  await a.client.lifecycle('vm2', 'destroy');
});
