import t from 'tap';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { AgentClient, AgentHttpError } from '../../src/client.js';
import { qemuRecords, startAgent, TEST_TOKEN, testGuest, tmpDir } from '../helpers/agents.js';
import { runCli } from '../helpers/cli.js';

const TOKEN = 's3cret-token';

t.test('bad input is refused with the right status; nothing started, nothing stored', async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a', { token: TOKEN, bodyLimitBytes: 64 * 1024 });
  const { client, config } = agent;
  const outside = await fs.mkdtemp(path.join(dir, '..', 'kvm-migrate-test-outside-'));
  t.teardown(() => fs.rm(outside, { recursive: true, force: true }));
  const guest = await testGuest(dir, 'vm1');
  await fs.writeFile(path.join(outside, 'secret.img'), Buffer.alloc(512));
  await fs.symlink(path.join(outside, 'secret.img'), path.join(dir, 'link.img'));

  const withDisk = (file: string) => guest.xml.replace(guest.image, file);
  const cases: Array<{ what: string; body: string; status: number; code: RegExp; contentType?: string }> = [
    { what: 'DOCTYPE', body: `<!DOCTYPE domain [<!ENTITY x "y">]>${guest.xml}`, status: 400, code: /invalid_xml/ },
    { what: 'entity reference', body: guest.xml.replace('<name>vm1</name>', '<name>&x;</name>'), status: 400, code: /./ },
    { what: 'malformed XML', body: '<domain><name>vm1</name>', status: 400, code: /invalid_xml/ },
    { what: 'not a domain', body: '<network/>', status: 400, code: /./ },
    { what: 'bad name', body: guest.xml.replace('<name>vm1</name>', '<name>../../etc</name>'), status: 400, code: /./ },
    { what: 'too long name', body: guest.xml.replace('<name>vm1</name>', `<name>${'a'.repeat(65)}</name>`), status: 400, code: /./ },
    { what: 'bad uuid', body: guest.xml.replace('<name>vm1</name>', '<name>vm1</name><uuid>not-a-uuid</uuid>'), status: 400, code: /./ },
    { what: 'too little memory', body: guest.xml.replace(/<memory unit='MiB'>\d+<\/memory>/, "<memory unit='KiB'>1024</memory>"), status: 400, code: /./ },
    { what: 'too much memory', body: guest.xml.replace(/<memory unit='MiB'>\d+<\/memory>/, "<memory unit='PiB'>8</memory>"), status: 400, code: /./ },
    { what: 'zero vcpus', body: guest.xml.replace('<vcpu>1</vcpu>', '<vcpu>0</vcpu>'), status: 400, code: /./ },
    { what: 'too many vcpus', body: guest.xml.replace('<vcpu>1</vcpu>', '<vcpu>100000</vcpu>'), status: 400, code: /./ },
    { what: 'unknown device', body: guest.xml.replace('<devices>', "<devices><hostdev mode='subsystem' type='pci'/>"), status: 400, code: /unsupported/ },
    { what: 'raw qemu arguments', body: guest.xml.replace("<domain type='kvm'>", "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>").replace('</devices>', "</devices><qemu:commandline><qemu:arg value='-monitor'/></qemu:commandline>"), status: 400, code: /./ },
    { what: 'disk outside allow-path', body: withDisk(path.join(outside, 'secret.img')), status: 400, code: /path_not_allowed/ },
    { what: 'disk via .. escape', body: withDisk(path.join(dir, '..', path.basename(outside), 'secret.img')), status: 400, code: /path_not_allowed/ },
    { what: 'disk via symlink escape', body: withDisk(path.join(dir, 'link.img')), status: 400, code: /path_not_allowed/ },
    { what: 'relative disk path', body: withDisk('guest.img'), status: 400, code: /./ },
    { what: 'body too large', body: guest.xml.replace('<devices>', `<description>${'x'.repeat(70 * 1024)}</description><devices>`), status: 413, code: /body_too_large/ },
    { what: 'wrong content type', body: guest.xml, status: 415, code: /unsupported_media_type/, contentType: 'text/plain' },
  ];
  for (const c of cases) {
    const err = (await client.call('POST', '/domains', c.body, c.contentType ?? 'application/xml').catch((e: unknown) => e)) as AgentHttpError;
    t.ok(err instanceof AgentHttpError, `${c.what}: refused`);
    t.equal(err.status, c.status, `${c.what}: status ${c.status}`);
    t.match(err.code, c.code, `${c.what}: code ${err.code}`);
    t.type(err.body.message, 'string', `${c.what}: has a message`);
  }
  t.equal((await client.call<{ status: string }>('GET', '/health')).status, 'ok', 'agent healthy');
  t.same(await client.domains(), [], 'nothing defined');
  t.same(await fs.readdir(path.join(config.stateDir, 'domains')), [], 'nothing stored');
  t.same(await qemuRecords(config.stateDir), [], 'nothing started');

  // A refused element is named.
  const named = (await client.define(guest.xml.replace('<devices>', '<devices><smartcard mode="passthrough"/>')).catch((e: unknown) => e)) as AgentHttpError;
  t.match(String(named.body.element), /smartcard/, 'the refused element is named');

  // A misspelled option is refused by name, never dropped (the migration would run with defaults).
  await t.rejects(client.call('POST', '/perform', { domain: 'vm1', destination: 'http://127.0.0.1:1', bandwidht: 16, dowtnimeLimitMs: 300 }), {
    status: 400,
    code: 'unknown_property',
    message: 'unknown body properties: bandwidht, dowtnimeLimitMs',
    body: { unknownProperties: ['bandwidht', 'dowtnimeLimitMs'] },
  });
  await t.rejects(client.call('POST', '/jobs/x/resolve', { outcome: 'aborted', reason: 'r', force: true }), { status: 400, code: 'unknown_property', message: /force/ });

  // Bad request bodies on the JSON routes.
  await t.rejects(client.call('POST', '/perform', { domain: 'vm1' }), { status: 400, code: 'invalid_request' });
  await t.rejects(client.call('POST', '/perform', { domain: 'x;rm', destination: 'http://127.0.0.1:1' }), { status: 400, code: 'invalid_request' });
  await t.rejects(client.call('POST', '/finish2', { migrationId: 'nope', rc: 0 }), { status: 404, code: 'migration_not_found' });
});

