import t from 'tap';
import path from 'node:path';
import { promises as fs, statSync } from 'node:fs';
import net from 'node:net';
import { killQemu, launchQemu, processMatches } from '../../src/qemu/process.js';
import { parseSerialLog } from '../../src/guest/image.js';
import { freePort, qemuRecords, spawnAgent, startAgent, testGuest, tmpDir, waitFor } from '../helpers/agents.js';

async function lastPass(serialLog: string): Promise<number> {
  return parseSerialLog(await fs.readFile(serialLog, 'utf8').catch(() => '')).lastPass ?? -1;
}

t.test('kill -9 the agent while a guest runs: the restarted agent re-attaches', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'state');
  const port = await freePort('127.0.0.1');
  const token = 'restart-test-token';
  const opts = { host: '127.0.0.1', port, stateDir, allowPath: dir, token };
  const first = await spawnAgent(t, opts);
  const guest = await testGuest(dir, 'vm1');
  await first.client.define(guest.xml);
  const started = await first.client.lifecycle('vm1', 'start');
  const [record] = await qemuRecords(stateDir);
  t.equal(record?.pid, started.pid, 'runtime record holds the pid');
  await waitFor('guest progress', async () => (await lastPass(guest.serialLog)) >= 0);

  await first.kill9();
  t.ok(processMatches(record!), 'the guest outlives its agent');
  const progressWhileDown = await lastPass(guest.serialLog);
  await waitFor('guest keeps running without an agent', async () => (await lastPass(guest.serialLog)) > progressWhileDown);

  const second = await spawnAgent(t, opts);
  const info = await second.client.domain('vm1');
  t.equal(info.state, 'running', 're-attached and running');
  t.equal(info.pid, started.pid, 'same qemu process');
  t.same(parseSerialLog(await fs.readFile(guest.serialLog, 'utf8')).boots.length, 1, 'never rebooted');

  // Still controllable: destroy through the new agent ends the same process.
  const destroyed = await second.client.lifecycle('vm1', 'destroy');
  t.equal(destroyed.state, 'shutoff');
  t.notOk(processMatches(record!), 'qemu ended by the restarted agent');
  t.same(await qemuRecords(stateDir), [], 'runtime record removed');
});

t.test('a guest that died while its agent was down is found shut off', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'state');
  const opts = { host: '127.0.0.1', stateDir, allowPath: dir };
  const first = await spawnAgent(t, opts);
  const guest = await testGuest(dir, 'vm2');
  await first.client.define(guest.xml);
  const { pid } = await first.client.lifecycle('vm2', 'start');
  await first.kill9();
  process.kill(pid!, 'SIGKILL');
  await waitFor('qemu gone', () => !fsExists(`/proc/${pid}`));
  const second = await spawnAgent(t, { ...opts, port: await freePort('127.0.0.1') });
  const info = await second.client.domain('vm2');
  t.equal(info.state, 'shutoff');
  t.same(await qemuRecords(stateDir), [], 'stale runtime record removed');
  t.equal((await second.client.lifecycle('vm2', 'start')).state, 'running', 'startable again');
  await second.client.lifecycle('vm2', 'destroy');
});

function fsExists(p: string): boolean {
  try {
    statSync(p);
    return true;
  } catch {
    return false;
  }
}

t.test('an orphaned qemu (started, but no runtime record written before a crash) is ended at start', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'state');
  const runDir = path.join(stateDir, 'run');
  await fs.mkdir(runDir, { recursive: true });
  const pidfile = path.join(runDir, '00000000-0000-4000-8000-00000000beef.pid');
  const { record } = await launchQemu({
    binary: 'qemu-system-x86_64',
    argv: ['-S', '-nodefaults', '-display', 'none', '-machine', 'pc,accel=tcg', '-m', '32', '-pidfile', pidfile],
    logPath: path.join(dir, 'orphan.log'),
    pidfilePath: pidfile,
    qmpSocketPath: path.join(runDir, '00000000-0000-4000-8000-00000000beef.qmp'),
  });
  t.teardown(() => killQemu(record, { graceMs: 100 }));
  t.ok(processMatches(record), 'orphan runs');
  const agent = await spawnAgent(t, { host: '127.0.0.1', stateDir, allowPath: dir });
  await waitFor('orphan ended', () => !processMatches(record));
  t.same(await fs.readdir(runDir), [], 'its pidfile and socket removed');
  t.same(await agent.client.domains(), []);
});

