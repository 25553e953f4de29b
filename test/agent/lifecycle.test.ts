import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { execa } from 'execa';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AgentHttpError } from '../../src/client.js';
import { processMatches } from '../../src/qemu/process.js';
import { readGuestCounters, parseSerialLog } from '../../src/guest/image.js';
import { qemuRecords, startAgent, testGuest, tmpDir, waitFor } from '../helpers/agents.js';

t.test('define, start, observe over QMP, destroy, undefine', async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a');
  const { client, app } = agent;
  const guest = await testGuest(dir, 'vm1');

  const defined = await client.define(guest.xml);
  t.equal(defined.state, 'shutoff');
  t.match(defined.machine, /^pc-i440fx-\d+\.\d+$/, 'alias machine type resolved at define time');
  const storedXml = await client.xml('vm1');
  t.match(storedXml, new RegExp(`machine=["']${defined.machine}["']`), 'resolved machine written into the stored XML');
  t.match(storedXml, /<uuid>[0-9a-f-]{36}<\/uuid>/, 'uuid filled in');
  t.same((await client.domains()).map((d) => d.name), ['vm1']);

  const started = await client.lifecycle('vm1', 'start');
  t.equal(started.state, 'running');
  t.ok(started.pid && started.pid > 0);

  // Over the agent's own QMP connection: the guest really runs and makes progress.
  const qmp = app.agent.domains.get('vm1').run!.qmp;
  const first = await waitFor('guest passes', async () => {
    const c = await readGuestCounters(qmp);
    return c.passes > 0 ? c : null;
  });
  const later = await waitFor('more passes', async () => {
    const c = await readGuestCounters(qmp);
    return c.passes > first.passes ? c : null;
  });
  t.equal(later.bootId, first.bootId, 'same boot');
  const serial = await waitFor('serial boot line', async () => {
    const parsed = parseSerialLog(await fs.readFile(guest.serialLog, 'utf8').catch(() => ''));
    return parsed.boots.length > 0 ? parsed : null;
  });
  t.equal(serial.boots.length, 1, 'booted once');

  // The state follows what qemu reports: pause it behind the agent's back.
  await qmp.execute('stop');
  const paused = await client.domain('vm1');
  t.equal(paused.state, 'paused');
  t.equal(paused.qemuStatus, 'paused');
  await qmp.execute('cont');
  t.equal((await client.domain('vm1')).state, 'running');

  await t.rejects(client.lifecycle('vm1', 'start'), { status: 409, code: 'domain_active' });
  await t.rejects(client.undefine('vm1'), { status: 409, code: 'domain_active' });
  await t.rejects(client.define(storedXml), { status: 409, code: 'domain_active' }, 'no redefinition while running');
  await t.rejects(client.define(guest.xml), { status: 409, code: 'domain_exists' }, 'same name, other (generated) uuid');

  const record = app.agent.domains.get('vm1').run!.record;
  const destroyed = await client.lifecycle('vm1', 'destroy');
  t.equal(destroyed.state, 'shutoff');
  t.equal(destroyed.reason, 'destroyed');
  t.notOk(processMatches(record), 'qemu process is gone');
  await t.rejects(fs.stat(record.qmpSocketPath), { code: 'ENOENT' }, 'QMP socket removed');
  await t.rejects(client.lifecycle('vm1', 'destroy'), { status: 409, code: 'domain_not_running' });

  await client.undefine('vm1');
  await t.rejects(client.domain('vm1'), { status: 404, code: 'domain_not_found' });
  t.same(await fs.readdir(`${agent.config.stateDir}/domains`), [], 'definition removed from disk');
});

t.test('a guest that dies on its own is reported crashed, not running', async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'vm2');
  await client.define(guest.xml);
  await client.lifecycle('vm2', 'start');
  const { pid } = app.agent.domains.get('vm2').run!.record;
  process.kill(pid, 'SIGKILL');
  const info = await waitFor('crash noticed', async () => {
    const d = await client.domain('vm2');
    return d.state === 'shutoff' ? d : null;
  });
  t.equal(info.reason, 'crashed');
  // It can be started again.
  t.equal((await client.lifecycle('vm2', 'start')).state, 'running');
  await client.lifecycle('vm2', 'destroy');
});