t.test("a guest's files never reach into the agent's state or through a dangling symlink", async (t) => {
  const dir = await tmpDir(t);
  // The allow-path root (dir) contains the state directory (dir/a), as it may on a real host.
  const { client, config } = await startAgent(t, dir, 'a');
  const neighbour = await testGuest(dir, 'vm1');
  await client.define(neighbour.xml);
  await client.lifecycle('vm1', 'start');
  const qmpSocket = path.join(config.stateDir, 'run', (await client.domain('vm1')).uuid, 'qmp');
  await fs.access(qmpSocket);
  const guest = await testGuest(dir, 'vm2');
  const withSerial = (serial: string) => guest.xml.replace(/<serial type='file'>[\s\S]*?<\/serial>/, serial);
  const outside = await fs.mkdtemp(path.join(dir, '..', 'kvm-migrate-test-outside-'));
  t.teardown(() => fs.rm(outside, { recursive: true, force: true }));
  await fs.symlink(path.join(outside, 'cron-job'), path.join(dir, 'dangling.log'));
  await fs.symlink(path.join(dir, 'loop-b'), path.join(dir, 'loop-a'));
  await fs.symlink(path.join(dir, 'loop-a'), path.join(dir, 'loop-b'));
  const cases = [
    { what: "a serial chardev on the neighbour's QMP socket", xml: withSerial(`<serial type='unix'><source mode='connect' path='${qmpSocket}'/><target port='0'/></serial>`), code: 'path_not_allowed', message: /inside the agent's own state/ },
    { what: 'a serial log in the state dir', xml: withSerial(`<serial type='file'><source path='${path.join(config.stateDir, 'logs', 'x.log')}'/><target port='0'/></serial>`), code: 'path_not_allowed', message: /inside the agent's own state/ },
    { what: 'the disk of the job records', xml: guest.xml.replace(guest.image, path.join(config.stateDir, 'host.json')), code: 'path_not_allowed', message: /inside the agent's own state/ },
    { what: 'a serial log through a dangling symlink', xml: withSerial(`<serial type='file'><source path='${path.join(dir, 'dangling.log')}'/><target port='0'/></serial>`), code: 'path_dangling_symlink', message: /symlink to a file that does not exist/ },
    { what: 'a symlink loop', xml: withSerial(`<serial type='file'><source path='${path.join(dir, 'loop-a', 'x.log')}'/><target port='0'/></serial>`), code: 'path_unresolvable', message: /ELOOP/ },
    { what: 'a name too long', xml: withSerial(`<serial type='file'><source path='${path.join(dir, 'x'.repeat(300))}'/><target port='0'/></serial>`), code: 'path_unresolvable', message: /ENAMETOOLONG/ },
    { what: 'a file as a directory', xml: withSerial(`<serial type='file'><source path='${path.join(guest.image, 'x.log')}'/><target port='0'/></serial>`), code: 'path_unresolvable', message: /ENOTDIR/ },
  ];
  for (const c of cases) {
    await t.rejects(client.define(c.xml), { status: 400, code: c.code, message: c.message }, `${c.what}: refused`);
  }
  t.notOk(await fs.lstat(path.join(outside, 'cron-job')).catch(() => null), 'nothing was created through the link');

  // No file is written by one domain and named by another; a listening socket never replaces a file.
  const neighbourDisk = `<serial type='file'><source path='${neighbour.image}'/><target port='0'/></serial>`;
  await t.rejects(client.define(withSerial(neighbourDisk)), { status: 400, code: 'file_in_use', message: /also a disk of domain vm1/ }, "a serial log on the neighbour's disk");
  await t.rejects(client.define(guest.xml.replace(guest.image, neighbour.image)), { status: 400, code: 'file_in_use' }, "the neighbour's disk as a disk");
  await t.rejects(client.define(withSerial(`<serial type='file'><source path='${neighbour.serialLog}'/><target port='0'/></serial>`)), { status: 400, code: 'file_in_use', message: /serial file of domain vm1/ }, "the neighbour's serial log");
  const precious = path.join(dir, 'precious.txt');
  await fs.writeFile(precious, 'keep me');
  await t.rejects(client.define(withSerial(`<serial type='unix'><source mode='bind' path='${precious}'/><target port='0'/></serial>`)), { status: 400, code: 'path_not_a_socket' }, 'a listening socket over a file');
  t.equal(await fs.readFile(precious, 'utf8'), 'keep me', 'the file is untouched');
  await client.define(guest.xml);
  t.pass('its own files are its own');
  await client.lifecycle('vm1', 'destroy');
});

t.test('bounds: domains per agent, guests the host cannot hold, XML size', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a', { maxDomains: 2 });
  const vm1 = await testGuest(dir, 'vm1');
  await client.define(vm1.xml);
  await client.define((await testGuest(dir, 'vm2')).xml);
  await t.rejects(client.define((await testGuest(dir, 'vm3')).xml), { status: 409, code: 'too_many_domains', message: /--max-domains 2/ });
  const { uuid } = await client.domain('vm1');
  await client.define(vm1.xml.replace('<vcpu>1</vcpu>', `<uuid>${uuid}</uuid><vcpu>2</vcpu>`));
  t.pass('redefining one it holds is no new domain');
  await client.undefine('vm2');

  const meminfo = await fs.readFile('/proc/meminfo', 'utf8');
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(meminfo)![1]);
  const guest = await testGuest(dir, 'big');
  const withMemory = (k: number) => guest.xml.replace(/<memory unit='MiB'>\d+<\/memory>/, `<memory unit='KiB'>${k}</memory>`);
  await t.rejects(client.define(withMemory(Math.floor(os.totalmem() / 1024) + 1024 * 1024)), { status: 400, code: 'exceeds_host_memory', body: { element: '/domain/memory' } }, 'more than the host has: refused at define');
  const cpus = os.availableParallelism();
  await t.rejects(client.define(guest.xml.replace('<vcpu>1</vcpu>', `<vcpu>${cpus + 1}</vcpu>`)), { status: 400, code: 'exceeds_host_cpus', body: { element: '/domain/vcpu' }, message: new RegExp(`${cpus + 1} vCPUs exceed this host's ${cpus} CPUs`) });
  await client.define(guest.xml.replace('<vcpu>1</vcpu>', `<vcpu>${cpus}</vcpu>`));
  await client.undefine('big');
  const [total, available] = [kib('MemTotal'), kib('MemAvailable')];
  if (total - available > 512 * 1024) {
    await client.define(withMemory(Math.floor((total + available) / 2)));
    await t.rejects(client.lifecycle('big', 'start'), { status: 409, code: 'insufficient_host_memory' }, 'more than it has available: refused at start, no qemu started');
    t.same((await qemuRecords(path.join(dir, 'a'))).length, 0, 'nothing started');
  } else {
    t.comment('nearly all host memory is available: the start-time check cannot be provoked here');
  }
  const bulky = guest.xml.replace('<devices>', `<description>${'x'.repeat(300 * 1024)}</description><devices>`);
  await t.rejects(client.define(bulky), { status: 413, code: 'body_too_large' }, 'domain XML over 256 KiB is refused before it is parsed');
});

t.test('bearer token on every route but /health', async (t) => {
  const dir = await tmpDir(t);
  const { url } = await startAgent(t, dir, 'a', { token: TOKEN });
  const anonymous = new AgentClient(url);
  const wrong = new AgentClient(url, 'wrong-token');
  t.equal((await anonymous.call<{ status: string }>('GET', '/health')).status, 'ok', '/health is public');
  for (const [method, route] of [
    ['GET', '/host'],
    ['GET', '/domains'],
    ['POST', '/domains'],
    ['GET', '/jobs'],
    ['POST', '/prepare2'],
    ['POST', '/finish2'],
    ['POST', '/perform'],
    ['GET', '/documentation/json'],
  ] as const) {
    await t.rejects(anonymous.call(method, route, method === 'POST' ? {} : undefined), { status: 401, code: 'unauthorized' }, `${method} ${route} without token`);
    await t.rejects(wrong.call(method, route, method === 'POST' ? {} : undefined), { status: 401, code: 'unauthorized' }, `${method} ${route} wrong token`);
  }
  t.ok((await new AgentClient(url, TOKEN).host()).uuid, 'right token accepted');
});

/** One raw HTTP/1.1 exchange, to set the Host header and pace the body as a client may. */
function rawRequest(port: number, text: string, opts: { endAfterMs?: number } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => socket.write(text));
    let answer = '';
    socket.setEncoding('utf8');
    socket.on('data', (c: string) => (answer += c));
    socket.on('error', reject);
    socket.on('close', () => resolve(answer));
    const timer = setTimeout(() => socket.destroy(), opts.endAfterMs ?? 10_000);
    socket.on('close', () => clearTimeout(timer));
  });
}