/** A client on a qemu's monitor that got the greeting and stays: qemu serves one client at a time. */
async function occupyMonitor(socketPath: string): Promise<net.Socket> {
  const socket = net.createConnection(socketPath);
  await new Promise<void>((resolve, reject) => {
    socket.once('data', () => resolve());
    socket.once('error', reject);
  });
  return socket;
}

t.test('a restart while monitors do not answer keeps the guests, reports them unreachable and attaches later', async (t) => {
  const dir = await tmpDir(t);
  const first = await startAgent(t, dir, 'a');
  for (const name of ['busy', 'stopped']) {
    await first.client.define((await testGuest(dir, name)).xml);
    await first.client.lifecycle(name, 'start');
  }
  const busy = first.app.agent.domains.find('busy')!.run!.record;
  const stopped = first.app.agent.domains.find('stopped')!.run!.record;
  await first.app.close();
  // Another client holds one monitor; the other qemu is stopped (a host too slow to answer).
  const blocker = await occupyMonitor(busy.qmpSocketPath);
  t.teardown(() => blocker.destroy());
  process.kill(stopped.pid, 'SIGSTOP');
  t.teardown(() => processMatches(stopped) && process.kill(stopped.pid, 'SIGCONT'));

  const startedAt = Date.now();
  const second = await startAgent(t, dir, 'a');
  t.equal((await second.client.call<{ status: string }>('GET', '/health')).status, 'ok');
  const startMs = Date.now() - startedAt;
  t.ok(startMs < 5000, `the agent answered /health ${startMs} ms after it was started (the monitors' 10 s timeouts are not waited for)`);
  t.ok(processMatches(busy) && processMatches(stopped), 'neither qemu was killed');
  t.same((await qemuRecords(second.config.stateDir)).map((r) => r.pid).sort(), [busy.pid, stopped.pid].sort(), 'their runtime records stay');
  for (const [name, rec] of [['busy', busy], ['stopped', stopped]] as const) {
    const info = await second.client.domain(name);
    t.equal(info.state, 'unreachable', `${name} is reported unreachable`);
    t.equal(info.pid, rec.pid, `${name}: the pid of its qemu`);
    await t.rejects(second.client.lifecycle(name, 'suspend'), { status: 503, code: 'domain_unreachable' }, `${name}: no action taken blind`);
    await t.rejects(second.client.lifecycle(name, 'start'), { status: 503, code: 'domain_unreachable' }, `${name}: no second qemu started`);
  }

  blocker.destroy();
  process.kill(stopped.pid, 'SIGCONT');
  for (const [name, rec] of [['busy', busy], ['stopped', stopped]] as const) {
    const info = await waitFor(`${name} re-attached`, async () => {
      const i = await second.client.domain(name);
      return i.state === 'running' ? i : null;
    }, { timeoutMs: 60_000, intervalMs: 250 });
    t.equal(info.pid, rec.pid, `${name}: the same qemu, running`);
    t.equal((await second.client.lifecycle(name, 'destroy')).state, 'shutoff', `${name}: controllable again`);
    t.notOk(processMatches(rec), `${name}: ended by the agent`);
  }
});

t.test('a guest whose monitor connection drops while its qemu does not answer is kept and attached to again, not ended', async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a');
  await agent.client.define((await testGuest(dir, 'dropped')).xml);
  await agent.client.lifecycle('dropped', 'start');
  const run = agent.app.agent.domains.find('dropped')!.run!;
  // A qemu too slow to greet a new connection (stopped), whose monitor connection is lost.
  process.kill(run.record.pid, 'SIGSTOP');
  t.teardown(() => processMatches(run.record) && process.kill(run.record.pid, 'SIGCONT'));
  await run.qmp.close();
  const info = await waitFor('the domain reported unreachable', async () => {
    const i = await agent.client.domain('dropped');
    return i.state === 'unreachable' ? i : null;
  }, { timeoutMs: 30_000, intervalMs: 250 });
  t.equal(info.pid, run.record.pid, 'the pid of its qemu');
  t.ok(processMatches(run.record), 'its qemu was not killed');
  await t.rejects(agent.client.lifecycle('dropped', 'suspend'), { status: 503, code: 'domain_unreachable' }, 'no action taken blind');

  process.kill(run.record.pid, 'SIGCONT');
  const back = await waitFor('re-attached', async () => {
    const i = await agent.client.domain('dropped');
    return i.state === 'running' ? i : null;
  }, { timeoutMs: 60_000, intervalMs: 250 });
  t.equal(back.pid, run.record.pid, 'the same qemu, running');
  t.equal((await agent.client.lifecycle('dropped', 'destroy')).state, 'shutoff', 'controllable again');
});
