import t from 'tap';
import { domainFileRefs, normalizeDomainXml, parseDomainXml } from '../../src/domain/index.js';
import { countingHost, domainXml, readFixture } from './helpers.js';

const refsOf = (name: string) => domainFileRefs(normalizeDomainXml(readFixture(`${name}.xml`), countingHost()).def);

t.test('the minimal test guest', async (t) => {
  t.same(refsOf('minimal'), [
    { kind: 'disk', path: '/var/lib/x/guest.img', element: '/domain/devices/disk[1]/source/@file', mustExist: true, format: 'raw', writes: true, passable: true },
    { kind: 'serial', path: '/var/lib/x/serial.log', element: '/domain/devices/serial[1]/source/@path', mustExist: false, writes: true, passable: true, append: true },
  ]);
});

t.test('kernel, initrd and disks', async (t) => {
  t.same(refsOf('kernel-boot'), [
    { kind: 'kernel', path: '/var/lib/x/vmlinuz', element: '/domain/os/kernel', mustExist: true, writes: false, passable: true, loadsWhole: true },
    { kind: 'initrd', path: '/var/lib/x/initrd.img', element: '/domain/os/initrd', mustExist: true, writes: false, passable: true, loadsWhole: true },
    { kind: 'disk', path: '/var/lib/x/root.img', element: '/domain/devices/disk[1]/source/@file', mustExist: true, format: 'raw', writes: true, passable: true },
    { kind: 'serial', path: '/var/lib/x/kboot-serial.log', element: '/domain/devices/serial[1]/source/@path', mustExist: false, writes: true, passable: true },
  ]);
});

t.test('firmware: the loader and template are read-only firmware, the store is written', async (t) => {
  t.same(refsOf('legacy-pflash-i440fx').slice(0, 2), [
    { kind: 'loader', path: '/usr/share/OVMF/OVMF_CODE_4M.fd', element: '/domain/os/loader', mustExist: true, writes: false, passable: true, firmware: true },
    { kind: 'nvram', path: '/var/lib/kvm-migrate-test/nvram/legacy-efi_VARS.fd', element: '/domain/os/nvram', mustExist: false, writes: true, passable: true },
  ]);
  // The store the host keeps (no path in the XML) is no guest file; its template is read by the host.
  const own = domainFileRefs(parseDomainXml(domainXml({ os: "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader><nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/></os>" })));
  t.same(own.map((r) => [r.kind, r.path, r.writes]), [['loader', '/usr/share/OVMF/OVMF_CODE_4M.fd', false], ['nvram-template', '/usr/share/OVMF/OVMF_VARS_4M.fd', false]]);
  // A rom is read whole by qemu (-bios), like a kernel.
  const rom = domainFileRefs(parseDomainXml(domainXml({ os: "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><loader type='rom'>/v/bios.bin</loader></os>" })));
  t.match(rom, [{ kind: 'loader', loadsWhole: true, firmware: true, writes: false }]);
});

t.test('block devices, an empty cdrom, and a console that is the serial port', async (t) => {
  t.same(refsOf('console-only'), [
    { kind: 'disk', path: '/dev/vg0/console-only', element: '/domain/devices/disk[1]/source/@dev', mustExist: true, format: 'raw', writes: true, shareable: true, passable: true },
    { kind: 'disk', path: '/dev/sr0', element: '/domain/devices/disk[2]/source/@dev', mustExist: true, format: 'raw', writes: false, passable: true },
    { kind: 'disk', path: '/srv/vm/console-only-ro.raw', element: '/domain/devices/disk[3]/source/@file', mustExist: true, format: 'raw', writes: false, passable: true },
  ]);
  const c = domainFileRefs(parseDomainXml(domainXml({ devices: "<console type='file'><source path='/l/console.log'/></console>" })));
  t.same(c, [{ kind: 'console', path: '/l/console.log', element: '/domain/devices/console[1]/source/@path', mustExist: false, writes: true, passable: true }]);
  const empty = domainFileRefs(parseDomainXml(domainXml({ devices: "<disk type='file' device='cdrom'><target dev='hdc'/></disk>" })));
  t.same(empty, []);
});

t.test('character devices: files, sockets and logs', async (t) => {
  t.same(refsOf('chardevs'), [
    { kind: 'serial', path: '/var/log/vm/chardevs,serial0.log', element: '/domain/devices/serial[1]/source/@path', mustExist: false, writes: true, passable: true },
    { kind: 'log', path: '/var/log/vm/chardevs-serial0.debug', element: '/domain/devices/serial[1]/log/@file', mustExist: false, writes: true, passable: true, append: true },
    { kind: 'serial', path: '/run/vm/chardevs-serial1.sock', element: '/domain/devices/serial[2]/source/@path', mustExist: true, writes: false },
    { kind: 'channel', path: '/run/vm/chardevs.agent', element: '/domain/devices/channel[1]/source/@path', mustExist: false, writes: true, listens: true },
    { kind: 'channel', path: '/var/log/vm/chardevs-channel.log', element: '/domain/devices/channel[2]/source/@path', mustExist: false, writes: true, passable: true },
  ], 'the serial console aliases serial0 and adds no path of its own');
  const full = refsOf('full-i440fx');
  t.same(full.map((r) => [r.kind, r.path]), [
    ['disk', '/srv/vm/web-01, root.qcow2'],
    ['disk', '/srv/vm/web-01-data.raw'],
    ['disk', '/srv/vm/web-01-scratch.raw'],
    ['disk', '/srv/iso/tools.iso'],
    ['console', '/run/vm/web-01.console'],
    ['channel', '/run/vm/web-01.agent'],
  ]);
});

t.test('a disk ref carries its image format, so the caller can follow a qcow2 backing chain', async (t) => {
  const disks = refsOf('q35').filter((r) => r.kind === 'disk');
  t.ok(disks.some((r) => r.format === 'qcow2'), 'the qcow2 disk is marked qcow2');
  t.ok(disks.every((r) => r.format === 'qcow2' || r.format === 'raw'));
});
