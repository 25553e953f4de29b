// SPICE desktops on real qemu: the guest virt-manager makes (SPICE with autoport, qxl, the agent
// channel, two USB redirections, ich9 sound) starts, its display listens where the agent says,
// on a port the agent chose (5900 up, skipping what is taken), and nowhere it was not allowed.
import net from 'node:net';
import { once } from 'node:events';
import t from 'tap';
import type { QmpClient } from '../../src/qemu/qmp.js';
import { readGuestCounters } from '../../src/guest/image.js';
import { startAgent, testGuest, tmpDir, waitFor, type TestContext } from '../helpers/agents.js';

const desktop = (graphics: string) => `
    <controller type='usb' model='qemu-xhci' ports='15'/>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <input type='tablet' bus='usb'/>
    ${graphics}
    <sound model='ich9'/>
    <video>
      <model type='qxl'/>
    </video>
    <redirdev bus='usb' type='spicevmc'/>
    <redirdev bus='usb' type='spicevmc'/>
  </devices>`;
const AUTOPORT = "<graphics type='spice' autoport='yes'><listen type='address'/><image compression='off'/></graphics>";

interface SpiceStatus { enabled: boolean; host?: string; port?: number; auth?: string }
const querySpice = (qmp: QmpClient) => qmp.execute<SpiceStatus>('query-spice');

/** Binds host:port and keeps it until the test ends. */
async function occupy(t: TestContext, host: string, port: number): Promise<void> {
  const server = net.createServer();
  server.listen({ host, port, exclusive: true });
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
}

/** The lowest port from 5900 up that nobody has bound on host right now. */
async function lowestFreeDisplayPort(host: string): Promise<number> {
  for (let port = 5900; port < 6100; port++) {
    const free = await new Promise<boolean>((resolve) => {
      const s = net.createServer();
      s.once('error', () => resolve(false));
      s.listen({ host, port, exclusive: true }, () => s.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error('no free port in 5900-6099');
}

t.test("virt-manager's SPICE desktop runs on qemu: qxl, the agent channel, USB redirection; the display listens where the agent says", async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'desk1', undefined, { machine: 'q35' });
  await client.define(guest.xml.replace('</devices>', desktop(AUTOPORT)));
  const stored = await client.xml('desk1');
  t.match(stored, /<model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1'\/>/, "libvirt's qxl defaults are written back");
  t.match(stored, /<audio id='1' type='spice'\/>/, 'the sound plays to the SPICE client (libvirt 9.0)');
  t.match(stored, /<redirdev bus='usb' type='spicevmc'>\s*<address type='usb' bus='0' port='2'\/>/, 'the first redirection after the tablet');

  await client.lifecycle('desk1', 'start');
  const qmp = app.agent.domains.get('desk1').run!.qmp;
  await waitFor('guest passes', async () => ((await readGuestCounters(qmp)).passes > 0 ? true : null));
  t.pass('the guest runs with these devices');

  const spice = await querySpice(qmp);
  t.ok(spice.enabled, 'qemu has a SPICE server');
  t.equal(spice.host, '127.0.0.1', 'on loopback (no address in <listen>)');
  t.equal(spice.auth, 'none', 'without a password');
  const info = await client.domain('desk1');
  t.same(info.graphics, [{ type: 'spice', listen: '127.0.0.1', port: spice.port }], 'GET /domains/{name} says where it listens');
  t.ok(spice.port! >= 5900, `port ${spice.port} is from 5900 up`);
  const sock = net.connect(spice.port!, '127.0.0.1');
  await once(sock, 'connect');
  t.pass('the SPICE port takes connections');
  sock.destroy();

  const qomGet = (p: string, property: string) => qmp.execute<unknown>('qom-get', { path: p, property });
  t.equal(await qomGet('/machine/peripheral/video0', 'ram_size'), 64 * 1024 * 1024, 'qxl ram_size');
  t.equal(await qomGet('/machine/peripheral/video0', 'vgamem_mb'), 16, 'qxl vgamem_mb');
  t.equal(await qomGet('/machine/peripheral/redir1', 'port'), '3', 'the second redirection on USB port 3');
  t.equal(await qomGet('/machine/peripheral/channel0', 'name'), 'com.redhat.spice.0', 'the agent channel');
  await client.lifecycle('desk1', 'destroy');
});

t.test('a SPICE display listens on loopback only unless --graphics-listen allows the address', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'desk2', undefined, { machine: 'q35' });
  for (const graphics of ["<graphics type='spice' autoport='yes' listen='0.0.0.0'/>", "<graphics type='spice' autoport='yes'><listen type='address' address='192.0.2.10'/></graphics>"]) {
    await t.rejects(client.define(guest.xml.replace('</devices>', desktop(graphics))), { status: 400, code: 'graphics_listen_not_allowed' }, graphics);
  }
  t.same(await client.domains(), [], 'nothing defined');
});

t.test('autoport: two guests get different ports, a port another process holds is skipped; listen none has no port', async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const taken = await lowestFreeDisplayPort('127.0.0.1');
  await occupy(t, '127.0.0.1', taken);
  for (const name of ['desk3', 'desk4']) {
    const guest = await testGuest(dir, name, undefined, { machine: 'q35' });
    await client.define(guest.xml.replace('</devices>', desktop(AUTOPORT)));
  }
  // At once: the second launch must not choose the port the first is still about to bind.
  await Promise.all(['desk3', 'desk4'].map((name) => client.lifecycle(name, 'start')));
  const ports = await Promise.all(['desk3', 'desk4'].map(async (name) => (await querySpice(app.agent.domains.get(name).run!.qmp)).port!));
  t.not(ports[0], ports[1], `different ports (${ports.join(', ')})`);
  t.notOk(ports.includes(taken), `the port another process holds (${taken}) is skipped`);
  for (const [i, name] of ['desk3', 'desk4'].entries()) t.equal((await client.domain(name)).graphics?.[0]?.port, ports[i], `${name}: the port reported is qemu's`);

  await client.lifecycle('desk3', 'destroy');
  const guest = await testGuest(dir, 'desk5', undefined, { machine: 'q35' });
  await client.define(guest.xml.replace('</devices>', desktop("<graphics type='spice'><listen type='none'/></graphics>")));
  await client.lifecycle('desk5', 'start');
  const spice = await querySpice(app.agent.domains.get('desk5').run!.qmp);
  t.ok(spice.enabled && !spice.port, 'listen none: a SPICE server without a port');
  t.same((await client.domain('desk5')).graphics, [{ type: 'spice' }], 'and none is reported');
  await client.lifecycle('desk4', 'destroy');
  await client.lifecycle('desk5', 'destroy');
});
