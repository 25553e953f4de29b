/** QmpClient against a real qemu. */
import t from 'tap';
import { QmpClient, QmpClosedError, QmpError, QmpTimeoutError, type QmpEvent } from '../../src/qemu/qmp.js';
import { waitForExit } from '../../src/qemu/process.js';
import { GuestTracker, launchSpec, rejection, tmpDir } from './helpers.js';

const guests = new GuestTracker();

interface Status { status: string; running: boolean }

t.test('greeting and basic queries', async (t) => {
  const { qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  t.equal(qmp.greeting.version.qemu.major, 7, 'greeting carries the qemu version');
  t.type(qmp.greeting.version.package, 'string');
  t.ok(Array.isArray(qmp.greeting.capabilities));

  t.match(await qmp.execute<Status>('query-status'), { status: 'prelaunch', running: false });
  const version = await qmp.execute<{ qemu: { major: number; minor: number; micro: number } }>('query-version');
  t.same(version.qemu, qmp.greeting.version.qemu, 'query-version agrees with the greeting');
  t.match(await qmp.hmp('info status'), /VM status: paused \(prelaunch\)/);
  t.notOk(qmp.isClosed);
});

t.test('large replies and many concurrent commands', async (t) => {
  const { qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  const schema = await qmp.execute<unknown[]>('query-qmp-schema');
  t.ok(JSON.stringify(schema).length > 100_000, 'query-qmp-schema spans many socket reads');

  const names = ['query-status', 'query-version', 'query-name', 'query-kvm', 'query-uuid'];
  const replies = await Promise.all(Array.from({ length: 50 }, (_, i) => qmp.execute(names[i % names.length]!)));
  replies.forEach((r, i) => {
    if (i % names.length === 0) t.match(r, { status: 'prelaunch' });
    if (i % names.length === 3) t.match(r, { present: Boolean });
  });
});

t.test('cont/stop: RESUME and STOP through waitForEvent and events()', async (t) => {
  const { qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  const stream = qmp.events(['RESUME', 'STOP']);
  const all: QmpEvent[] = [];
  const unsubscribe = qmp.onEvent((e) => all.push(e));

  // qemu sends RESUME before the reply to cont: waiting must start before the command.
  const resumed = qmp.waitForEvent('RESUME', { timeoutMs: 5000 });
  await qmp.execute('cont');
  const resume = await resumed;
  t.same(resume.data, {}, 'events without payload get an empty data object');
  t.type(resume.timestamp.seconds, 'number');
  t.match(await qmp.execute<Status>('query-status'), { status: 'running', running: true });

  const stopped = qmp.waitForEvent(['STOP', 'SHUTDOWN'], { timeoutMs: 5000 });
  await qmp.execute('stop');
  t.equal((await stopped).event, 'STOP');

  const first = await stream.next();
  const second = await stream.next();
  t.same([first.value?.event, second.value?.event], ['RESUME', 'STOP'], 'the stream saw both, in order');
  unsubscribe();
  t.same(all.map((e) => e.event), ['RESUME', 'STOP']);

  const powerdown = qmp.waitForEvent('POWERDOWN', { timeoutMs: 200 });
  const err = await rejection(powerdown);
  t.ok(err instanceof QmpTimeoutError, 'waitForEvent times out');
  t.equal((err as QmpTimeoutError).timeoutMs, 200);

  const ac = new AbortController();
  const aborted = qmp.waitForEvent('POWERDOWN', { timeoutMs: 5000, signal: ac.signal });
  ac.abort(new Error('no longer needed'));
  t.equal((await rejection(aborted)).message, 'no longer needed', 'an abort rejects with its reason');

  const predicate = qmp.waitForEvent('RESUME', { timeoutMs: 5000, predicate: (e) => e.timestamp.seconds > 0 });
  await qmp.execute('cont');
  t.equal((await predicate).event, 'RESUME');
});

t.test('QEMU errors carry their class; the connection stays usable', async (t) => {
  const { qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  const notFound = await rejection(qmp.execute('no-such-command'));
  t.ok(notFound instanceof QmpError);
  t.match(notFound, { errorClass: 'CommandNotFound', command: 'no-such-command', desc: /no-such-command/ });
  t.match(notFound.message, /CommandNotFound/);

  const noDevice = await rejection(qmp.execute('device_del', { id: 'nope' }));
  t.ok(noDevice instanceof QmpError);
  t.match((noDevice as QmpError).errorClass, /^(DeviceNotFound|GenericError)$/);

  const badArgs = await rejection(qmp.execute('query-status', { bogus: 1 }));
  t.match(badArgs, { errorClass: 'GenericError' });

  t.match(await qmp.execute<Status>('query-status'), { status: 'prelaunch' });
});

t.test('a command timeout leaves the connection usable; the late reply is ignored', async (t) => {
  const { record, qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  // A stopped (SIGSTOP) qemu cannot answer: a deterministic slow command.
  process.kill(record.pid, 'SIGSTOP');
  t.teardown(() => {
    try {
      process.kill(record.pid, 'SIGCONT');
    } catch {
      // already gone
    }
  });
  const err = await rejection(qmp.execute('query-status', undefined, { timeoutMs: 150 }));
  t.ok(err instanceof QmpTimeoutError);
  t.match(err, { command: 'query-status', timeoutMs: 150 });

  process.kill(record.pid, 'SIGCONT');
  // The late reply to the timed-out command arrives first and must not be taken for this one.
  t.match(await qmp.execute('query-version'), { qemu: { major: 7 } });
  t.notOk(qmp.isClosed);
});

t.test('quit: SHUTDOWN event, closed resolves, everything pending ends', async (t) => {
  const { record, qmp } = await guests.launch(t, launchSpec(await tmpDir(t)));
  const stream = qmp.events();
  const waiting = qmp.waitForEvent('RESUME', { timeoutMs: 10_000 });
  const shutdown = qmp.waitForEvent('SHUTDOWN', { timeoutMs: 5000 });
  await qmp.execute('quit');
  t.match((await shutdown).data, { guest: false, reason: 'host-qmp-quit' });
  await qmp.closed;
  t.ok(qmp.isClosed);

  t.ok((await rejection(waiting)) instanceof QmpClosedError, 'a pending waitForEvent rejects');
  t.ok((await rejection(qmp.execute('query-status'))) instanceof QmpClosedError, 'execute after close rejects');
  t.ok((await rejection(qmp.waitForEvent('STOP', { timeoutMs: 100 }))) instanceof QmpClosedError);
  const seen: string[] = [];
  for await (const e of stream) seen.push(e.event);
  t.same(seen, ['SHUTDOWN'], 'the stream delivers what came, then ends');
  t.same(await qmp.events().next(), { value: undefined, done: true }, 'a stream opened after close is empty');
  t.ok(await waitForExit(record, 5000), 'qemu exited');
});

t.test('close() drops the connection but not qemu; breaking out of events() unsubscribes', async (t) => {
  const dir = await tmpDir(t);
  const { qmp } = await guests.launch(t, launchSpec(dir));
  const stream = qmp.events('RESUME');
  const resumed = (async () => {
    for await (const e of stream) return e.event; // break via return
    return 'ended';
  })();
  await qmp.execute('cont');
  t.equal(await resumed, 'RESUME');
  t.same(await stream.next(), { value: undefined, done: true }, 'the stream is finished after the loop left');

  const inFlight = qmp.execute('query-status');
  await qmp.close();
  t.ok((await rejection(inFlight)) instanceof QmpClosedError, 'an in-flight command rejects on close');

  // qemu accepts the next client once the first has gone.
  const again = await QmpClient.connect(launchSpec(dir).qmpSocketPath, { connectTimeoutMs: 5000 });
  t.teardown(() => again.close());
  t.match(await again.execute<Status>('query-status'), { status: 'running' });
});

guests.checkNoneLeft(t);
