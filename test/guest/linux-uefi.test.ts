/**
 * A real Linux guest booted through UEFI (Debian's OVMF, chosen by `<os firmware='efi'>` from
 * qemu's firmware descriptors) with a TPM (swtpm): the variable it writes at its first boot is
 * kept in the store the agent made for it, survives a restart of the guest, goes with the guest
 * A -> B -> A (the destination's store then holds it, not the template's contents), and goes when
 * the domain is undefined; the PCR it extended before the migrations reads the same after them
 * (PCRs are volatile: only the TPM state qemu carries in the stream can bring the value along).
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import t from 'tap';
import { LINUX_GUEST_CMDLINE, parseLinuxSerialLog, type LinuxSerialLog } from '../../src/guest/linux.js';
import { startAgent, tmpDir, waitFor, type TestAgent } from '../helpers/agents.js';
import { copyLinuxGuest, linuxGuestOrSkip } from '../helpers/linux-guest.js';
import { twoAgents } from '../helpers/migration.js';

const { guest, skip: noGuest } = await linuxGuestOrSkip();
const ovmfMissing = existsSync('/usr/share/qemu/firmware/50-edk2-x86_64-secure.json') ? false : 'no OVMF firmware descriptors (apt-get install ovmf)';
const skip = noGuest || ovmfMissing;

/**
 * virt-install's `--boot uefi` shape, asking for Secure Boot without Microsoft's keys enrolled
 * (so OVMF starts Debian's kernel, signed by Debian, from -kernel): the secure, SMM-guarded build.
 */
function uefiXml(o: { name: string; kernel: string; initrd: string; serial: string; tpm?: boolean }): string {
  return `<domain type="kvm">
  <name>${o.name}</name>
  <memory>262144</memory>
  <vcpu>1</vcpu>
  <os firmware="efi">
    <type arch="x86_64" machine="q35">hvm</type>
    <firmware>
      <feature enabled="yes" name="secure-boot"/>
      <feature enabled="no" name="enrolled-keys"/>
    </firmware>
    <kernel>${o.kernel}</kernel>
    <initrd>${o.initrd}</initrd>
    <cmdline>${LINUX_GUEST_CMDLINE} kmstate</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode="host-passthrough" check="none" migratable="on"/>
  <clock offset="utc"/>
  <on_reboot>destroy</on_reboot>
  <devices>
    <controller type="pci" model="pcie-root"/>
    <serial type="file">
      <source path="${o.serial}" append="on"/>
    </serial>
    <memballoon model="none"/>${o.tpm ? `
    <tpm model="tpm-crb">
      <backend type="emulator" version="2.0"/>
    </tpm>` : ''}
  </devices>
</domain>
`;
}

/** The store's bytes hold the variable: its UCS-2 name and the line it carries. */
function storeHolds(store: Buffer, line: string): boolean {
  return store.includes(Buffer.from('KmMigrateTest', 'utf16le')) && store.includes(Buffer.from(line, 'latin1'));
}

const serialLog = async (file: string): Promise<LinuxSerialLog> => parseLinuxSerialLog(await readFile(file, 'utf8').catch(() => ''));

/** The guest's state reports after the first `skip` ones, at least `count` of them. */
function statesAfter(file: string, skipCount: number, count: number, what: string) {
  return waitFor(what, async () => {
    const l = await serialLog(file);
    return l.states.length >= skipCount + count ? { log: l, states: l.states.slice(skipCount) } : null;
  }, { timeoutMs: 120_000, intervalMs: 250 });
}

/** PCR 16 after one extend with 32 bytes of 'K' from its reset value (32 zero bytes), as the guest does at boot. */
const PCR16_AFTER_BOOT = createHash('sha256').update(Buffer.alloc(32)).update(Buffer.alloc(32, 'K')).digest('hex').toUpperCase();

const ownStore = (agent: TestAgent, uuid: string) => path.join(agent.config.stateDir, 'nvram', `${uuid}.fd`);

