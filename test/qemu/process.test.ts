/** qemu processes on real qemu: launch, detachment, re-attach, kill by PID. */
import { execa } from 'execa';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import {
  attachQemu,
  killQemu,
  launchQemu,
  processMatches,
  QemuStartError,
  waitForExit,
  type QemuProcessRecord,
} from '../../src/qemu/process.js';
import { QmpTimeoutError } from '../../src/qemu/qmp.js';
import {
  fullArgv,
  GuestTracker,
  launchSpec,
  minimalArgv,
  procGroupAndSession,
  processesMentioning,
  rejection,
  tmpDir,
} from './helpers.js';

const guests = new GuestTracker();

function startTimeOf(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
}

t.test('launch: record, pidfile, QMP up, detached into its own session', async (t) => {
  const dir = await tmpDir(t);
  const { record, qmp } = await guests.launch(t, launchSpec(dir));
  t.equal(fs.readFileSync(record.pidfilePath, 'utf8').trim(), String(record.pid), 'the pid is the pidfile pid');
  t.equal(record.startTime, startTimeOf(record.pid));
  t.match(record, { binary: 'qemu-system-x86_64', qmpSocketPath: path.join(dir, 'qmp.sock') });
  t.ok(processMatches(record));
  t.match(await qmp.execute('query-status'), { status: 'prelaunch' });

  const ours = procGroupAndSession(process.pid);
  const its = procGroupAndSession(record.pid);
  t.not(its.pgrp, ours.pgrp, 'own process group: a signal to ours does not reach it');
  t.not(its.session, ours.session, 'own session: no controlling terminal of ours');
  t.equal(its.session, record.pid, 'qemu leads its session');

  const fds = fs.readdirSync(`/proc/${record.pid}/fd`).map((fd) => fs.readlinkSync(`/proc/${record.pid}/fd/${fd}`));
  t.ok(fds.includes('/dev/null'), 'stdin is /dev/null');
  t.ok(fds.includes(path.join(dir, 'qemu.log')), 'stdout/stderr go straight to the log file, not through us');
  t.match(fs.readFileSync(path.join(dir, 'qemu.log'), 'utf8'), /starting: qemu-system-x86_64 -S/);
  t.notOk(processMatches({ ...record, startTime: record.startTime + 1 }), 'same pid, other start time: not ours');
});

t.test('launch adds -pidfile and the QMP monitor when argv lacks them', async (t) => {
  const dir = await tmpDir(t);
  const { record, qmp } = await guests.launch(t, launchSpec(dir, minimalArgv()));
  t.match(await qmp.execute('query-status'), { status: 'prelaunch' });
  const cmdline = fs.readFileSync(`/proc/${record.pid}/cmdline`, 'utf8').split('\0');
  t.ok(cmdline.includes('-pidfile') && cmdline.includes(record.pidfilePath));

  const mismatch = await rejection(launchQemu({ ...launchSpec(dir), argv: [...minimalArgv(), '-pidfile', '/elsewhere.pid'] }));
  t.match(mismatch.message, /-pidfile \/elsewhere.pid/);
  const daemonize = await rejection(launchQemu({ ...launchSpec(dir), argv: [...minimalArgv(), '-daemonize'] }));
  t.match(daemonize.message, /-daemonize/);
});

t.test('launch clears a stale socket and pidfile, but never those of a live qemu', async (t) => {
  const dir = await tmpDir(t);
  const spec = launchSpec(dir);
  // What a SIGKILLed qemu leaves: a socket file nobody listens on, a pidfile naming a dead pid.
  fs.writeFileSync(spec.qmpSocketPath, '');
  fs.writeFileSync(spec.pidfilePath, '999999999\n');
  const { record } = await guests.launch(t, spec);
  t.ok(processMatches(record));

  const err = await rejection(launchQemu(spec));
  t.match(err.message, new RegExp(`qemu pid ${record.pid} is still running`));
  t.ok(fs.existsSync(spec.qmpSocketPath), "the live qemu's socket is untouched");
  const again = await attachQemu(record, { connectTimeoutMs: 200 }).catch((e: Error) => e);
  t.ok(again instanceof QmpTimeoutError, 'and its first client is still the one connected');
});

