/**
 * A real Linux guest, defined from virt-install-shaped q35 XML, migrated A -> B -> A while it
 * writes its disk and uses its network (pm, audio none, an iTCO watchdog, a USB tablet and a
 * guest agent channel without a path, as virt-install writes them): afterwards it is the same
 * boot, its counter went on, every record it wrote is on its disk in order, and its network kept
 * answering on both hosts.
 */
import { readFile, truncate, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import t from 'tap';
import { LINUX_GUEST_CMDLINE, parseLinuxGuestDisk, parseLinuxSerialLog } from '../../src/guest/linux.js';
import { waitFor, type TestAgent } from '../helpers/agents.js';
import { copyLinuxGuest, guestAgentExchange, linuxGuestOrSkip } from '../helpers/linux-guest.js';
import { twoAgents } from '../helpers/migration.js';

const MiB = 1024 * 1024;

/** guest-sync through the guest agent channel the agent made for the guest (no path in its XML). */
async function guestAgentSync(agent: TestAgent, id: number): Promise<unknown> {
  const entry = agent.app.agent.domains.get('linux1');
  const socketPath = path.join(agent.config.stateDir, 'run', entry.uuid, 'channel0.sock');
  // Right after a migration the guest may not have its port open again yet: asked until it answers.
  const [reply] = await waitFor('the guest agent to answer', () => guestAgentExchange(socketPath, [{ execute: 'guest-sync', arguments: { id } }], 2000).catch(() => null), {
    timeoutMs: 30_000,
    intervalMs: 200,
  });
  return (reply as { return?: unknown }).return;
}

const { guest, skip: noGuest } = await linuxGuestOrSkip();

/** virt-install's shape for a Debian server on q35 with --boot kernel=,initrd=,kernel_args=. */
function virtInstallXml(o: { kernel: string; initrd: string; cmdline: string; disk: string; serial: string }): string {
  const rootPorts = Array.from({ length: 14 }, () => '    <controller type="pci" model="pcie-root-port"/>').join('\n');
  return `<domain type="kvm">
  <name>linux1</name>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory>262144</memory>
  <currentMemory>262144</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <kernel>${o.kernel}</kernel>
    <initrd>${o.initrd}</initrd>
    <cmdline>${o.cmdline}</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode="host-passthrough" check="none" migratable="on"/>
  <clock offset="utc">
    <timer name="rtc" tickpolicy="catchup"/>
    <timer name="pit" tickpolicy="delay"/>
    <timer name="hpet" present="no"/>
  </clock>
  <on_reboot>destroy</on_reboot>
  <pm>
    <suspend-to-mem enabled="no"/>
    <suspend-to-disk enabled="no"/>
  </pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file="${o.disk}"/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <controller type="usb" model="qemu-xhci" ports="15"/>
    <controller type="pci" model="pcie-root"/>
${rootPorts}
    <interface type="user">
      <mac address="52:54:00:4c:11:01"/>
      <model type="virtio"/>
    </interface>
    <serial type="file">
      <source path="${o.serial}" append="on"/>
    </serial>
    <channel type="unix">
      <source mode="bind"/>
      <target type="virtio" name="org.qemu.guest_agent.0"/>
    </channel>
    <input type="tablet" bus="usb"/>
    <audio id="1" type="none"/>
    <watchdog model="itco" action="reset"/>
    <memballoon model="virtio"/>
    <rng model="virtio">
      <backend model="random">/dev/urandom</backend>
    </rng>
  </devices>
</domain>
`;
}

t.test('a Linux guest migrates A -> B -> A with its disk and network busy, and nothing of it is lost', { skip: noGuest }, async (t) => {
  const { dir, a, b } = await twoAgents(t);
  // Its files below the agents' --allow-path (the test dir).
  const { kernel, initrd } = await copyLinuxGuest(guest!, dir);
  const disk = path.join(dir, 'linux1.raw');
  await writeFile(disk, '');
  await truncate(disk, 16 * MiB);
  const serial = path.join(dir, 'linux1.serial');

  // What the guest fetches over its network, by boot id and its own sequence number.
  const fetches: number[] = [];
  const server = createServer((req, res) => {
    const n = Number(new URL(req.url ?? '/', 'http://x').searchParams.get('n'));
    if (Number.isInteger(n)) fetches.push(n);
    res.end('ok\n');
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  t.teardown(() => new Promise<void>((r) => server.close(() => r())));
  const port = (server.address() as AddressInfo).port;

  const xml = virtInstallXml({ kernel, initrd, disk, serial, cmdline: `${LINUX_GUEST_CMDLINE} kmfetch=${port}` });
  await a.client.define(xml);
  const stored = await a.client.xml('linux1');
  await a.client.lifecycle('linux1', 'start');

  const log = async () => parseLinuxSerialLog(await readFile(serial, 'utf8').catch(() => ''));
  const booted = await waitFor('the guest to boot and tick', async () => {
    const l = await log();
    return l.ticks.length >= 2 ? l : null;
  }, { timeoutMs: 60_000, intervalMs: 200 });
  const bootId = booted.boots[0]!;
  for (const dev of ['vda', 'net', 'rng', 'balloon', 'agent']) t.ok(booted.devices[dev]?.ok, `${dev} works in the guest: ${booted.devices[dev]?.detail}`);
  await waitFor('the guest to use its network', () => fetches.length >= 3, { timeoutMs: 30_000, intervalMs: 100 }).catch(async (err: unknown) => {
    throw new Error(`${(err as Error).message}; the guest said: ${(await log()).problems.join(' | ')}`);
  });

  const hop = async (from: TestAgent, to: TestAgent, what: string) => {
    const ticksBefore = (await log()).ticks.length;
    const fetchesBefore = fetches.length;
    const { job } = await from.client.perform({ domain: 'linux1', destination: to.url }, true);
    t.equal(job.status, 'completed', `${what}: completed`);
    t.equal((await to.client.domain('linux1')).state, 'running', `${what}: runs there`);
    t.equal(await to.client.xml('linux1'), stored, `${what}: the destination stores the source's XML`);
    const after = await waitFor(`${what}: the counter to go on`, async () => {
      const l = await log();
      return l.ticks.length >= ticksBefore + 3 ? l : null;
    }, { timeoutMs: 60_000, intervalMs: 200 });
    t.same(after.boots, [bootId], `${what}: the same boot`);
    const ticks = after.ticks.map((k) => k.tick);
    t.ok(ticks.every((k, i) => i === 0 || k === ticks[i - 1]! + 1), `${what}: the counter never went back or skipped (${ticks.length} ticks)`);
    await waitFor(`${what}: the network to answer`, () => fetches.length >= fetchesBefore + 3, { timeoutMs: 30_000, intervalMs: 100 });
    const id = 1000 + ticksBefore;
    t.equal(await guestAgentSync(to, id), id, `${what}: the guest agent answers through the destination's own channel socket`);
  };
  t.equal(await guestAgentSync(a, 7), 7, 'the guest agent answers on the source');
  await hop(a, b, 'A -> B');
  await hop(b, a, 'B -> A');

  await a.client.lifecycle('linux1', 'destroy');
  const last = (await log()).ticks.at(-1)!.tick;
  const written = parseLinuxGuestDisk(await readFile(disk));
  t.equal(written.bootId, bootId, 'the disk header is of this boot');
  t.ok(written.records.length >= last + 1, `every tick's record is on the disk (${written.records.length} records, last tick ${last})`);
  t.ok(written.records.every((r, i) => r.tick === i && r.bootId === bootId), 'in order, none missing, all of this boot');
  // A fetch whose answer timed out is sent again with the same number; none may be missing.
  const numbers = [...new Set(fetches)].sort((x, y) => x - y);
  t.ok(numbers.every((n, i) => n === i), `every fetch of the guest arrived (${numbers.length})`);
});