t.test('a qcow2 overlay boots from its backing file; the whole chain must lie under --allow-path', async (t) => {
  const dir = await tmpDir(t);
  const outside = await fs.mkdtemp(path.join(os.tmpdir(), 'kvm-migrate-test-outside-'));
  t.teardown(() => fs.rm(outside, { recursive: true, force: true }));
  const { client, app, config } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'vm4');
  const overlay = path.join(dir, 'vm4.qcow2');
  await execa('qemu-img', ['create', '-f', 'qcow2', '-b', guest.image, '-F', 'raw', overlay]);
  const overlayXml = guest.xml.replace("type='raw'", "type='qcow2'").replace(guest.image, overlay);

  await client.define(overlayXml);
  await client.lifecycle('vm4', 'start');
  const qmp = app.agent.domains.get('vm4').run!.qmp;
  const blocks = await qmp.execute<Array<{ inserted?: { image: { filename: string; 'backing-image'?: { filename: string } } } }>>('query-block');
  const image = blocks.find((b) => b.inserted)?.inserted?.image;
  // Both files reach qemu as descriptors the agent opened and checked, not as names it would open itself.
  // (qemu names an image whose backing node it was given by the json: form of both nodes.)
  t.match(image?.filename, /"filename": "\/dev\/fdset\/\d+"/, 'qemu runs the overlay the agent opened');
  t.match(image?.['backing-image']?.filename, /^\/dev\/fdset\/\d+$/, 'over the backing file the agent opened');
  const pid = app.agent.domains.get('vm4').run!.record.pid;
  const heldByQemu = await Promise.all((await fs.readdir(`/proc/${pid}/fd`)).map((fd) => fs.readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')));
  t.ok(heldByQemu.includes(overlay) && heldByQemu.includes(guest.image), 'qemu holds the overlay and the raw test image');
  const running = await waitFor('guest passes from the overlay', async () => {
    const c = await readGuestCounters(qmp);
    return c.passes > 0 ? c : null;
  });
  t.ok(running.bootId !== 0, 'the test guest booted from the backing file');
  await client.lifecycle('vm4', 'destroy');

  // Rebased (unsafely, as a user could) onto a file outside the roots: refused at start, nothing runs.
  const secret = path.join(outside, 'secret.raw');
  await fs.copyFile(guest.image, secret);
  await execa('qemu-img', ['rebase', '-u', '-b', secret, '-F', 'raw', overlay]);
  const atStart = (await client.lifecycle('vm4', 'start').catch((e: unknown) => e)) as AgentHttpError;
  t.equal(atStart.status, 400);
  t.equal(atStart.code, 'path_not_allowed');
  t.match(atStart.body.message, `backing file of ${overlay}`);
  t.match(String(atStart.body.element), /disk/, 'names the disk element');
  t.same((await qemuRecords(config.stateDir)).filter(processMatches), [], 'no qemu started');
  await client.undefine('vm4');

  // The same at define time, also through a symlink inside the root.
  await t.rejects(client.define(overlayXml), { status: 400, code: 'path_not_allowed' });
  await fs.symlink(secret, path.join(dir, 'link.raw'));
  await execa('qemu-img', ['rebase', '-u', '-b', 'link.raw', '-F', 'raw', overlay]);
  await t.rejects(client.define(overlayXml), { status: 400, code: 'path_not_allowed' }, 'a symlink out of the root');
  await execa('qemu-img', ['rebase', '-u', '-b', 'nbd://127.0.0.1:1/x', '-F', 'raw', overlay]);
  await t.rejects(client.define(overlayXml), { status: 400, code: 'image_protocol_refused' }, 'a network backing file');
  await execa('qemu-img', ['rebase', '-u', '-b', path.join(dir, 'missing.raw'), '-F', 'raw', overlay]);
  await t.rejects(client.define(overlayXml), { status: 400, code: 'path_not_found' }, 'a missing backing file');
  t.same(await client.domains(), [], 'nothing defined');
});

t.test('shutdown asks the guest (ACPI power button) and leaves it to the guest', async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'vm3');
  await client.define(guest.xml);
  await client.lifecycle('vm3', 'start');
  const qmp = app.agent.domains.get('vm3').run!.qmp;
  const powerdown = qmp.waitForEvent('POWERDOWN', { timeoutMs: 10_000 });
  const res = await client.call<{ state: string }>('POST', '/domains/vm3/shutdown');
  t.equal(res.state, 'running', 'the test guest has no ACPI handler: it keeps running');
  t.equal((await powerdown).event, 'POWERDOWN', 'qemu pressed the power button');
  await client.lifecycle('vm3', 'destroy');
});

