/**
 * The host-side elements on a real qemu: vCPU and emulator pinning (checked in
 * /proc/<pid>/task/<tid>/status), a guest with the libvirt elements of this slice that qemu
 * must accept (pm, watchdogs, sysinfo, audio, seclabel, iothreads, timers, topology), and the
 * start-time refusals (CPUs the host lacks, no hugetlbfs pages).
 */
import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { checkCpuVendor, hostCpus } from '../../src/agent/host-resources.js';
import { parseDomainXml } from '../../src/domain/index.js';
import { startAgent, testGuest, tmpDir } from '../helpers/agents.js';

const cpusAllowed = async (file: string) => /^Cpus_allowed_list:\s*(\S+)$/m.exec(await fs.readFile(file, 'utf8'))![1];

/** The test guest's XML with `head` after <vcpu>, `body` after </os> and `devices` added. */
function extend(xml: string, o: { vcpu?: string; head?: string; body?: string; devices?: string }): string {
  let x = xml;
  if (o.vcpu) x = x.replace(/<vcpu>\d+<\/vcpu>/, o.vcpu);
  if (o.head) x = x.replace(/(<vcpu[^>]*>\d+<\/vcpu>)/, `$1${o.head}`);
  if (o.body) x = x.replace('</os>', `</os>${o.body}`);
  if (o.devices) x = x.replace('</devices>', `${o.devices}</devices>`);
  return x;
}

t.test('vCPU threads and the emulator threads are pinned as cputune says', async (t) => {
  const cpus = await hostCpus();
  const [a, b] = [cpus[0]!, cpus[cpus.length - 1]!];
  const dir = await tmpDir(t);
  const { client, app } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'pin1');
  const data = path.join(dir, 'data.raw');
  await fs.writeFile(data, Buffer.alloc(1 << 20));
  const xml = extend(guest.xml, {
    vcpu: `<vcpu placement='static' cpuset='${a},${b}'>2</vcpu>`,
    head: `<iothreads>1</iothreads><cputune><vcpupin vcpu='0' cpuset='${b}'/><vcpupin vcpu='1' cpuset='${a}'/><emulatorpin cpuset='${a}'/></cputune>
      <sysinfo type='smbios'><bios><entry name='vendor'>Test, Inc.</entry></bios><system><entry name='product'>pinned</entry></system><oemStrings><entry>k=v</entry></oemStrings></sysinfo>`,
    body: `<cpu mode='host-passthrough' check='none' migratable='on'><topology sockets='1' dies='1' clusters='1' cores='2' threads='1'/></cpu>
      <clock offset='utc'><timer name='rtc' tickpolicy='catchup' track='guest'/><timer name='pit' tickpolicy='delay'/><timer name='hpet' present='no'/><timer name='kvmclock' present='yes'/></clock>
      <pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>`,
    devices: `<disk type='file' device='disk'><driver name='qemu' type='raw' iothread='1'/><source file='${data}'/><target dev='vdb' bus='virtio'/></disk>
      <audio id='1' type='none'/><watchdog model='i6300esb' action='reset'/><watchdog model='ib700' action='reset'/><memballoon model='none'/>`,
  }).replace("<boot dev='hd'/>", "<boot dev='hd'/><smbios mode='sysinfo'/>").replace('</devices>', "</devices><seclabel type='none'/>");
  await client.define(xml);
  const started = await client.lifecycle('pin1', 'start');
  t.equal(started.state, 'running', 'qemu 7.2 accepted every element');
  const run = app.agent.domains.get('pin1').run!;
  const pid = run.record.pid;
  const vcpus = await run.qmp.execute<Array<{ 'cpu-index': number; 'thread-id': number }>>('query-cpus-fast');
  t.equal(vcpus.length, 2);
  const byIndex = new Map(vcpus.map((v) => [v['cpu-index'], v['thread-id']]));
  t.equal(await cpusAllowed(`/proc/${pid}/task/${byIndex.get(0)}/status`), String(b), 'vCPU 0 on its vcpupin');
  t.equal(await cpusAllowed(`/proc/${pid}/task/${byIndex.get(1)}/status`), String(a), 'vCPU 1 on its vcpupin');
  t.equal(await cpusAllowed(`/proc/${pid}/status`), String(a), 'the main thread on the emulatorpin');
  const [io] = await run.qmp.execute<Array<{ 'thread-id': number }>>('query-iothreads');
  t.equal(await cpusAllowed(`/proc/${pid}/task/${io!['thread-id']}/status`), a === b ? String(a) : `${a},${b}`.replace(`${a},${a + 1}`, `${a}-${a + 1}`), 'the iothread on the <vcpu cpuset>');
  for (const tid of await fs.readdir(`/proc/${pid}/task`)) {
    if ([...byIndex.values(), io!['thread-id']].includes(Number(tid))) continue;
    t.equal(await cpusAllowed(`/proc/${pid}/task/${tid}/status`), String(a), `emulator thread ${tid} on the emulatorpin`);
  }
  await client.lifecycle('pin1', 'destroy');
});

t.test('start refuses CPUs the host lacks and hugepages it cannot give', async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const guest = await testGuest(dir, 'pin2');
  await client.define(extend(guest.xml, { head: "<cputune><vcpupin vcpu='0' cpuset='4095'/></cputune>" }));
  await t.rejects(client.lifecycle('pin2', 'start'), { status: 409, code: 'host_cpus_unavailable' });
  t.equal((await client.domain('pin2')).state, 'shutoff');

  const meminfo = await fs.readFile('/proc/meminfo', 'utf8');
  const mounts = await fs.readFile('/proc/mounts', 'utf8');
  const freePages = Number(/^HugePages_Free:\s+(\d+)/m.exec(meminfo)?.[1] ?? 0);
  const huge = await testGuest(dir, 'huge1');
  await client.define(extend(huge.xml, { head: '<memoryBacking><hugepages/></memoryBacking>' }));
  if (freePages === 0 || !/ hugetlbfs /.test(mounts)) {
    await t.rejects(client.lifecycle('huge1', 'start'), { status: 409, code: 'hugepages_unavailable' });
  } else {
    t.comment('this host has free huge pages: a start of a small guest on them');
    t.equal((await client.lifecycle('huge1', 'start')).state, 'running');
    await client.lifecycle('huge1', 'destroy');
  }
});

t.test("<cpu><vendor>: under KVM the host's CPU vendor must match, under TCG the model's is emulated", async (t) => {
  const def = parseDomainXml(`<domain type='kvm'><name>v</name><uuid>8f0e4d2c-6b1a-4c3e-9d5f-7a8b9c0d1e2f</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>
    <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os><cpu mode='custom'><model>Skylake-Server-IBRS</model><vendor>Intel</vendor></cpu><devices/></domain>`);
  await checkCpuVendor(def, 'kvm', 'processor\t: 0\nvendor_id\t: GenuineIntel\n');
  await t.rejects(checkCpuVendor(def, 'kvm', 'processor\t: 0\nvendor_id\t: AuthenticAMD\n'), { code: 'cpu_vendor_mismatch', statusCode: 409 });
  await checkCpuVendor(def, 'tcg', 'vendor_id\t: AuthenticAMD\n');
  t.pass('TCG: no check');
});