t.test('DNS rebinding: a Host that is no name of the agent is refused', async (t) => {
  const dir = await tmpDir(t);
  const { app } = await startAgent(t, dir, 'a', { allowedHosts: ['agent-a.example'] });
  const port = (app.server.address() as net.AddressInfo).port;
  const ask = (host: string) => rawRequest(port, `GET /domains HTTP/1.1\r\nHost: ${host}\r\nAuthorization: Bearer ${TEST_TOKEN}\r\nConnection: close\r\n\r\n`);
  for (const host of ['attacker.example', `attacker.example:${port}`, 'localhost.attacker.example', '127.0.0.1.nip.example']) {
    const answer = await ask(host);
    t.match(answer, /^HTTP\/1\.1 403 /, `Host ${host}: 403`);
    t.match(answer, /"code":"host_not_allowed"/, 'with its code');
  }
  for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, 'localhost', `[::1]:${port}`, `agent-a.example:${port}`, `${os.hostname()}:${port}`]) {
    t.match(await ask(host), /^HTTP\/1\.1 200 /, `Host ${host}: served`);
  }
  t.match(await rawRequest(port, 'GET /health HTTP/1.0\r\n\r\n'), /^HTTP\/1\.1 403 /, 'no Host at all: refused');
});

t.test('a request body that never completes is cut off', async (t) => {
  const dir = await tmpDir(t);
  const { app, client } = await startAgent(t, dir, 'a', { requestTimeoutMs: 1000 });
  const port = (app.server.address() as net.AddressInfo).port;
  const started = Date.now();
  const answer = await rawRequest(port, `POST /domains HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${TEST_TOKEN}\r\nContent-Type: application/xml\r\nContent-Length: 1000\r\n\r\n<domain>`, { endAfterMs: 15_000 });
  const took = Date.now() - started;
  t.match(answer, /^HTTP\/1\.1 408 /, 'answered 408 Request Timeout');
  t.ok(took >= 900 && took < 5000, `after ${took} ms`);
  const headersOnly = await rawRequest(port, `GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n`, { endAfterMs: 15_000 });
  t.match(headersOnly, /^HTTP\/1\.1 408 /, 'headers that never end: 408 too');
  t.equal((await client.call<{ status: string }>('GET', '/health')).status, 'ok', 'the agent serves on');
});

