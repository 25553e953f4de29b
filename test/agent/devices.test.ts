// Devices of "bring your own guest" on real qemu: what the argv builder emits for them must be
// accepted by this host's qemu, and the host-side parts (a guest-agent socket without a path,
// the balloon's stats period, the network checks) must do what they say.
import { promises as fs } from 'node:fs';
import { connect } from 'node:net';
import { once } from 'node:events';
import path from 'node:path';
import t from 'tap';
import { readGuestCounters } from '../../src/guest/image.js';
import { startAgent, testGuest, tmpDir, waitFor } from '../helpers/agents.js';

const devices = (scsiImage: string) => `
    <controller type='usb' model='qemu-xhci' ports='15'/>
    <controller type='virtio-serial' ports='8' vectors='3'/>
    <controller type='scsi' model='lsilogic'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${scsiImage}'/>
      <target dev='sda' bus='scsi'/>
      <wwn>0x5000c50015ea71ad</wwn>
    </disk>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <input type='tablet' bus='usb'/>
    <video>
      <model type='cirrus' vram='16384' heads='1' primary='yes'/>
    </video>
    <memballoon model='virtio'>
      <stats period='7'/>
    </memballoon>
    <rng model='virtio'>
      <rate bytes='1024'/>
      <backend model='random'>/dev/urandom</backend>
    </rng>
  </devices>`;

t.test('xhci ports, virtio-serial ports, lsilogic with a wwn, a guest-agent socket without a path, cirrus, balloon stats: qemu runs them', async (t) => {
  const dir = await tmpDir(t);
  const { client, app, config } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'dev1');
  const scsiImage = path.join(dir, 'dev1-scsi.img');
  await fs.writeFile(scsiImage, Buffer.alloc(1024 * 1024));
  const xml = guest.xml.replace('</devices>', devices(scsiImage));

  const defined = await client.define(xml);
  const stored = await client.xml('dev1');
  t.notMatch(stored, /channel0\.sock|run\//, 'the stored XML names no host socket path: a destination makes its own');
  t.match(stored, /<source mode='bind'\/>/, 'the channel keeps its pathless source');
  await client.lifecycle('dev1', 'start');
  const entry = app.agent.domains.get('dev1');
  const qmp = entry.run!.qmp;
  const first = await waitFor('guest passes', async () => {
    const c = await readGuestCounters(qmp);
    return c.passes > 0 ? c : null;
  });
  t.ok(first.passes > 0, 'the guest runs with these devices');

  const qomGet = (p: string, property: string) => qmp.execute<unknown>('qom-get', { path: p, property });
  t.equal(await qomGet('/machine/peripheral/balloon0', 'guest-stats-polling-interval'), 7, 'the stats period was set over QMP after start');
  t.equal(await qomGet('/machine/peripheral/usb', 'p2'), 15, 'xhci p2');
  t.equal(await qomGet('/machine/peripheral/usb', 'p3'), 15, 'xhci p3');
  t.equal(await qomGet('/machine/peripheral/virtio-serial0', 'max_ports'), 8, 'virtio-serial max_ports');
  // (a uint64 beyond 2^53: JSON gives the nearest double, as Number does)
  t.equal(await qomGet('/machine/peripheral/scsi0-0-0', 'wwn'), Number(0x5000c50015ea71adn), 'the disk has its wwn');
  t.equal(await qomGet('/machine/peripheral/scsi0-0-0', 'device_id'), 'drive-scsi0-0-0', "device_id as libvirt's");

  // The channel listens in the qemu's own run directory.
  const socketPath = path.join(config.stateDir, 'run', defined.uuid, 'channel0.sock');
  t.ok((await fs.lstat(socketPath)).isSocket(), `${socketPath} is a socket`);
  const sock = connect(socketPath);
  await once(sock, 'connect');
  t.pass('qemu accepts a connection on it');
  sock.destroy();

  await client.lifecycle('dev1', 'destroy');
  await t.rejects(fs.lstat(socketPath), { code: 'ENOENT' }, 'the socket goes with the run directory');
});

t.test('q35 with the ICH9 USB2 set, e1000e, bochs, virtio-scsi queues: qemu runs them', async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'dev2', undefined, { machine: 'q35' });
  const xml = guest.xml
    .replace('</devices>', `
    <controller type='usb' index='0' model='ich9-ehci1'/>
    <controller type='usb' index='0' model='ich9-uhci1'><master startport='0'/></controller>
    <controller type='usb' index='0' model='ich9-uhci2'><master startport='2'/></controller>
    <controller type='usb' index='0' model='ich9-uhci3'><master startport='4'/></controller>
    <controller type='scsi' index='0' model='virtio-scsi'><driver queues='2'/></controller>
    <interface type='user'><mac address='52:54:00:aa:00:02'/><model type='e1000e'/></interface>
    <input type='tablet' bus='usb'/>
    <input type='keyboard' bus='usb'/>
    <video><model type='bochs' vram='16384'/></video>
  </devices>`);
  await client.define(xml);
  const stored = await client.xml('dev2');
  t.match(stored, /model='ich9-uhci1'>\s*<master startport='0'\/>\s*<address type='pci' domain='0x0000' bus='0x00' slot='0x1d' function='0x0' multifunction='on'\/>/, 'the set is at 00:1d as libvirt places it');
  await client.lifecycle('dev2', 'start');
  const qmp = app.agent.domains.get('dev2').run!.qmp;
  await waitFor('guest passes', async () => ((await readGuestCounters(qmp)).passes > 0 ? true : null));
  const devs = await qmp.execute<Array<{ bus: number; devices: Array<{ slot: number; function: number; qdev_id: string; id: { device: number } }> }>>('query-pci');
  const at = (slot: number, fn: number) => devs[0]!.devices.find((d) => d.slot === slot && d.function === fn);
  t.equal(at(0x1d, 7)?.qdev_id, 'usb', 'the EHCI at 00:1d.7, id usb');
  t.ok(at(0x1d, 0) && at(0x1d, 1) && at(0x1d, 2), 'its companions at 00:1d.0-2');
  t.equal(await qmp.execute('qom-get', { path: '/machine/peripheral/scsi0', property: 'num_queues' }), 2, 'virtio-scsi num_queues');
  await client.lifecycle('dev2', 'destroy');
});

t.test('a network with no --network mapping, and a bridge that does not exist, are refused at define', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a', { networks: { lan: 'kmt-nonexist0' } });
  const guest = await testGuest(dir, 'dev3');
  const nic = (inner: string) => guest.xml.replace('</devices>', `${inner}</devices>`);
  await t.rejects(client.define(nic("<interface type='network'><mac address='52:54:00:aa:00:03'/><source network='default'/></interface>")),
    { status: 400, code: 'network_not_mapped', body: { element: '/domain/devices/interface[1]/source/@network' } }, 'unmapped network');
  await t.rejects(client.define(nic("<interface type='network'><mac address='52:54:00:aa:00:03'/><source network='lan'/></interface>")),
    { status: 400, code: 'bridge_not_found' }, "the network's bridge is missing");
  await t.rejects(client.define(nic("<interface type='bridge'><mac address='52:54:00:aa:00:03'/><source bridge='kmt-nobr0'/></interface>")),
    { status: 400, code: 'bridge_not_found', body: { element: '/domain/devices/interface[1]/source/@bridge' } }, 'missing bridge');
  t.same(await client.domains(), [], 'nothing defined');
});
