/**
 * QmpClient against a scripted unix-socket server, for what real qemu will not do on demand:
 * replies split anywhere, several messages per chunk, replies out of order, no reply at all,
 * garbage, a missing greeting.
 */
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import t from 'tap';
import type { Test } from 'tap';
import { QmpClient, QmpClosedError, QmpError, QmpTimeoutError, type QmpEvent } from '../../src/qemu/qmp.js';
import { rejection, tmpDir } from './helpers.js';

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}\r\n';

interface Command { execute: string; arguments?: Record<string, unknown>; id?: unknown }
type Handler = (cmd: Command, conn: net.Socket) => void;

/** A QMP server that greets, accepts qmp_capabilities and hands every other command to `handler`. */
async function fakeServer(t: Test, handler: Handler, opts: { greet?: boolean; listenAfterMs?: number } = {}) {
  const socketPath = path.join(await tmpDir(t), 'fake.sock');
  const conns = new Set<net.Socket>();
  const server = net.createServer((conn) => {
    conns.add(conn);
    conn.on('close', () => conns.delete(conn));
    conn.on('error', () => undefined);
    if (opts.greet !== false) conn.write(GREETING);
    let buf = '';
    conn.on('data', (d) => {
      buf += d.toString();
      let nl: number;
      while ((nl = buf.indexOf('\n')) !== -1) {
        const cmd = JSON.parse(buf.slice(0, nl)) as Command;
        buf = buf.slice(nl + 1);
        if (cmd.execute === 'qmp_capabilities') conn.write(reply(cmd.id, {}));
        else handler(cmd, conn);
      }
    });
  });
  const listen = () => new Promise<void>((resolve) => server.listen(socketPath, resolve));
  if (opts.listenAfterMs === undefined) await listen();
  else setTimeout(() => void listen(), opts.listenAfterMs);
  t.teardown(async () => {
    for (const c of conns) c.destroy();
    await new Promise((resolve) => server.close(resolve));
  });
  return { socketPath, conns };
}

function reply(id: unknown, ret: unknown): string {
  return JSON.stringify({ return: ret, id }) + '\r\n';
}

function event(name: string, data?: Record<string, unknown>): string {
  return JSON.stringify({ timestamp: { seconds: 1, microseconds: 2 }, event: name, ...(data ? { data } : {}) }) + '\r\n';
}

async function client(t: Test, socketPath: string, opts = {}): Promise<QmpClient> {
  const c = await QmpClient.connect(socketPath, { connectTimeoutMs: 2000, ...opts });
  t.teardown(() => c.close());
  return c;
}

t.test('replies split at every byte, several messages per chunk, events in between', async (t) => {
  let writing = Promise.resolve();
  const { socketPath } = await fakeServer(t, (cmd, conn) => {
    const big = 'x'.repeat(200_000);
    const text = event('BEFORE', { n: cmd.arguments?.n, s: 'é€' }) + reply(cmd.id, { echo: cmd.arguments?.n, big }) + event('AFTER');
    const bytes = Buffer.from(text);
    // For the first command: its head byte by byte (splitting the multi-byte characters too),
    // then the rest in one write that carries the end of a reply and a whole event.
    writing = writing.then(async () => {
      if (cmd.arguments?.n === 1) {
        for (let i = 0; i < 300; i++) {
          conn.write(bytes.subarray(i, i + 1));
          await sleep(0);
        }
        conn.write(bytes.subarray(300));
      } else {
        conn.write(bytes);
      }
    });
  });
  const c = await client(t, socketPath);
  const events: QmpEvent[] = [];
  c.onEvent((e) => events.push(e));
  const [a, b] = await Promise.all([
    c.execute<{ echo: number; big: string }>('big', { n: 1 }),
    c.execute<{ echo: number; big: string }>('big', { n: 2 }),
  ]);
  t.equal(a.echo, 1);
  t.equal(b.echo, 2);
  t.equal(a.big.length, 200_000);
  await sleep(20);
  t.same(events.map((e) => e.event), ['BEFORE', 'AFTER', 'BEFORE', 'AFTER']);
  t.same(events.map((e) => e.data.n), [1, undefined, 2, undefined]);
  t.equal(events[0]!.data.s, 'é€', 'multi-byte characters survive being split across chunks');
  t.same(events[1]!.data, {}, 'events without data get an empty object');
});

t.test('out-of-order replies reach their own commands', async (t) => {
  const held: Command[] = [];
  const { socketPath } = await fakeServer(t, (cmd, conn) => {
    held.push(cmd);
    if (held.length === 3) for (const h of held.reverse()) conn.write(reply(h.id, h.execute));
  });
  const c = await client(t, socketPath);
  t.same(await Promise.all([c.execute('one'), c.execute('two'), c.execute('three')]), ['one', 'two', 'three']);
});