t.test('no agent runs without an operator token, loopback included', async (t) => {
  const dir = await tmpDir(t);
  for (const listenHost of ['127.0.0.1', '0.0.0.0']) {
    await t.rejects(startAgent(t, dir, 'a', { listenHost, migrationAddress: '127.0.0.1', token: undefined }), /an agent needs an operator token: --token-file FILE/, `${listenHost}: refused`);
  }
  const cli = await runCli(['agent', '--listen', '127.0.0.1:0', '--state-dir', path.join(dir, 'cli'), '--allow-path', dir]);
  t.equal(cli.code, 64, 'the CLI: a usage error');
  t.match(cli.stderr, /needs an operator token/);
});

t.test('/host reports a persisted identity', async (t) => {
  const dir = await tmpDir(t);
  const a = await startAgent(t, dir, 'a');
  const host = await a.client.call<{ uuid: string; accelerator: string; qemuVersion: string; protocolVersions: number[] }>('GET', '/host');
  t.match(host.uuid, /^[0-9a-f-]{36}$/);
  t.match(host.qemuVersion, /^\d+\.\d+/);
  t.ok(['kvm', 'tcg'].includes(host.accelerator));
  t.same(host.protocolVersions, [2]);
  await a.app.close();
  const again = await startAgent(t, dir, 'a');
  t.equal((await again.client.host()).uuid, host.uuid, 'same uuid after restart');
});

