// UEFI on real qemu, the host's side: which firmware files a guest may name (nothing of the host
// but its firmware images, and those read-only), the variable store made from its template at
// the first start, and a Prepare2 whose firmware sizes differ from this host's refused before any
// qemu starts.
import { copyFile, readFile, stat, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { guestQmp } from '../helpers/migration.js';
import { startAgent, TEST_ACCEL, tmpDir } from '../helpers/agents.js';

const skip = existsSync('/usr/share/OVMF/OVMF_CODE_4M.fd') ? false : 'no OVMF (apt-get install ovmf)';

const domain = (name: string, os: string, machine = 'q35') => `<domain type='kvm'>
  <name>${name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='${machine}'>hvm</type>
    ${os}
  </os>
  <features><acpi/></features>
  <devices>
    <memballoon model='none'/>
  </devices>
</domain>`;

t.test('a guest names no host file as firmware but the firmware images, and those only read-only', { skip }, async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  const cases: [string, string, string][] = [
    ['a host file as the loader', "<loader readonly='yes' type='pflash'>/etc/passwd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>", '/domain/os/loader'],
    ['a host file as the template (the guest would read it as its variables)', "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/etc/shadow'/>", '/domain/os/nvram/@template'],
    ['a host file as a rom', "<loader type='rom'>/etc/passwd</loader>", '/domain/os/loader'],
    ['the host\'s firmware image writable', "<loader readonly='no' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>", '/domain/os/loader'],
    ['the store in the firmware directory', `<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>/usr/share/OVMF/OVMF_VARS_4M.fd</nvram>`, '/domain/os/nvram'],
  ];
  for (const [what, os, element] of cases) {
    await t.rejects(client.define(domain('fw-bad', os)), { status: 400, code: 'path_not_allowed', body: { element } }, what);
  }
});

t.test('explicit loader and store: the store is made from the template at the first start; qemu runs on both flashes', { skip }, async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a');
  const store = path.join(dir, 'fw1_VARS.fd');
  await agent.client.define(domain('fw1', `<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram>${store}</nvram>`));
  t.match(await agent.client.xml('fw1'), `<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>${store}</nvram>`, 'the template of the loader\'s descriptor is written back');
  await agent.client.lifecycle('fw1', 'start');
  const st = await stat(store);
  t.equal(st.size, (await stat('/usr/share/OVMF/OVMF_VARS_4M.fd')).size, 'the store was made from the template');
  t.equal(st.mode & 0o777, 0o600, 'readable by the agent alone (qemu writes it through the descriptor it was given)');
  const nodes = await guestQmp(agent, 'fw1').execute<Array<{ 'node-name': string; ro: boolean }>>('query-named-block-nodes');
  const ro = Object.fromEntries(nodes.map((n) => [n['node-name'], n.ro]));
  t.same([ro['pflash0-format'], ro['pflash1-format']], [true, false], 'the code flash is read-only, the store writable');
  await agent.client.lifecycle('fw1', 'destroy');

  // A loader of its own below --allow-path: no descriptor names it, so no template is known.
  const code = path.join(dir, 'own-code.fd');
  await copyFile('/usr/share/OVMF/OVMF_CODE_4M.fd', code);
  await agent.client.define(domain('fw2', `<loader readonly='yes' type='pflash'>${code}</loader><nvram>${path.join(dir, 'fw2_VARS.fd')}</nvram>`, 'pc'));
  await t.rejects(agent.client.lifecycle('fw2', 'start'), { status: 400, code: 'nvram_template_unknown' }, 'a store that does not exist, without a template, cannot be made');
  await copyFile('/usr/share/OVMF/OVMF_VARS_4M.fd', path.join(dir, 'fw2_VARS.fd'));
  await agent.client.lifecycle('fw2', 'start');
  t.equal((await agent.client.domain('fw2')).state, 'running', 'with the store in place it runs, on i440fx too');
  await agent.client.lifecycle('fw2', 'destroy');
});

t.test('Prepare2 with other firmware sizes than this host\'s: 409 firmware_mismatch, and no qemu', { skip }, async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'b');
  const xml = domain('fw3', "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>");
  const code = (await stat('/usr/share/OVMF/OVMF_CODE_4M.fd')).size;
  const vars = (await stat('/usr/share/OVMF/OVMF_VARS_4M.fd')).size;
  const prepare = (id: string, firmware: object) => agent.client.call('POST', '/prepare2', { protocolVersion: 2, migrationId: id, xml, source: { hostUuid: '11111111-2222-4333-8444-555555555555' }, firmware });
  await t.rejects(prepare('00000000-0000-4000-8000-00000000f001', { loaderBytes: code * 2, nvramBytes: vars }), { status: 409, code: 'firmware_mismatch' }, 'another code size');
  await t.rejects(prepare('00000000-0000-4000-8000-00000000f002', { loaderBytes: code, nvramBytes: 131072 }), { status: 409, code: 'firmware_mismatch' }, 'the 2 MiB build\'s store');
  t.notOk(agent.app.agent.domains.find('fw3'), 'no domain, no qemu');
  const answer = await prepare('00000000-0000-4000-8000-00000000f003', { loaderBytes: code, nvramBytes: vars });
  t.match(answer, { uri: /^tcp:/ }, 'the same sizes are prepared');
  t.ok(agent.app.agent.domains.find('fw3')?.run, 'its qemu waits for the stream');
});

t.test("virt-manager's Windows 11 shape (UEFI Secure Boot, TPM, Hyper-V, SPICE with qxl, usb-redir) starts on this qemu", { skip }, async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a');
  const disk = path.join(dir, 'win11.raw');
  const iso = path.join(dir, 'win11.iso');
  await writeFile(disk, Buffer.alloc(1 << 20));
  await writeFile(iso, Buffer.alloc(1 << 20));
  const xml = (await readFile(new URL('../../../test/domain/fixtures/virt-manager-win11.xml', import.meta.url), 'utf8'))
    .replace('/var/lib/kvm-migrate-test/win11.qcow2', disk)
    .replace('type="qcow2"', 'type="raw"')
    .replace('/var/lib/kvm-migrate-test/Win11_23H2_English_x64.iso', iso)
    .replace(/<memory>\d+<\/memory>\s*<currentMemory>\d+<\/currentMemory>/, '<memory>262144</memory>')
    // TCG has no VP index for Hyper-V (qemu: "kernel doesn't allow setting HyperV VP_INDEX"); KVM has.
    .replace('<vpindex state="on"/>', TEST_ACCEL === 'tcg' ? '<vpindex state="off"/>' : '<vpindex state="on"/>');
  await agent.client.define(xml);
  await agent.client.lifecycle('win11', 'start');
  const qmp = guestQmp(agent, 'win11');
  t.match(await qmp.execute('query-tpm'), [{ model: 'tpm-crb', options: { type: 'emulator' } }], 'the TPM is the emulator');
  t.match(await qmp.execute('query-spice'), { enabled: true, host: '127.0.0.1', auth: 'none' }, 'SPICE on loopback');
  const nodes = await qmp.execute<Array<{ 'node-name': string; file: string }>>('query-named-block-nodes');
  t.ok(nodes.some((n) => n['node-name'] === 'pflash0-format'), 'the Secure Boot firmware is on pflash0');
  t.equal((await agent.client.domain('win11')).state, 'running');
  await agent.client.lifecycle('win11', 'destroy');
});
