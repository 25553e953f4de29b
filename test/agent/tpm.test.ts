// A guest's <tpm> on real qemu and real swtpm: swtpm runs as the guest's qemu user before qemu
// and ends with it however qemu goes; the TPM's state lives in STATE_DIR/tpm/<uuid>/, made at
// the first start (manufactured by swtpm_setup), kept across starts, removed at undefine. The
// state is read with swtpm and tpm2-tools themselves, on a swtpm of the test's own.
import { spawn, spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { AgentHttpError } from '../../src/client.js';
import { processMatches } from '../../src/qemu/process.js';
import { killSwtpm, launchSwtpm } from '../../src/qemu/swtpm.js';
import { readSwtpmRecords } from '../../src/store/state-store.js';
import { freePort, spawnAgent, startAgent, tmpDir, waitFor } from '../helpers/agents.js';
import { NV_INDEX, nvWrite, tpmGuest, uidOf, withStateTpm } from '../helpers/tpm.js';

t.test('a guest with a tpm-crb: swtpm as its qemu user, query-tpm, destroy ends swtpm, the state survives a restart, undefine removes it', async (t) => {
  const dir = await tmpDir(t);
  const { client, app, config } = await startAgent(t, dir, 'a');
  const { xml } = await tpmGuest(dir, 'tpm1');
  const { uuid } = await client.define(xml);
  t.match(await client.xml('tpm1'), /<tpm model='tpm-crb'>\s*<backend type='emulator' version='2.0'\/>\s*<\/tpm>/, 'stored as libvirt writes it back');

  await client.lifecycle('tpm1', 'start');
  const run = app.agent.domains.get('tpm1').run!;
  const swtpm = run.swtpm!;
  t.ok(swtpm && processMatches(swtpm), 'swtpm runs');
  t.equal(await uidOf(swtpm.pid), await uidOf(run.record.pid), "as the guest's qemu user");
  t.not(await uidOf(swtpm.pid), 0, 'which is not root');
  t.same(await run.qmp.execute('query-tpm'), [{ model: 'tpm-crb', id: 'tpm-tpm0', options: { type: 'emulator', data: { chardev: 'chrtpm' } } }], 'qemu has the emulator TPM');
  const tpmDir = path.join(config.stateDir, 'tpm', uuid);
  const stateDir = path.join(tpmDir, 'tpm2');
  const st = await fs.stat(stateDir);
  t.equal(st.mode & 0o777, 0o700, 'the state directory is 0700');
  t.equal(st.uid, await uidOf(swtpm.pid), "and swtpm's");
  t.ok((await fs.stat(path.join(stateDir, 'tpm2-00.permall'))).isFile(), 'swtpm_setup manufactured the TPM');

  await client.lifecycle('tpm1', 'destroy');
  t.notOk(processMatches(swtpm), 'destroy ended swtpm');
  await t.rejects(fs.lstat(swtpm.socketPath), { code: 'ENOENT' }, 'its socket is gone');
  t.equal((await fs.stat(stateDir)).uid, process.getuid!(), "the stopped TPM's state is the agent's again (its uid may be another guest's next)");

  // The TPM made at the first start is kept: its endorsement key, and a value written into its NV.
  const ek = await withStateTpm(stateDir, dir, (tool) => {
    nvWrite(tool, 'KMTPM-01');
    return tool(['tpm2_readpublic', '-c', '0x81010001']);
  });
  t.match(ek, /name: 000b/, 'the EK swtpm_setup created');
  await client.lifecycle('tpm1', 'start');
  const again = app.agent.domains.get('tpm1').run!.swtpm!;
  t.not(again.pid, swtpm.pid, 'a new swtpm');
  await client.lifecycle('tpm1', 'destroy');
  const after = await withStateTpm(stateDir, dir, (tool) => ({ nv: tool(['tpm2_nvread', NV_INDEX, '-C', 'o', '-s', '8']), ek: tool(['tpm2_readpublic', '-c', '0x81010001']) }));
  t.equal(after.nv, 'KMTPM-01', 'the NV value survived a stop and start');
  t.equal(after.ek, ek, 'the same TPM (not manufactured again)');

  await client.undefine('tpm1');
  await t.rejects(fs.stat(tpmDir), { code: 'ENOENT' }, 'undefine removed the TPM state');
});

t.test('a qemu that fails to start leaves no swtpm', async (t) => {
  const dir = await tmpDir(t);
  const { client, config } = await startAgent(t, dir, 'a');
  const { xml, image } = await tpmGuest(dir, 'tpm2');
  const { uuid } = await client.define(xml);
  // Another qemu holds the image's write lock, so the guest's qemu refuses to start.
  const holder = spawn('qemu-system-x86_64', ['-S', '-nodefaults', '-display', 'none', '-machine', 'pc,accel=tcg', '-m', '16', '-drive', `file=${image},format=raw,if=ide`], { stdio: 'ignore' });
  const holderExit = new Promise((r) => holder.once('exit', r));
  t.teardown(async () => {
    if (holder.exitCode === null && holder.signalCode === null) holder.kill('SIGKILL');
    await holderExit;
  });
  await waitFor('the other qemu to hold the image lock', async () => /lock/i.test(spawnSync('qemu-io', ['-f', 'raw', '-c', 'quit', image], { encoding: 'utf8' }).stderr), { timeoutMs: 10_000 });
  const swtpmsBefore = await swtpmsOf(config.stateDir);
  const err = await client.lifecycle('tpm2', 'start').catch((e: unknown) => e as AgentHttpError);
  t.match(err, { status: 422, code: 'qemu_start_failed' }, (err as Error).message);
  t.same(await swtpmsOf(config.stateDir), swtpmsBefore, 'no swtpm of this agent runs');
  await t.rejects(fs.lstat(path.join(config.stateDir, 'run', uuid, 'swtpm.sock')), { code: 'ENOENT' }, 'nor is its socket left');
  t.equal((await fs.stat(path.join(config.stateDir, 'tpm', uuid, 'tpm2'))).uid, process.getuid!(), 'the state is the agent\'s again');
});

t.test('an agent killed with SIGKILL re-attaches to the guest and its swtpm, and destroy still ends swtpm; an orphaned swtpm is reclaimed', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'state');
  const opts = { host: '127.0.0.1', stateDir, allowPath: dir };
  const first = await spawnAgent(t, opts);
  const { xml } = await tpmGuest(dir, 'tpm3');
  const { uuid } = await first.client.define(xml);
  await first.client.lifecycle('tpm3', 'start');
  const [swtpm] = await readSwtpmRecords(stateDir);
  t.ok(swtpm && processMatches(swtpm), 'swtpm runs and is recorded');
  await first.kill9();

  // What an agent that died between starting swtpm and writing its record leaves: a swtpm no record names.
  const orphanDir = path.join(stateDir, 'run', 'orphan-of-a-crash');
  await fs.mkdir(orphanDir, { recursive: true });
  await fs.mkdir(path.join(dir, 'orphan-state'));
  const orphan = await launchSwtpm({ version: '2.0', stateDir: path.join(dir, 'orphan-state'), socketPath: path.join(orphanDir, 'swtpm.sock'), pidfilePath: path.join(orphanDir, 'swtpm.pid'), logPath: path.join(dir, 'orphan.log') });
  t.teardown(() => killSwtpm(orphan));

  const second = await spawnAgent(t, { ...opts, port: await freePort('127.0.0.1') });
  t.match(await second.client.domain('tpm3'), { state: 'running' }, 're-attached');
  t.ok(processMatches(swtpm!), 'its swtpm still runs');
  t.notOk(processMatches(orphan), 'the orphaned swtpm was ended at start-up');
  await second.client.lifecycle('tpm3', 'destroy');
  t.notOk(processMatches(swtpm!), 'destroy by the restarted agent ended swtpm');
  t.same(await readSwtpmRecords(stateDir), [], 'no record is left');
  t.ok((await fs.stat(path.join(stateDir, 'tpm', uuid, 'tpm2'))).isDirectory(), 'the state stays with the defined domain');
});

/** pids of live swtpm processes whose command line is in this state directory. */
async function swtpmsOf(stateDir: string): Promise<number[]> {
  const pids: number[] = [];
  for (const pid of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.startsWith('swtpm\0') && cmdline.includes(stateDir)) pids.push(Number(pid));
  }
  return pids;
}
