// Which firmware <os firmware='efi'> means: the selection over Debian's descriptors, and what the
// normalized XML then says; the descriptors themselves as read from disk.
import { mkdtemp, mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import t from 'tap';
import { normalizeDomainXml } from '../../src/domain/index.js';
import { selectFirmware, templateOf } from '../../src/domain/firmware.js';
import { descriptorOf, loadFirmwareDescriptors } from '../../src/qemu/firmware.js';
import { countingHost, DEBIAN_OVMF, domainXml, refusal } from './helpers.js';

const pick = (req: Parameters<typeof selectFirmware>[0]) => selectFirmware(req, DEBIAN_OVMF, '/domain/os/@firmware').loader.path;

t.test('the first descriptor that fits, in priority order', async (t) => {
  t.equal(pick({ machine: 'pc-q35-7.2', features: {} }), '/usr/share/OVMF/OVMF_CODE_4M.ms.fd', 'q35, nothing asked: secure boot with enrolled keys (as libvirt on Debian)');
  t.equal(pick({ machine: 'pc-i440fx-7.2', features: {} }), '/usr/share/OVMF/OVMF_CODE_4M.fd', 'i440fx: only the build without SMM fits');
  t.equal(pick({ machine: 'pc-q35-7.2', features: { 'enrolled-keys': false } }), '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd', 'no enrolled keys: the empty secure store');
  t.equal(pick({ machine: 'pc-q35-7.2', features: { 'secure-boot': false } }), '/usr/share/OVMF/OVMF_CODE_4M.fd', 'no secure boot');
  t.equal(pick({ machine: 'pc-q35-7.2', features: {}, smm: false }), '/usr/share/OVMF/OVMF_CODE_4M.fd', 'SMM off rules out the builds that need it');
  t.equal(pick({ machine: 'pc-q35-7.2', features: {}, secure: false }), '/usr/share/OVMF/OVMF_CODE_4M.fd', "secure='no': a flash not guarded by SMM");
  t.equal(pick({ machine: 'pc-q35-7.2', features: {}, template: '/usr/share/OVMF/OVMF_VARS_4M.fd' }), '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd', 'a named template narrows it down');
  const chosen = selectFirmware({ machine: 'pc-q35-7.2', features: {} }, DEBIAN_OVMF, '/x');
  t.same(chosen.features, { 'enrolled-keys': true, 'secure-boot': true });
  t.ok(chosen.requiresSmm && chosen.loader.secure, 'its flash is SMM-guarded');
  t.equal(chosen.template, '/usr/share/OVMF/OVMF_VARS_4M.ms.fd');
  t.equal(templateOf('/usr/share/OVMF/OVMF_CODE_4M.fd', DEBIAN_OVMF), '/usr/share/OVMF/OVMF_VARS_4M.fd', 'the template of a loader named by path');
  t.equal(templateOf('/usr/share/OVMF/OVMF_CODE.fd', DEBIAN_OVMF), undefined, 'none for a loader no descriptor names');
});

t.test('nothing fits: firmware_not_found, saying what was asked and what the host has', async (t) => {
  const xml = domainXml({ os: "<os firmware='efi'><type arch='x86_64' machine='pc'>hvm</type><firmware><feature enabled='yes' name='secure-boot'/></firmware></os>" });
  const err = refusal(() => normalizeDomainXml(xml, countingHost()));
  t.match(err, { code: 'firmware_not_found', details: { element: '/domain/os/@firmware' } });
  t.match(err.message, /machine pc-i440fx-7\.2, secure-boot/);
  t.match(err.message, /60-edk2-x86_64\.json/);
  const none = refusal(() => normalizeDomainXml(domainXml({ os: "<os firmware='efi'><type arch='x86_64' machine='pc'>hvm</type></os>" }), { ...countingHost(), firmwares: [] }));
  t.match(none.message, /no firmware descriptors \(Debian: apt-get install ovmf\)/);
});

t.test('normalize: an explicit loader keeps its path and gains the template of its descriptor; normalizing again changes nothing', async (t) => {
  const xml = domainXml({ os: "<os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader></os>" });
  const once = normalizeDomainXml(xml, countingHost());
  t.match(once.xml, /<loader readonly='yes' type='pflash'>\/usr\/share\/OVMF\/OVMF_CODE_4M.fd<\/loader>\s*<nvram template='\/usr\/share\/OVMF\/OVMF_VARS_4M.fd'\/>/);
  t.notMatch(once.xml, /<smm/, 'no SMM added for a loader that is not secure');
  t.equal(normalizeDomainXml(once.xml, countingHost()).xml, once.xml);
  const efi = normalizeDomainXml(domainXml({ os: "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>" }), countingHost());
  t.equal(normalizeDomainXml(efi.xml, countingHost()).xml, efi.xml, 'a chosen firmware stays chosen');
  t.match(efi.def.features.smm, { on: true });
  const tseg = normalizeDomainXml(domainXml({ os: "<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>", body: "<features><acpi/><smm state='on'><tseg unit='MiB'>48</tseg></smm></features>" }), countingHost());
  t.same(tseg.def.features.smm, { on: true, tsegMiB: 48 }, 'an explicit <smm> is kept as it is');
});

t.test('descriptors from disk: an earlier directory hides a later one of the same name; an empty file masks it; other architectures and broken files are left out', async (t) => {
  const root = await mkdtemp(path.join(tmpdir(), 'km-fw-'));
  t.teardown(() => import('node:fs/promises').then((fs) => fs.rm(root, { recursive: true, force: true })));
  const etc = path.join(root, 'etc');
  const share = path.join(root, 'share');
  await mkdir(etc);
  await mkdir(share);
  const desc = (code: string, arch = 'x86_64') => JSON.stringify({
    'interface-types': ['uefi'], mapping: { device: 'flash', executable: { filename: code, format: 'raw' }, 'nvram-template': { filename: `${code}.vars`, format: 'raw' } },
    targets: [{ architecture: arch, machines: ['pc-q35-*'] }], features: ['acpi-s3'],
  });
  await writeFile(path.join(share, '50-a.json'), desc('/fw/share-a'));
  await writeFile(path.join(etc, '50-a.json'), desc('/fw/etc-a'));
  await writeFile(path.join(share, '40-b.json'), desc('/fw/b'));
  await writeFile(path.join(share, '30-masked.json'), desc('/fw/masked'));
  await writeFile(path.join(etc, '30-masked.json'), '');
  await writeFile(path.join(share, '60-arm.json'), desc('/fw/arm', 'aarch64'));
  await writeFile(path.join(share, '70-broken.json'), '{');
  const scan = await loadFirmwareDescriptors([etc, share]);
  t.same(scan.descriptors.map((d) => d.executable), ['/fw/b', '/fw/etc-a'], 'in file-name order, /etc first');
  t.same(scan.skipped.map((s) => path.basename(s.file)), ['70-broken.json']);
  t.throws(() => descriptorOf('x', { 'interface-types': ['uefi'], mapping: { device: 'flash', mode: 'combined', executable: { filename: '/f' } }, targets: [{ architecture: 'x86_64', machines: ['*'] }] }), /combined/);
  t.throws(() => descriptorOf('x', { mapping: { device: 'flash', executable: { filename: 'rel' } }, targets: [{ architecture: 'x86_64', machines: ['*'] }] }), /absolute/);
});