t.test('a qemu that fails to start: its error text, nothing left behind', async (t) => {
  const dir = await tmpDir(t);
  const spec = launchSpec(dir);

  const badOption = await rejection(launchQemu({ ...spec, argv: [...fullArgv(dir), '-no-such-option'] }));
  t.ok(badOption instanceof QemuStartError);
  t.match(badOption.message, /exited during startup \(exit code 1\).*-no-such-option: invalid option/s);

  // qemu binds its QMP socket before opening disks, and leaves the socket file when it fails.
  const badDisk = await rejection(launchQemu({ ...spec, argv: [...fullArgv(dir), '-drive', `file=${dir}/missing.img,if=ide`] }));
  t.match(badDisk, { name: 'QemuStartError', logTail: /Could not open '.*missing.img'/ });
  t.notOk(fs.existsSync(spec.qmpSocketPath), 'socket removed');
  t.notOk(fs.existsSync(spec.pidfilePath), 'pidfile removed');
  t.same(processesMentioning(dir), [], 'no process of this launch is alive');

  const noBinary = await rejection(launchQemu({ ...spec, binary: path.join(dir, 'no-such-qemu') }));
  t.match(noBinary, { name: 'QemuStartError', message: /could not start .*ENOENT/ });
});

t.test('a start that never brings QMP up is killed by PID', async (t) => {
  const dir = await tmpDir(t);
  const marker = path.join(dir, 'fake.pid');
  // A stand-in "qemu" that records its pid and then hangs without opening any socket.
  const spec = { ...launchSpec(dir), binary: '/bin/sh', argv: ['-c', `echo $$ > ${marker}; exec sleep 60`], startTimeoutMs: 500 };
  const err = await rejection(launchQemu(spec));
  t.ok(err instanceof QemuStartError);
  t.match(err.message, /within 500 ms/);
  const pid = Number(fs.readFileSync(marker, 'utf8'));
  t.throws(() => process.kill(pid, 0), { code: 'ESRCH' }, `stand-in pid ${pid} is gone`);
});

t.test('killQemu: SIGTERM, QMP quit, SIGKILL after the grace time; files removed', async (t) => {
  const dir1 = await tmpDir(t);
  const a = await guests.launch(t, launchSpec(dir1));
  await killQemu(a.record, { graceMs: 5000 });
  t.notOk(processMatches(a.record), 'SIGTERM: gone');
  t.notOk(fs.existsSync(a.record.qmpSocketPath) || fs.existsSync(a.record.pidfilePath), 'socket and pidfile removed');
  t.ok(await waitForExit(a.record, 0), 'waitForExit is immediate for a dead qemu');
  await killQemu(a.record);
  t.pass('killing a dead qemu again is a no-op');

  const b = await guests.launch(t, launchSpec(await tmpDir(t)));
  const shutdown = b.qmp.waitForEvent('SHUTDOWN', { timeoutMs: 5000 });
  await killQemu(b.record, { qmp: b.qmp, graceMs: 5000 });
  t.match((await shutdown).data, { reason: 'host-qmp-quit' }, 'asked via QMP quit');
  await b.qmp.closed;
  t.notOk(processMatches(b.record));

  // A stopped process cannot act on SIGTERM: only the SIGKILL after the grace time ends it.
  const c = await guests.launch(t, launchSpec(await tmpDir(t)));
  process.kill(c.record.pid, 'SIGSTOP');
  const started = Date.now();
  await killQemu(c.record, { graceMs: 300 });
  t.ok(Date.now() - started >= 290, 'waited the grace time');
  t.notOk(processMatches(c.record), 'SIGKILL: gone');
  t.notOk(fs.existsSync(c.record.qmpSocketPath), 'socket removed after SIGKILL');
});