t.test('error replies become QmpError', async (t) => {
  const { socketPath } = await fakeServer(t, (cmd, conn) =>
    conn.write(JSON.stringify({ error: { class: 'DeviceNotFound', desc: "Device 'x' not found" }, id: cmd.id }) + '\n'),
  );
  const c = await client(t, socketPath);
  const err = await rejection(c.execute('device_del', { id: 'x' }));
  t.ok(err instanceof QmpError);
  t.match(err, { errorClass: 'DeviceNotFound', command: 'device_del', desc: "Device 'x' not found" });
});

t.test('a command without reply times out; the late reply is dropped; the connection lives', async (t) => {
  let late: (() => void) | undefined;
  const { socketPath } = await fakeServer(t, (cmd, conn) => {
    if (cmd.execute === 'hang') late = () => conn.write(reply(cmd.id, 'late'));
    else conn.write(reply(cmd.id, cmd.execute));
  });
  const c = await client(t, socketPath, { commandTimeoutMs: 100 });
  const started = Date.now();
  const err = await rejection(c.execute('hang'));
  t.ok(err instanceof QmpTimeoutError, 'the default command timeout applies');
  t.match(err, { command: 'hang', timeoutMs: 100 });
  t.ok(Date.now() - started >= 90);

  late!();
  t.equal(await c.execute('next'), 'next', 'the late reply is not mistaken for the next command');
  t.notOk(c.isClosed);
  t.equal(await c.execute('again', undefined, { timeoutMs: 1000 }), 'again');
});

t.test('the server going away rejects pending commands and resolves closed', async (t) => {
  const { socketPath, conns } = await fakeServer(t, () => undefined);
  const c = await client(t, socketPath);
  const pending = c.execute('hang');
  const waiting = c.waitForEvent('X', { timeoutMs: 5000 });
  const stream = c.events();
  for (const conn of conns) conn.destroy();
  await c.closed;
  t.ok(c.isClosed);
  t.ok((await rejection(pending)) instanceof QmpClosedError);
  t.ok((await rejection(waiting)) instanceof QmpClosedError);
  t.same(await stream.next(), { value: undefined, done: true });
});

t.test('garbage from the server closes the connection', async (t) => {
  const { socketPath } = await fakeServer(t, (_cmd, conn) => conn.write('this is not json\n'));
  const c = await client(t, socketPath);
  const err = await rejection(c.execute('anything'));
  t.ok(err instanceof QmpClosedError);
  t.match(String((err as Error).cause), /unparsable QMP message/);
  await c.closed;
});

t.test('connect retries until the socket appears', async (t) => {
  const { socketPath } = await fakeServer(t, (cmd, conn) => conn.write(reply(cmd.id, 'ok')), { listenAfterMs: 300 });
  const c = await client(t, socketPath);
  t.equal(c.greeting.version.package, 'fake');
  t.equal(await c.execute('x'), 'ok');
});

t.test('connect gives up: no socket, or no greeting', async (t) => {
  const missing = path.join(await tmpDir(t), 'none.sock');
  const started = Date.now();
  const noSocket = await rejection(QmpClient.connect(missing, { connectTimeoutMs: 300 }));
  t.ok(noSocket instanceof QmpTimeoutError);
  t.match(noSocket, { command: 'connect', timeoutMs: 300, message: /ENOENT/ });
  t.ok(Date.now() - started < 3000, 'gives up around its timeout');

  const { socketPath } = await fakeServer(t, () => undefined, { greet: false });
  const noGreeting = await rejection(QmpClient.connect(socketPath, { connectTimeoutMs: 300 }));
  t.ok(noGreeting instanceof QmpTimeoutError);
  t.match(noGreeting, { command: 'greeting', message: /another client/ });

  const ac = new AbortController();
  setTimeout(() => ac.abort(new Error('stop trying')), 100);
  const aborted = await rejection(QmpClient.connect(missing, { connectTimeoutMs: 5000, signal: ac.signal }));
  t.equal(aborted.message, 'stop trying', 'connect can be aborted');
});

t.test('a throwing listener or predicate does not break the reader', async (t) => {
  const { socketPath } = await fakeServer(t, (cmd, conn) => conn.write(event('E', { v: 1 }) + reply(cmd.id, 'ok')));
  const c = await client(t, socketPath);
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(w.message);
  process.on('warning', onWarning);
  t.teardown(() => void process.off('warning', onWarning));
  c.onEvent(() => {
    throw new Error('listener bug');
  });
  const bad = c.waitForEvent('E', {
    timeoutMs: 1000,
    predicate: () => {
      throw new Error('predicate bug');
    },
  });
  const good = c.waitForEvent('E', { timeoutMs: 1000, predicate: (e) => e.data.v === 1 });
  t.equal(await c.execute('x'), 'ok');
  t.equal((await rejection(bad)).message, 'predicate bug');
  t.equal((await good).event, 'E');
  await sleep(10);
  t.match(warnings, [/listener bug/]);
});
