/**
 * on_crash, with a real Linux guest that says it panicked through the pvpanic device: restart
 * resets it in the same qemu (a new boot, the domain running on), destroy ends it as crashed.
 */
import { chmod, readFile, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { LINUX_GUEST_CMDLINE, parseLinuxSerialLog } from '../../src/guest/linux.js';
import { startAgent, tmpDir, waitFor } from '../helpers/agents.js';
import { copyLinuxGuest, linuxGuestOrSkip } from '../helpers/linux-guest.js';

const { guest, skip: noGuest } = await linuxGuestOrSkip();

async function panickingGuest(dir: string, name: string, onCrash: string, fileMode = 0o644) {
  const { kernel, initrd } = await copyLinuxGuest(guest!, dir);
  for (const file of [kernel, initrd]) await chmod(file, fileMode);
  const disk = path.join(dir, `${name}.raw`);
  await writeFile(disk, '');
  await truncate(disk, 4 * 1024 * 1024);
  const serial = path.join(dir, `${name}.serial`);
  const xml = `<domain type='kvm'>
  <name>${name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${kernel}</kernel>
    <initrd>${initrd}</initrd>
    <cmdline>${LINUX_GUEST_CMDLINE} kmpanic=2</cmdline>
  </os>
  <features><acpi/></features>
  <on_crash>${onCrash}</on_crash>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${disk}'/><target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='${serial}' append='on'/></serial>
    <panic model='isa'><address type='isa' iobase='0x505'/></panic>
  </devices>
</domain>`;
  return { xml, log: async () => parseLinuxSerialLog(await readFile(serial, 'utf8').catch(() => '')) };
}

t.test("on_crash restart: the panicked guest is reset in its qemu and boots again", { skip: noGuest }, async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const g = await panickingGuest(dir, 'crashy', 'restart');
  await client.define(g.xml);
  const { pid } = await client.lifecycle('crashy', 'start');
  const twice = await waitFor('a second boot after the panic', async () => {
    const l = await g.log();
    return l.boots.length >= 2 ? l : null;
  }, { timeoutMs: 60_000, intervalMs: 200 });
  t.ok(twice.problems.includes('panic'), 'the guest said it panicked');
  t.not(twice.boots[0], twice.boots[1], 'a new boot');
  const info = await client.domain('crashy');
  t.equal(info.state, 'running', 'the domain runs on');
  t.equal(info.pid, pid, 'in the same qemu');
  await client.lifecycle('crashy', 'destroy');
});

t.test('on_crash destroy: the panicked guest ends, reported crashed', { skip: noGuest }, async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  // A kernel and initrd only root may read: qemu (a user of its own) is handed copies, and boots.
  const g = await panickingGuest(dir, 'crashy', 'destroy', 0o600);
  await client.define(g.xml);
  await client.lifecycle('crashy', 'start');
  const ended = await waitFor('the domain to end', async () => {
    const d = await client.domain('crashy');
    return d.state === 'shutoff' ? d : null;
  }, { timeoutMs: 60_000, intervalMs: 200 });
  t.equal(ended.reason, 'crashed');
  t.equal((await g.log()).boots.length, 1, 'it booted from the root-only kernel, once, and did not boot again');
});
