import t from 'tap';
import { startAgent, testGuest, tmpDir, waitFor } from '../helpers/agents.js';

interface PciDevice {
  bus: number;
  slot: number;
  function: number;
  qdev_id: string;
  pci_bridge?: { bus: { secondary: number }; devices?: PciDevice[] };
}

/** Every device qemu shows on the guest's PCI buses, by qemu id, with the bus it sits on. */
function flatten(devices: PciDevice[], on: string, out = new Map<string, { on: string; slot: number; fn: number }>()) {
  for (const d of devices) {
    if (d.qdev_id) out.set(d.qdev_id, { on, slot: d.slot, fn: d.function });
    if (d.pci_bridge) flatten(d.pci_bridge.devices ?? [], d.qdev_id, out);
  }
  return out;
}

t.test('a virt-install-shaped q35 guest: root ports, a bridge for a legacy NIC, each endpoint in a port of its own, on real qemu', async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'q35vm', undefined, { machine: 'q35' });
  const rootPorts = Array.from({ length: 4 }, () => "<controller type='pci' model='pcie-root-port'/>").join('');
  const xml = guest.xml
    .replace(
      '<devices>',
      `<devices><controller type='pci' model='pcie-root'/>${rootPorts}` +
        "<interface type='user'><mac address='52:54:00:00:00:31'/><model type='virtio'/></interface>" +
        "<interface type='user'><mac address='52:54:00:00:00:32'/><model type='e1000'/></interface>" +
        "<memballoon model='virtio'/>",
    );
  await client.define(xml);
  const stored = await client.xml('q35vm');
  t.match(stored, /index=["']1["']>\s*<model name=["']pcie-root-port["']\/>\s*<target chassis=["']1["'] port=["']0x8["']\/>\s*<address type=["']pci["'] domain=["']0x0000["'] bus=["']0x00["'] slot=["']0x01["'] function=["']0x0["'] multifunction=["']on["']\/>/, "the stored XML has libvirt's normalized root port (port: slot 1 << 3)");
  t.match(stored, /model=["']pcie-to-pci-bridge["']/, 'a bridge was added for the legacy NIC');

  await client.lifecycle('q35vm', 'start');
  const qmp = app.agent.domains.get('q35vm').run!.qmp;
  // qemu shows what sits behind a bridge once the firmware has numbered the bridge's bus.
  const where = await waitFor('the firmware to number the buses', async () => {
    const [root] = await qmp.execute<Array<{ bus: number; devices: PciDevice[] }>>('query-pci');
    const found = flatten(root!.devices, 'pcie.0');
    return found.has('net1') ? found : null;
  }, { timeoutMs: 20_000, intervalMs: 100 });
  t.same(where.get('pci.1'), { on: 'pcie.0', slot: 1, fn: 0 }, 'root ports packed as functions from slot 1 (no video)');
  t.same(where.get('pci.4'), { on: 'pcie.0', slot: 1, fn: 3 });
  // libvirt's order: PCI controllers first, so the added bridge (index 5) takes the first free port.
  t.same(where.get('pci.5'), { on: 'pci.1', slot: 0, fn: 0 }, 'the added pcie-to-pci-bridge sits in the first root port');
  t.same(where.get('net1'), { on: 'pci.5', slot: 1, fn: 0 }, 'the e1000 on the bridge, from slot 1');
  t.same(where.get('net0'), { on: 'pci.2', slot: 0, fn: 0 }, 'then the network, in the next root port');
  t.same(where.get('balloon0'), { on: 'pci.3', slot: 0, fn: 0 }, 'the balloon in a root port of its own');
  t.equal([...where.values()].filter((w) => w.on === 'pci.4').length, 0, 'the fourth root port stays free for hotplug');
  await client.lifecycle('q35vm', 'destroy');
});

t.test('a PCIe switch and an expander bus start on real qemu, a disk behind a downstream port', async (t) => {
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'switched', undefined, { machine: 'q35' });
  const xml = guest.xml
    .replace("dev='sda' bus='sata'", "dev='vda' bus='virtio'")
    .replace(
      '<devices>',
      "<devices><controller type='pci' index='1' model='pcie-root-port'/><controller type='pci' index='2' model='pcie-switch-upstream-port'/>" +
        "<controller type='pci' index='3' model='pcie-switch-downstream-port'/><controller type='pci' index='4' model='pcie-expander-bus'/>" +
        "<controller type='pci' index='5' model='pcie-root-port'><address type='pci' bus='0x04' slot='0x00'/></controller>",
    );
  await client.define(xml);
  t.match(await client.xml('switched'), /model=["']pcie-expander-bus["']>\s*<model name=["']pxb-pcie["']\/>\s*<target busNr=["']254["']\/>/, 'the expander bus normalized with its bus number');
  await client.lifecycle('switched', 'start');
  const qmp = app.agent.domains.get('switched').run!.qmp;
  const where = await waitFor('the firmware to number the buses', async () => {
    const found = new Map<string, { on: string; slot: number; fn: number }>();
    for (const root of await qmp.execute<Array<{ bus: number; devices: PciDevice[] }>>('query-pci')) flatten(root.devices, `bus ${root.bus}`, found);
    return found.has('virtio-disk0') ? found : null;
  }, { timeoutMs: 20_000, intervalMs: 100 });
  t.equal(where.get('pci.2')?.on, 'pci.1', 'the upstream port in the root port');
  t.equal(where.get('pci.3')?.on, 'pci.2', 'the downstream port on the switch');
  t.equal(where.get('virtio-disk0')?.on, 'pci.3', 'the disk behind the downstream port');
  t.ok(where.has('pci.4'), 'the expander bus is there');
  await client.lifecycle('switched', 'destroy');
});