t.test('killing an old record spares a newer qemu on the same paths', async (t) => {
  const spec = launchSpec(await tmpDir(t));
  const old = await guests.launch(t, spec);
  process.kill(old.record.pid, 'SIGKILL');
  t.ok(await waitForExit(old.record, 5000));
  const fresh = await guests.launch(t, spec);
  await killQemu(old.record);
  t.ok(fs.existsSync(spec.qmpSocketPath) && fs.existsSync(spec.pidfilePath), "the new qemu's socket and pidfile stay");
  t.ok(processMatches(fresh.record));
  await fresh.qmp.close();
  t.ok(await attachQemu(fresh.record, { connectTimeoutMs: 2000 }).then((c) => c?.close().then(() => true)), 'still reachable');
});

t.test('processMatches refuses dead pids, reused pids and nonsense', async (t) => {
  const { record } = await guests.launch(t, launchSpec(await tmpDir(t)));
  t.notOk(processMatches({ ...record, startTime: record.startTime - 1 }), 'wrong start time');
  t.notOk(processMatches({ ...record, pid: 999_999_999 }), 'no such pid');
  // Never pid 0/-1: they would address process groups (and this very test) if ever signalled.
  for (const pid of [0, -1, 1, Number.NaN, 1.5]) t.notOk(processMatches({ ...record, pid }), `pid ${pid}`);
  t.notOk(await waitForExit(record, 100), 'waitForExit: false while it runs');
  process.kill(record.pid, 'SIGKILL');
  t.ok(await waitForExit(record, 5000));
  t.notOk(processMatches(record), 'dead pid');
  t.equal(await attachQemu(record), null, 'attach to a dead qemu: null');
});

t.test('attachQemu: a new client once the first has closed', async (t) => {
  const { record, qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  await qmp.execute('cont');
  await qmp.close();
  const again = await attachQemu(record, { connectTimeoutMs: 5000 });
  t.ok(again, 'attached');
  t.teardown(() => again?.close());
  t.match(await again!.execute('query-status'), { status: 'running' }, 'the guest ran on meanwhile');
});

t.test('the guest outlives its launcher being SIGKILLed with its whole process group', async (t) => {
  const dir = await tmpDir(t);
  const moduleUrl = new URL('../../src/qemu/process.js', import.meta.url).href;
  const script = `
    const { launchQemu } = await import(${JSON.stringify(moduleUrl)});
    const { record } = await launchQemu(${JSON.stringify(launchSpec(dir))});
    process.stdout.write(JSON.stringify(record) + '\\n');
    setInterval(() => {}, 1000);`;
  // The launcher gets its own group so that we can kill the group without killing ourselves.
  const launcher = execa('node', ['--input-type=module', '-e', script], { detached: true, reject: false, buffer: false });
  const record = await new Promise<QemuProcessRecord>((resolve, reject) => {
    launcher.stdout!.once('data', (d: Buffer) => resolve(JSON.parse(d.toString()) as QemuProcessRecord));
    void launcher.then((r) => reject(new Error(`launcher ended: ${r.stderr ?? r.exitCode}`)));
  });
  guests.track(t, record);
  t.teardown(() => {
    try {
      process.kill(-launcher.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  });

  process.kill(-launcher.pid!, 'SIGKILL');
  const result = await launcher;
  t.equal(result.signal, 'SIGKILL', 'the launcher was killed');
  t.ok(processMatches(record), 'qemu still runs');
  const qmp = await attachQemu(record, { connectTimeoutMs: 5000 });
  t.ok(qmp, 're-attached after the launcher died');
  t.teardown(() => qmp?.close());
  t.match(await qmp!.execute('query-status'), { status: 'prelaunch' });
  await killQemu(record, { qmp: qmp!, graceMs: 5000 });
  t.notOk(processMatches(record));
});

guests.checkNoneLeft(t);