t.test('firmware efi: OVMF chosen, its store made from the template, a variable kept across restarts, the store gone with the domain', { skip }, async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a');
  const { efiKernel: kernel, initrd } = await copyLinuxGuest(guest!, dir);
  const serial = path.join(dir, 'uefi1.serial');
  await agent.client.define(uefiXml({ name: 'uefi1', kernel, initrd, serial }));
  const stored = await agent.client.xml('uefi1');
  t.match(stored, /<loader readonly='yes' secure='yes' type='pflash'>\/usr\/share\/OVMF\/OVMF_CODE_4M.secboot.fd<\/loader>/, 'the secure build without enrolled keys was chosen');
  t.match(stored, /<nvram template='\/usr\/share\/OVMF\/OVMF_VARS_4M.fd'\/>/, 'its store is made from the empty template');
  t.match(stored, /<smm state='on'\/>/, 'SMM is on: the firmware needs it');
  const { uuid } = agent.app.agent.domains.get('uefi1');
  const store = ownStore(agent, uuid);
  t.notOk(existsSync(store), 'no store before the first start');

  await agent.client.lifecycle('uefi1', 'start');
  const first = await statesAfter(serial, 0, 2, 'the guest to boot through UEFI and report');
  const bootId = first.log.boots[0]!;
  const line = `first boot ${bootId}`;
  t.equal(first.states.at(-1)!.efivar, line, 'the guest wrote its variable through the firmware');
  t.equal((await stat(store)).size, (await stat('/usr/share/OVMF/OVMF_VARS_4M.fd')).size, 'the store has the template\'s size');
  t.ok(storeHolds(await readFile(store), line), 'the store on disk holds the variable');

  await agent.client.lifecycle('uefi1', 'destroy');
  const before = (await serialLog(serial)).states.length;
  await agent.client.lifecycle('uefi1', 'start');
  const second = await statesAfter(serial, before, 1, 'the guest to boot again');
  t.equal(second.log.boots.length, 2, 'a second boot');
  t.equal(second.states.at(-1)!.efivar, line, 'the variable of the first boot is still there');
  await agent.client.lifecycle('uefi1', 'destroy');
  await agent.client.undefine('uefi1');
  t.notOk(existsSync(store), 'undefine removed the store');
});

t.test('a UEFI guest with a TPM migrates A -> B -> A: the destination\'s store holds the source\'s variables, its TPM the PCR the guest extended', { skip }, async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { efiKernel: kernel, initrd } = await copyLinuxGuest(guest!, dir);
  const serial = path.join(dir, 'uefi2.serial');
  await a.client.define(uefiXml({ name: 'uefi2', kernel, initrd, serial, tpm: true }));
  const { uuid } = a.app.agent.domains.get('uefi2');
  await a.client.lifecycle('uefi2', 'start');
  const booted = await statesAfter(serial, 0, 2, 'the guest to boot through UEFI and report');
  const line = `first boot ${booted.log.boots[0]}`;
  t.equal(booted.states.at(-1)!.efivar, line, 'the guest wrote its variable on A');
  t.equal(booted.states.at(-1)!.pcr16, PCR16_AFTER_BOOT, 'the guest extended PCR 16 on A');
  t.same((await serialLog(serial)).problems, [], 'the guest reported no problem');

  const hop = async (from: TestAgent, to: TestAgent, what: string) => {
    const before = (await serialLog(serial)).states.length;
    const { job } = await from.client.perform({ domain: 'uefi2', destination: to.url }, true);
    t.equal(job.status, 'completed', `${what}: completed`);
    const after = await statesAfter(serial, before, 3, `${what}: the guest to go on`);
    t.same(after.log.boots, booted.log.boots, `${what}: the same boot`);
    t.ok(after.states.every((s) => s.efivar === line), `${what}: the guest reads its variable on the destination`);
    t.ok(after.states.every((s) => s.pcr16 === PCR16_AFTER_BOOT), `${what}: PCR 16 holds what the guest extended before the migration`);
    t.ok(existsSync(path.join(to.config.stateDir, 'tpm', uuid)), `${what}: the destination keeps the TPM state`);
    t.notOk(existsSync(path.join(from.config.stateDir, 'tpm', uuid)), `${what}: the source kept no TPM state of a guest that left`);
    t.ok(storeHolds(await readFile(ownStore(to, uuid)), line), `${what}: the destination's store on disk holds it`);
    t.notOk(existsSync(ownStore(from, uuid)), `${what}: the source kept no store of a domain it no longer holds`);
  };
  await hop(a, b, 'A -> B');
  await hop(b, a, 'B -> A');

  // The store the guest now runs on is A's new one: a cold boot from it still finds the variable.
  await a.client.lifecycle('uefi2', 'destroy');
  const before = (await serialLog(serial)).states.length;
  await a.client.lifecycle('uefi2', 'start');
  const cold = await statesAfter(serial, before, 1, 'the guest to boot again on A');
  t.equal(cold.states.at(-1)!.efivar, line, 'after a cold boot on A the variable written before both migrations is there');
  t.equal(cold.states.at(-1)!.pcr16, PCR16_AFTER_BOOT, 'the TPM was reset with the machine: PCR 16 holds the new boot\'s one extend');
});