t.test('a symlink swapped while guests start never gets qemu an outside file', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const outside = await fs.mkdtemp(path.join(dir, '..', 'kvm-migrate-test-outside-'));
  t.teardown(() => fs.rm(outside, { recursive: true, force: true }));
  const guest = await testGuest(dir, 'vm1');
  const secret = path.join(outside, 'secret.img');
  await fs.copyFile(guest.image, secret);
  const link = path.join(dir, 'disk.img');
  await fs.symlink(guest.image, link);
  await client.define(guest.xml.replace(guest.image, link));
  // Another process swaps the link between the guest's image and the outside file, as fast as it can.
  const swapper = spawn('bash', ['-c', `for i in $(seq 1 200000); do ln -sfn ${secret} ${link}.a && mv -T ${link}.a ${link}; ln -sfn ${guest.image} ${link}.b && mv -T ${link}.b ${link}; done`], { stdio: 'ignore' });
  const swapperExit = new Promise((r) => swapper.once('exit', r));
  t.teardown(async () => {
    if (swapper.exitCode === null && swapper.signalCode === null) swapper.kill('SIGKILL');
    await swapperExit;
  });
  let started = 0;
  let refused = 0;
  const escapes: string[] = [];
  const deadline = Date.now() + 60_000;
  for (let i = 0; i < 20 && Date.now() < deadline; i++) {
    try {
      const info = await client.lifecycle('vm1', 'start');
      started++;
      for (const fd of await fs.readdir(`/proc/${info.pid}/fd`)) {
        const target = await fs.readlink(`/proc/${info.pid}/fd/${fd}`).catch(() => '');
        if (target.startsWith(outside)) escapes.push(target);
      }
      await client.lifecycle('vm1', 'destroy');
    } catch (err) {
      refused++;
      t.match(err, { status: 400, code: /path_not_allowed|path_changed|path_not_found/ }, `refused: ${(err as Error).message.slice(0, 120)}`);
    }
  }
  t.comment(`${started} started, ${refused} refused while the link was being swapped`);
  t.ok(started + refused >= 10, 'enough attempts');
  t.same(escapes, [], 'no qemu ever held a file outside --allow-path');
});

t.test('one answer lists every blocker of a define (errors), parsed in a worker thread', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'many');
  const xml = guest.xml.replace("<domain type='kvm'>", "<domain type='kvm' id='4'>").replace('<devices>', "<devices><hub type='usb'/><smartcard mode='passthrough'/>");
  const err = (await client.define(xml).catch((e: unknown) => e)) as AgentHttpError;
  t.equal(err.status, 400);
  t.equal(err.code, 'unsupported_attribute');
  t.same((err.body.errors as Array<{ element: string }>).map((e) => e.element), ['/domain/@id', '/domain/devices/hub[1]', '/domain/devices/smartcard[1]']);
});

t.test('a VNC display listens on loopback only, unless --graphics-listen allows the address', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a', { graphicsListen: ['127.0.0.1', '::1', '192.0.2.10'] });
  const guest = await testGuest(dir, 'vnc');
  const withVnc = (listen: string) => guest.xml.replace('<devices>', `<devices><graphics type='vnc' port='-1' autoport='yes' listen='${listen}'/>`);
  const err = (await client.define(withVnc('0.0.0.0')).catch((e: unknown) => e)) as AgentHttpError;
  t.equal(err.code, 'graphics_listen_not_allowed');
  t.match(err.body.element, /graphics\[1\]\/@listen$/);
  t.match(err.message, /without a password/);
  await client.define(withVnc('127.0.0.1'));
  await client.undefine('vnc');
  await client.define(withVnc('192.0.2.10'));
  t.pass('loopback, and an address the host allows');
});