t.test('errors are JSON with a code', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const err = (await client.domain('nope').catch((e: unknown) => e)) as AgentHttpError;
  t.equal(err.status, 404);
  t.equal(err.code, 'domain_not_found');
  const route = (await client.call('GET', '/nope').catch((e: unknown) => e)) as AgentHttpError;
  t.equal(route.status, 404);
  t.equal(route.code, 'route_not_found');
});

t.test('a qemu that refuses to start answers 422 qemu_start_failed with its message, and the domain keeps it', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'vm9');
  await client.define(guest.xml);
  // Another qemu (not this agent's) holds the image's write lock.
  const holder = spawn('qemu-system-x86_64', ['-S', '-nodefaults', '-display', 'none', '-machine', 'pc,accel=tcg', '-m', '16', '-drive', `file=${guest.image},format=raw,if=ide`], { stdio: 'ignore' });
  const holderExit = new Promise((r) => holder.once('exit', r));
  t.teardown(async () => {
    if (holder.exitCode === null && holder.signalCode === null) holder.kill('SIGKILL');
    await holderExit;
  });
  await waitFor('the other qemu to hold the image lock', async () => {
    const r = spawnSync('qemu-io', ['-f', 'raw', '-c', 'quit', guest.image], { encoding: 'utf8' });
    return /lock/i.test(r.stderr);
  }, { timeoutMs: 10_000 });
  const err = await client.lifecycle('vm9', 'start').catch((e: unknown) => e as AgentHttpError);
  t.ok(err instanceof AgentHttpError, 'refused');
  t.match(err, { status: 422, code: 'qemu_start_failed', body: { domain: 'vm9', qemuMessage: /lock/ } }, (err as Error).message);
  t.match(await client.domain('vm9'), { state: 'shutoff', reason: 'start_failed', reasonMessage: /lock/ }, 'the domain says why it is not running');
});

t.test("a guest's serial log is capped at --max-log-size; the guest writes on", async (t) => {
  const dir = await tmpDir(t);
  const cap = 8 * 1024;
  const { client } = await startAgent(t, dir, 'a', { maxLogBytes: cap, logCheckIntervalMs: 100 });
  const guest = await testGuest(dir, 'chatty', { fillMiB: 2, hotMiB: 0, reportEvery: 1 });
  await client.define(guest.xml);
  await client.lifecycle('chatty', 'start');
  const truncated = await waitFor('the log to be capped', async () => {
    const text = await fs.readFile(guest.serialLog, 'utf8');
    return /\[kvm-migrate: \d+ bytes truncated at the --max-log-size of 8192 bytes/.test(text) ? text : null;
  }, { timeoutMs: 60_000, intervalMs: 100 });
  const passAtCap = parseSerialLog(truncated).lastPass ?? -1;
  let largest = 0;
  for (let i = 0; i < 20; i++) {
    largest = Math.max(largest, (await fs.stat(guest.serialLog)).size);
    await new Promise((r) => setTimeout(r, 100));
  }
  t.ok(largest < cap + 16 * 1024, `it stays near the cap (largest seen ${largest} bytes)`);
  const after = parseSerialLog(await fs.readFile(guest.serialLog, 'utf8'));
  t.ok((after.lastPass ?? -1) > passAtCap, `the guest goes on writing (pass ${passAtCap} -> ${after.lastPass})`);
  t.equal((await client.domain('chatty')).state, 'running');
  await client.lifecycle('chatty', 'destroy');
});
