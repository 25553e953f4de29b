/** Host probing against the installed qemu. */
import { execa } from 'execa';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { kvmUsable, probeQemu, resolveAccel } from '../../src/qemu/host.js';
import { QEMU, rejection, tmpDir } from './helpers.js';

t.test('probeQemu reads version, machine types and KVM support', async (t) => {
  const info = await probeQemu();
  t.ok(path.isAbsolute(info.binary) && path.basename(info.binary) === QEMU, `found ${info.binary} on PATH`);
  const { stdout } = await execa(QEMU, ['--version']);
  t.match(info.version, /^\d+\.\d+\.\d+$/);
  t.ok(stdout.includes(`version ${info.version}`), `version ${info.version}`);

  const [major, minor] = info.version.split('.');
  t.equal(info.machineAliases.pc, `pc-i440fx-${major}.${minor}`);
  t.equal(info.machineAliases.q35, `pc-q35-${major}.${minor}`);
  for (const name of ['pc', 'q35', info.machineAliases.pc!, info.machineAliases.q35!, 'pc-i440fx-2.9']) {
    t.ok(info.knownMachines.includes(name), `knows ${name}`);
  }
  t.notOk(info.knownMachines.includes('Supported'), 'the header line is no machine');

  t.type(info.kvmUsable, 'boolean');
  if (!kvmUsable()) t.notOk(info.kvmUsable, 'no usable /dev/kvm: no KVM');
  t.comment(`kvm usable here: ${info.kvmUsable}`);

  t.same(await probeQemu(info.binary), info, 'an explicit binary gives the same answer');
});

t.test('probeQemu fails clearly for a missing or foreign binary', async (t) => {
  const dir = await tmpDir(t);
  t.match(await rejection(probeQemu(path.join(dir, 'nope'))), { code: 'ENOENT' });
  const fake = path.join(dir, 'fake-qemu');
  fs.writeFileSync(fake, '#!/bin/sh\necho "not qemu at all"\n', { mode: 0o755 });
  t.match((await rejection(probeQemu(fake))).message, /cannot read the qemu version .*not qemu at all/);
});

t.test('kvmUsable matches /dev/kvm', async (t) => {
  if (!fs.existsSync('/dev/kvm')) t.notOk(kvmUsable(), 'no /dev/kvm');
  else t.type(kvmUsable(), 'boolean');
});

t.test('resolveAccel', async (t) => {
  t.equal(resolveAccel('auto', true), 'kvm');
  t.equal(resolveAccel('auto', false), 'tcg');
  t.equal(resolveAccel('tcg', true), 'tcg');
  t.equal(resolveAccel('tcg', false), 'tcg');
  t.equal(resolveAccel('kvm', true), 'kvm');
  t.throws(() => resolveAccel('kvm', false), /kvm was requested, but KVM is not usable/);
});
