import t from 'tap';
import { buildArgv, escapeOptionValue, normalizeDomainXml, parseDomainXml } from '../../src/domain/index.js';
import { countingHost, domainXml, KVM_HOST, readFixture, TCG_HOST, UUID, VDA } from './helpers.js';

const argvOf = (xml: string, host = KVM_HOST) => buildArgv(parseDomainXml(xml), host);
const opt = (argv: string[], flag: string) => {
  const i = argv.indexOf(flag);
  return i < 0 ? undefined : argv[i + 1];
};
const all = (argv: string[], flag: string) => argv.flatMap((a, i) => (a === flag ? [argv[i + 1]!] : []));

t.test('fixed parts', async (t) => {
  const argv = argvOf(domainXml());
  t.same(argv.slice(0, 3), ['-name', 'guest=t1,debug-threads=on', '-S']);
  t.equal(opt(argv, '-uuid'), UUID);
  t.ok(argv.includes('-no-user-config') && argv.includes('-nodefaults'));
  t.equal(opt(argv, '-display'), 'none');
  t.equal(opt(argv, '-pidfile'), KVM_HOST.pidfilePath);
  t.equal(opt(argv, '-mon'), 'chardev=charmonitor,id=monitor,mode=control');
  t.equal(all(argv, '-chardev')[0], `socket,id=charmonitor,path=${KVM_HOST.qmpSocketPath},server=on,wait=off`);
  t.equal(opt(argv, '-machine'), 'pc-i440fx-7.2,accel=kvm,usb=off,dump-guest-core=off,acpi=off');
  t.equal(opt(argv, '-m'), 'size=65536k');
  t.equal(opt(argv, '-smp'), '1,sockets=1,cores=1,threads=1');
  t.equal(opt(argv, '-rtc'), 'base=utc');
  t.equal(opt(argv, '-action'), 'reboot=reset,shutdown=poweroff,panic=shutdown');
  t.notOk(argv.includes('-cpu'), 'no <cpu>: the machine type default CPU');
  t.notOk(argv.includes('-incoming'));
  t.notOk(argv.includes('qemu-system-x86_64'), 'the binary is not part of argv');
});

t.test('incoming', async (t) => {
  const argv = buildArgv(parseDomainXml(domainXml()), KVM_HOST, { incoming: true });
  t.same(argv.slice(-2), ['-incoming', 'defer']);
  t.same(buildArgv(parseDomainXml(domainXml()), KVM_HOST, { incoming: false }), argvOf(domainXml()));
});

t.test('accelerator: kvm domains follow the host, qemu domains are TCG', async (t) => {
  t.match(opt(argvOf(domainXml(), TCG_HOST), '-machine'), /,accel=tcg,/);
  t.match(opt(argvOf(domainXml({ attrs: "type='qemu'" }), KVM_HOST), '-machine'), /,accel=tcg,/);
  t.match(opt(argvOf(domainXml({ attrs: "type='qemu'" }), TCG_HOST), '-machine'), /,accel=tcg,/);
});

t.test('cpu modes', async (t) => {
  const cpu = (body: string, host = KVM_HOST) => opt(argvOf(domainXml({ body }), host), '-cpu');
  // libvirt's default for host-passthrough and maximum is migratable='on' (dumpxml shows it).
  t.equal(cpu("<cpu mode='host-passthrough'/>"), 'host,migratable=on');
  t.equal(cpu("<cpu mode='host-passthrough'/>", TCG_HOST), 'max,migratable=on');
  t.equal(cpu("<cpu mode='host-passthrough' check='none' migratable='off'/>"), 'host,migratable=off');
  t.equal(cpu("<cpu mode='host-passthrough' check='full' migratable='on'/>"), 'host,migratable=on', 'check has no argv for the host CPU');
  t.equal(cpu("<cpu mode='host-model'/>"), 'host');
  t.equal(cpu("<cpu mode='host-model' check='partial'/>", TCG_HOST), 'max');
  t.equal(cpu("<cpu mode='maximum'/>"), 'max,migratable=on');
  t.equal(cpu("<cpu mode='maximum' migratable='off'/>"), 'max,migratable=off');
  t.equal(cpu('<cpu><model>host</model></cpu>', TCG_HOST), 'max,migratable=on');
  t.equal(cpu('<cpu><model>max</model></cpu>'), 'max,migratable=on');
  t.equal(cpu("<cpu mode='custom'><model fallback='allow'>qemu64</model></cpu>"), 'qemu64');
  t.equal(cpu("<cpu check='full'><model>Skylake-Client-v4</model><feature policy='force' name='tsc_adjust'/></cpu>"), 'Skylake-Client-v4,+tsc-adjust,enforce');
  t.equal(cpu("<cpu mode='host-passthrough'><feature policy='disable' name='vmx'/></cpu>"), 'host,migratable=on,-vmx');
  t.equal(cpu("<cpu><topology sockets='1' cores='1' threads='1'/></cpu>"), undefined);
});

t.test('paravirtual timers go on -cpu', async (t) => {
  const cpu = (body: string, host = KVM_HOST) => opt(argvOf(domainXml({ body }), host), '-cpu');
  t.equal(cpu("<cpu mode='host-passthrough'/><clock offset='utc'><timer name='kvmclock' present='no'/><timer name='tsc' frequency='2994000000'/></clock>"),
    'host,migratable=on,kvmclock=off,tsc-frequency=2994000000');
  t.equal(cpu("<cpu><model>EPYC-Rome</model><feature name='topoext'/></cpu><clock><timer name='kvmclock' present='yes'/></clock>"), 'EPYC-Rome,+topoext,kvmclock=on');
  t.equal(cpu("<clock><timer name='kvmclock' present='yes'/></clock>"), 'qemu64,kvmclock=on', 'no <cpu>: x86 default model');
  t.equal(cpu("<clock><timer name='kvmclock'/></clock>"), undefined, 'kvmclock without present: qemu default');
});

t.test('vcpus and topology', async (t) => {
  const smp = (vcpu: string, body = '') =>
    opt(argvOf(domainXml({ head: `<name>t1</name><uuid>${UUID}</uuid><memory unit='MiB'>64</memory>${vcpu}`, body })), '-smp');
  t.equal(smp('<vcpu>4</vcpu>'), '4,sockets=4,cores=1,threads=1');
  t.equal(smp("<vcpu current='1'>4</vcpu>"), '1,maxcpus=4,sockets=4,cores=1,threads=1');
  t.equal(smp("<vcpu current='2'>8</vcpu>", "<cpu><topology sockets='2' dies='2' cores='1' threads='2'/></cpu>"), '2,maxcpus=8,sockets=2,dies=2,cores=1,threads=2');
  // libvirt 9 + qemu 7.2: dies= whenever there is a <topology> (1 unless given); clusters='1' is every x86 guest.
  t.equal(smp('<vcpu>4</vcpu>', "<cpu><topology sockets='2' cores='2' threads='1'/></cpu>"), '4,sockets=2,dies=1,cores=2,threads=1');
  t.equal(smp('<vcpu>4</vcpu>', "<cpu><topology sockets='1' dies='1' clusters='1' cores='2' threads='2'/></cpu>"), '4,sockets=1,dies=1,cores=2,threads=2');
});

t.test('NUMA cells: a memory backend and a -numa node each, no pc.ram', async (t) => {
  const head = `<name>t1</name><uuid>${UUID}</uuid><memory unit='MiB'>192</memory><vcpu>4</vcpu>`;
  const argv = argvOf(domainXml({ head, body: "<cpu><topology sockets='2' cores='2' threads='1'/><numa><cell id='0' cpus='0,2-3' memory='65536' unit='KiB'/><cell id='1' cpus='1' memory='128' unit='MiB'/></numa></cpu>" }));
  t.same(all(argv, '-object'), ['memory-backend-ram,id=ram-node0,size=67108864', 'memory-backend-ram,id=ram-node1,size=134217728']);
  t.same(all(argv, '-numa'), ['node,nodeid=0,cpus=0,cpus=2-3,memdev=ram-node0', 'node,nodeid=1,cpus=1,memdev=ram-node1']);
  t.notMatch(opt(argv, '-machine'), /memory-backend/);
  t.equal(opt(argv, '-m'), 'size=196608k');
});

t.test('hugepages: RAM is a file on hugetlbfs, still named pc.ram', async (t) => {
  const host = { ...KVM_HOST, hugepagesPath: '/dev/hugepages/kvm-migrate/x,y' };
  const argv = argvOf(domainXml({ body: '<memoryBacking><hugepages/></memoryBacking>' }), host);
  t.equal(opt(argv, '-machine'), 'pc-i440fx-7.2,accel=kvm,usb=off,dump-guest-core=off,acpi=off,memory-backend=pc.ram');
  t.equal(opt(argv, '-object'), 'memory-backend-file,id=pc.ram,mem-path=/dev/hugepages/kvm-migrate/x,,y,x-use-canonical-path-for-ramblock-id=false,prealloc=on,size=67108864');
  const numa = argvOf(domainXml({ body: "<memoryBacking><hugepages/></memoryBacking><cpu><numa><cell cpus='0' memory='64' unit='MiB'/></numa></cpu>" }), host);
  t.same(all(numa, '-object'), ['memory-backend-file,id=ram-node0,mem-path=/dev/hugepages/kvm-migrate/x,,y,prealloc=on,size=67108864']);
  t.notMatch(opt(numa, '-machine'), /memory-backend/);
  t.throws(() => argvOf(domainXml({ body: '<memoryBacking><hugepages/></memoryBacking>' }), { ...KVM_HOST, hugepagesPath: undefined }), /hugepagesPath/);
});

t.test('iothreads', async (t) => {
  const disk = (iothread: string) => `<disk type='file' device='disk'><driver name='qemu' type='raw'${iothread}/><source file='/v/a.img'/><target dev='vda' bus='virtio'/></disk>`;
  const argv = argvOf(domainXml({ body: '<iothreads>2</iothreads>', devices: disk(" iothread='2'") }));
  t.same(all(argv, '-object'), ['iothread,id=iothread1', 'iothread,id=iothread2']);
  t.match(all(argv, '-device').find((d) => d.startsWith('virtio-blk-pci')), /^virtio-blk-pci,iothread=iothread2,bus=pci.0,addr=0x2,/);
  t.ok(argv.indexOf('-smp') < argv.indexOf('-object'), 'after -smp');
});

t.test('memory is rounded up to a whole MiB', async (t) => {
  const m = (mem: string) => opt(argvOf(domainXml({ head: `<name>t1</name><uuid>${UUID}</uuid>${mem}<vcpu>1</vcpu>` })), '-m');
  t.equal(m("<memory unit='KiB'>65537</memory>"), 'size=66560k');
  t.equal(m("<memory unit='b'>16777217</memory>"), 'size=17408k');
  t.equal(m("<memory unit='GiB'>1</memory>"), 'size=1048576k');
});

t.test('features and clock', async (t) => {
  t.equal(opt(argvOf(domainXml({ body: '<features><acpi/><apic/><pae/></features>' })), '-machine'), 'pc-i440fx-7.2,accel=kvm,usb=off,dump-guest-core=off');
  t.equal(opt(argvOf(domainXml({ body: "<features><acpi/><vmport state='on'/></features><clock><timer name='hpet' present='yes'/></clock>" })), '-machine'),
    'pc-i440fx-7.2,accel=kvm,usb=off,dump-guest-core=off,vmport=on,hpet=on');
  const clock = argvOf(domainXml({ body: "<clock offset='localtime'><timer name='rtc' tickpolicy='delay'/><timer name='pit' tickpolicy='discard'/></clock>" }));
  t.equal(opt(clock, '-rtc'), 'base=localtime');
  t.equal(opt(clock, '-global'), 'kvm-pit.lost_tick_policy=discard');
  const rtc = (timers: string) => opt(argvOf(domainXml({ body: `<clock offset='utc'>${timers}</clock>` })), '-rtc');
  t.equal(rtc("<timer name='rtc' track='guest' tickpolicy='catchup'/>"), 'base=utc,clock=vm,driftfix=slew');
  t.equal(rtc("<timer name='rtc' track='wall'/>"), 'base=utc,clock=host');
  t.equal(rtc("<timer name='rtc' track='realtime' tickpolicy='delay'/>"), 'base=utc,clock=rt');
  t.equal(opt(argvOf(domainXml({ body: "<clock><timer name='pit'/></clock>" })), '-global'), 'kvm-pit.lost_tick_policy=delay', 'a listed pit: libvirt always passes the policy');
  t.notOk(argvOf(domainXml({ body: "<clock><timer name='rtc'/></clock>" })).includes('-global'));
});

t.test('power management', async (t) => {
  const globals = (body: string, machine = 'pc-i440fx-7.2') =>
    all(argvOf(domainXml({ os: `<os><type arch='x86_64' machine='${machine}'>hvm</type></os>`, body })), '-global');
  t.same(globals("<pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm>"), ['PIIX4_PM.disable_s3=1', 'PIIX4_PM.disable_s4=1']);
  t.same(globals("<pm><suspend-to-disk enabled='yes'/><suspend-to-mem enabled='yes'/></pm>", 'pc-q35-7.2'), ['ICH9-LPC.disable_s3=0', 'ICH9-LPC.disable_s4=0']);
  t.same(globals("<pm><suspend-to-disk enabled='no'/></pm>", 'pc-q35-7.2'), ['ICH9-LPC.disable_s4=1']);
  t.same(globals('<pm/>'), []);
});

t.test('watchdogs', async (t) => {
  const q35 = "<os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>";
  const argv = argvOf(domainXml({ os: q35, devices: "<watchdog model='ib700' action='poweroff'/><watchdog model='i6300esb' action='poweroff'/><watchdog model='itco' action='poweroff'/>" }));
  // On q35 the (conventional PCI) i6300esb goes onto a pcie-to-pci-bridge, from slot 1, as libvirt places it.
  t.same(all(argv, '-device'), [
    'pcie-root-port,port=0x8,chassis=1,id=pci.1,bus=pcie.0,addr=0x1,multifunction=on',
    'pcie-pci-bridge,id=pci.2,bus=pci.1,addr=0x0',
    'pcie-root-port,port=0x9,chassis=3,id=pci.3,bus=pcie.0,addr=0x1.0x1',
    'ib700,id=watchdog0',
    'i6300esb,id=watchdog1,bus=pci.2,addr=0x1',
  ]);
  t.same(all(argv, '-global'), ['ICH9-LPC.noreboot=off']);
  t.equal(opt(argv, '-action'), 'reboot=reset,shutdown=poweroff,panic=shutdown,watchdog=poweroff');
  t.equal(opt(argvOf(domainXml({ devices: "<watchdog model='i6300esb'/>" })), '-action'), 'reboot=reset,shutdown=poweroff,panic=shutdown,watchdog=reset', "libvirt's default action is reset");
  for (const action of ['shutdown', 'pause', 'none', 'inject-nmi']) {
    t.match(opt(argvOf(domainXml({ devices: `<watchdog model='ib700' action='${action}'/>` })), '-action'), new RegExp(`,watchdog=${action}$`));
  }
});

t.test('smbios: libvirt key order, commas doubled', async (t) => {
  const sysinfo = `<sysinfo type='smbios'><chassis><entry name='sku'>S</entry><entry name='asset'>rack 4, slot 12</entry></chassis>
    <system><entry name='family'>F</entry><entry name='uuid'>${UUID.toUpperCase()}</entry><entry name='manufacturer'>M</entry></system>
    <bios><entry name='release'>1.2</entry><entry name='vendor'>V</entry><entry name='date'>01/02/2023</entry></bios>
    <baseBoard><entry name='location'>L</entry><entry name='product'>P</entry></baseBoard>
    <oemStrings><entry>a,b</entry><entry>c=d</entry></oemStrings></sysinfo>`;
  const os = (mode: string) => `<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><smbios mode='${mode}'/></os>`;
  const argv = argvOf(domainXml({ os: os('sysinfo'), body: sysinfo }));
  t.same(all(argv, '-smbios'), [
    'type=0,vendor=V,date=01/02/2023,release=1.2',
    `type=1,manufacturer=M,uuid=${UUID.toUpperCase()},family=F`,
    'type=2,product=P,location=L',
    'type=3,asset=rack 4,, slot 12,sku=S',
    'type=11,value=a,,b,value=c=d',
  ]);
  t.ok(argv.indexOf('-smbios') === argv.indexOf('-uuid') + 2, 'right after -uuid');
  t.notOk(argvOf(domainXml({ os: os('emulate'), body: sysinfo })).includes('-smbios'), "mode='emulate': qemu's own tables");
  t.notOk(argvOf(domainXml({ body: sysinfo })).includes('-smbios'), 'no <smbios>: libvirt does not pass the sysinfo either');
});

t.test('audio backends', async (t) => {
  const argv = argvOf(domainXml({ devices: "<graphics type='vnc' autoport='yes'/><audio id='1' type='none'/><audio id='3' type='none'/>" }));
  t.same(all(argv, '-audiodev'), ['id=audio1,driver=none', 'id=audio3,driver=none']);
  t.equal(opt(argv, '-vnc'), '127.0.0.1:0,to=99,audiodev=audio1');
  t.ok(argv.indexOf('-audiodev') < argv.indexOf('-vnc'));
  t.same(all(argvOf(domainXml({ devices: "<audio type='none'/>" })), '-audiodev'), ['id=audio1,driver=none'], 'a missing id is its position');
});

t.test('lifecycle actions', async (t) => {
  const action = (body: string) => opt(argvOf(domainXml({ body })), '-action');
  t.equal(action('<on_reboot>destroy</on_reboot>'), 'reboot=shutdown,shutdown=poweroff,panic=shutdown');
  t.equal(action('<on_poweroff>preserve</on_poweroff><on_crash>preserve</on_crash>'), 'reboot=reset,shutdown=pause,panic=pause');
  t.equal(action('<on_crash>preserve</on_crash>'), 'reboot=reset,shutdown=poweroff,panic=pause');
  t.equal(action('<on_crash>restart</on_crash>'), 'reboot=reset,shutdown=poweroff,panic=pause', 'restart: qemu pauses, the agent resets');
  t.equal(action('<on_poweroff>preserve</on_poweroff><on_crash>restart</on_crash>'), 'reboot=reset,shutdown=pause,panic=pause');
});

t.test('boot options', async (t) => {
  const os = (inner: string) => `<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>${inner}</os>`;
  t.equal(opt(argvOf(domainXml({ os: os("<bootmenu enable='yes'/>") })), '-boot'), 'menu=on,strict=on');
  t.equal(opt(argvOf(domainXml({ os: os("<bootmenu enable='no' timeout='10'/>") })), '-boot'), 'menu=off,splash-time=10,strict=on');
  const k = argvOf(domainXml({ os: os('<kernel>/k/vm,linuz</kernel><cmdline>a=b,c</cmdline>') }));
  t.equal(opt(k, '-kernel'), '/k/vm,linuz', '-kernel takes a plain file name: no comma doubling');
  t.equal(opt(k, '-append'), 'a=b,c');
  t.notOk(k.includes('-initrd'));
  const cd = "<disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc' bus='ide'/></disk>";
  const nic = "<interface type='user'><mac address='52:54:00:00:00:01'/></interface>";
  const order = argvOf(domainXml({ os: os("<boot dev='network'/><boot dev='cdrom'/>"), devices: VDA + cd + nic }));
  const devs = all(order, '-device');
  t.match(devs.find((x) => x.startsWith('rtl8139')), /,bootindex=1$/);
  t.match(devs.find((x) => x.startsWith('ide-cd')), /,bootindex=2$/);
  t.notMatch(devs.find((x) => x.startsWith('virtio-blk-pci')), /bootindex/);
  const dflt = all(argvOf(domainXml({ devices: cd + VDA })), '-device');
  t.match(dflt.find((x) => x.startsWith('virtio-blk-pci')), /,bootindex=1$/, 'no <boot>: the first hard disk');
  t.notMatch(dflt.find((x) => x.startsWith('ide-cd')), /bootindex/);
  const kernelOnly = all(argvOf(domainXml({ os: os('<kernel>/k</kernel>'), devices: VDA })), '-device');
  t.notMatch(kernelOnly.join(' '), /bootindex/, 'direct kernel boot with no <boot>: no bootindex');
});

t.test('disk cache modes', async (t) => {
  const devOf = (cache: string) => {
    const argv = argvOf(domainXml({ devices: `<disk type='file' device='disk'><driver name='qemu' type='raw' cache='${cache}'/><source file='/v/a.img'/><target dev='vda'/></disk>` }));
    return { blockdev: JSON.parse(all(argv, '-blockdev')[0]!) as { cache: unknown }, device: all(argv, '-device')[0]! };
  };
  const expected: [string, boolean, boolean, string][] = [
    ['none', true, false, 'on'], ['writethrough', false, false, 'off'], ['writeback', false, false, 'on'],
    ['directsync', true, false, 'off'], ['unsafe', false, true, 'on'],
  ];
  for (const [mode, direct, noFlush, wc] of expected) {
    const { blockdev, device } = devOf(mode);
    t.same(blockdev.cache, { direct, 'no-flush': noFlush }, mode);
    t.match(device, `,write-cache=${wc}`, mode);
  }
  const plain = all(argvOf(domainXml({ devices: VDA })), '-device')[0]!;
  t.notMatch(plain, 'write-cache', 'no cache attribute: qemu default (writeback)');
});

t.test('a qcow2 chain the agent opened: a node pair per layer, bottom-up, the last with backing null', async (t) => {
  const xml = domainXml({ devices: `<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/v/top.qcow2'/><target dev='vda' bus='virtio'/></disk>` });
  const chain = { dataFile: '/dev/fdset/2', backing: [{ file: '/dev/fdset/3', format: 'qcow2' as const }, { file: '/dev/fdset/4', format: 'raw' as const }] };
  const host = { ...KVM_HOST, fileArg: (p: string) => (p === '/v/top.qcow2' ? '/dev/fdset/1' : p), imageChain: (p: string) => (p === '/v/top.qcow2' ? chain : undefined) };
  const nodes = all(buildArgv(parseDomainXml(xml), host), '-blockdev').map((j) => JSON.parse(j) as Record<string, unknown>);
  const cache = { direct: true, 'no-flush': false };
  t.same(nodes, [
    { driver: 'file', filename: '/dev/fdset/4', 'node-name': 'file-virtio-disk0-b2', 'read-only': true, cache },
    { driver: 'raw', file: 'file-virtio-disk0-b2', 'node-name': 'drive-virtio-disk0-b2', 'read-only': true, cache },
    { driver: 'file', filename: '/dev/fdset/3', 'node-name': 'file-virtio-disk0-b1', 'read-only': true, cache },
    { driver: 'qcow2', file: 'file-virtio-disk0-b1', 'node-name': 'drive-virtio-disk0-b1', 'read-only': true, cache, backing: 'drive-virtio-disk0-b2' },
    { driver: 'file', filename: '/dev/fdset/1', 'node-name': 'file-virtio-disk0', cache },
    { driver: 'file', filename: '/dev/fdset/2', 'node-name': 'data-virtio-disk0', cache },
    { driver: 'qcow2', file: 'file-virtio-disk0', 'node-name': 'drive-virtio-disk0', cache, backing: 'drive-virtio-disk0-b1', 'data-file': 'data-virtio-disk0' },
  ]);
  const single = all(buildArgv(parseDomainXml(xml), { ...host, imageChain: () => ({ backing: [] }) }), '-blockdev').map((j) => JSON.parse(j) as Record<string, unknown>);
  t.equal(single.length, 2);
  t.equal(single[1]!.backing, null, 'an image without backing file: qemu is told so, and reads no name from the header');
  const unopened = all(argvOf(xml), '-blockdev').map((j) => JSON.parse(j) as Record<string, unknown>);
  t.notOk('backing' in unopened[1]!, 'no chain given (a pure build): qemu follows the header');
});

t.test('PCI topology: devices on any bus, the root ports and bridges libvirt would add', async (t) => {
  const q35 = (devices: string) => normalizeDomainXml(domainXml({ os: "<os><type arch='x86_64' machine='q35'>hvm</type></os>", devices }), countingHost()).def;
  const devs = (def: ReturnType<typeof q35>) => all(buildArgv(def, KVM_HOST), '-device');
  // No PCI controllers in the XML: one root port per endpoint, plus one spare for hotplug.
  const bare = devs(q35(VDA + "<memballoon model='virtio'/>"));
  t.same(bare.filter((d) => d.startsWith('pcie-root-port')), [
    'pcie-root-port,port=0x8,chassis=1,id=pci.1,bus=pcie.0,addr=0x1,multifunction=on',
    'pcie-root-port,port=0x9,chassis=2,id=pci.2,bus=pcie.0,addr=0x1.0x1',
    'pcie-root-port,port=0xa,chassis=3,id=pci.3,bus=pcie.0,addr=0x1.0x2',
  ]);
  t.match(bare.find((d) => d.startsWith('virtio-blk-pci')), /bus=pci\.1,addr=0x0,/);
  t.match(bare.find((d) => d.startsWith('virtio-balloon-pci')), /bus=pci\.2,addr=0x0$/);

  // dmi-to-pci-bridge at 00:1e.0, a pci-bridge behind it with chassis_nr, a legacy NIC placed there by hand.
  const legacy = devs(q35("<controller type='pci' index='1' model='dmi-to-pci-bridge'/><controller type='pci' index='2' model='pci-bridge'/>" +
    "<interface type='user'><mac address='52:54:00:00:00:01'/><model type='e1000'/><address type='pci' domain='0x0000' bus='0x02' slot='0x03' function='0x0'/></interface>"));
  t.ok(legacy.includes('i82801b11-bridge,id=pci.1,bus=pcie.0,addr=0x1e'));
  t.ok(legacy.includes('pci-bridge,chassis_nr=2,id=pci.2,bus=pci.1,addr=0x0'), 'the pci-bridge on the DMI bridge, from its slot 0');
  t.match(legacy.find((d) => d.startsWith('e1000')), /,bus=pci\.2,addr=0x3$/);

  // A PCIe switch (its upstream port in a root port libvirt adds) and an expander bus with its root port.
  const switched = devs(q35("<controller type='pci' index='1' model='pcie-root-port'/><controller type='pci' index='2' model='pcie-switch-upstream-port'/>" +
    "<controller type='pci' index='3' model='pcie-switch-downstream-port'/><controller type='pci' index='4' model='pcie-switch-downstream-port'/>" +
    "<controller type='pci' index='5' model='pcie-expander-bus'/><controller type='pci' index='6' model='pcie-root-port'><address type='pci' bus='0x05' slot='0x00'/></controller>" + VDA));
  t.same(switched.filter((d) => /^(x3130|xio3130|pxb|pcie-root-port)/.test(d)), [
    'pcie-root-port,port=0x8,chassis=1,id=pci.1,bus=pcie.0,addr=0x1',
    'x3130-upstream,id=pci.2,bus=pci.1,addr=0x0',
    'xio3130-downstream,port=0x0,chassis=3,id=pci.3,bus=pci.2,addr=0x0',
    'xio3130-downstream,port=0x1,chassis=4,id=pci.4,bus=pci.2,addr=0x1',
    'pxb-pcie,bus_nr=254,id=pci.5,bus=pcie.0,addr=0x2',
    'pcie-root-port,port=0x0,chassis=6,id=pci.6,bus=pci.5,addr=0x0',
  ]);
  t.match(switched.find((d) => d.startsWith('virtio-blk-pci')), /bus=pci\.3,addr=0x0,/, 'an endpoint in a downstream port');
  t.throws(() => q35("<controller type='pci' index='1' model='pcie-switch-upstream-port'/><controller type='pci' index='2' model='pcie-root-port'/>"), /on a bus of a lower index than its own \(1\)/);

  // pc: a pci-bridge on pci.0; devices stay on the lowest bus while it has slots.
  const pc = all(buildArgv(normalizeDomainXml(domainXml({ devices: "<controller type='pci' index='1' model='pci-bridge'/>" + VDA }), countingHost()).def, KVM_HOST), '-device');
  t.ok(pc.includes('pci-bridge,chassis_nr=1,id=pci.1,bus=pci.0,addr=0x2'));
  t.match(pc.find((d) => d.startsWith('virtio-blk-pci')), /bus=pci\.0,addr=0x3,/);
});

t.test("a disk serial as long as Nova's volume UUIDs is passed as given", async (t) => {
  const serial = '9c4d1e7a-1111-2222-3333-444455556666';
  const argv = argvOf(domainXml({ devices: `<disk type='file' device='disk'><source file='/v/a.img'/><target dev='vda' bus='virtio'/><serial>${serial}</serial></disk>` }));
  t.match(all(argv, '-device').find((d) => d.startsWith('virtio-blk-pci')), `,serial=${serial}`);
});

t.test('an interface <mtu>: host_mtu on a virtio NIC, as libvirt tells the guest', async (t) => {
  const host = { ...KVM_HOST, tapName: (id: string) => `kmtap-${id}` };
  const nic = (model: string) => all(buildArgv(parseDomainXml(domainXml({ devices: `<interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><model type='${model}'/><mtu size='9000'/></interface>` })), host), '-device')[0];
  t.match(nic('virtio'), /^virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:00:00:01,host_mtu=9000,bus=/);
  t.notMatch(nic('e1000'), /host_mtu/, 'an e1000 has no such property: only the tap has the MTU');
});

t.test('sound: HDA controllers with their codecs, AC97, each playing into an audio backend', async (t) => {
  const devs = (devices: string, machine = 'pc-i440fx-7.2') =>
    all(buildArgv(normalizeDomainXml(domainXml({ os: `<os><type arch='x86_64' machine='${machine}'>hvm</type></os>`, devices }), countingHost()).def, KVM_HOST), '-device');
  const q35 = devs("<sound model='ich9'/>", 'pc-q35-7.2');
  t.ok(q35.includes('ich9-intel-hda,id=sound0,bus=pcie.0,addr=0x1b'), "q35's first ich9 at 00:1b, as libvirt");
  t.ok(q35.includes('hda-duplex,id=sound0-codec0,bus=sound0.0,cad=0,audiodev=audio1'), "one duplex codec by default, on libvirt's implicit backend");
  const pc = devs("<audio id='3' type='none'/><sound model='ich6'><codec type='micro'/><codec type='output'/></sound><sound model='ac97'/>");
  t.match(pc.find((d) => d.startsWith('intel-hda')), /^intel-hda,id=sound0,bus=pci\.0,addr=0x\d$/);
  t.ok(pc.includes('hda-micro,id=sound0-codec0,bus=sound0.0,cad=0,audiodev=audio3'));
  t.ok(pc.includes('hda-output,id=sound0-codec1,bus=sound0.0,cad=1,audiodev=audio3'));
  t.match(pc.find((d) => d.startsWith('AC97')), /^AC97,id=sound1,audiodev=audio3,bus=pci\.0,addr=0x\d$/);
});

t.test("tpm: libvirt's defaults (tpm-tis, TPM 1.2 on a tis, 2.0 on a crb) written back; the emulator on swtpm's socket", async (t) => {
  const norm = (devices: string) => normalizeDomainXml(domainXml({ devices }), countingHost());
  const tis = norm("<tpm><backend type='emulator'/></tpm>");
  t.match(tis.def.tpm, { model: 'tpm-tis', version: '1.2' });
  t.match(tis.xml, /<tpm model='tpm-tis'>\s*<backend type='emulator' version='1.2'\/>\s*<\/tpm>/);
  const crb = norm("<tpm model='tpm-crb'><backend type='emulator'><active_pcr_banks><sha384/><sha1/></active_pcr_banks></backend></tpm>");
  t.match(crb.def.tpm, { model: 'tpm-crb', version: '2.0', activePcrBanks: ['sha1', 'sha384'] });
  const argv = buildArgv(crb.def, { ...KVM_HOST, tpmSocketPath: '/run/a,b/swtpm.sock' });
  const at = argv.indexOf('-tpmdev');
  t.same(argv.slice(at, at + 6), ['-tpmdev', 'emulator,id=tpm-tpm0,chardev=chrtpm', '-chardev', 'socket,id=chrtpm,path=/run/a,,b/swtpm.sock', '-device', 'tpm-crb,tpmdev=tpm-tpm0,id=tpm0']);
  t.throws(() => buildArgv(crb.def, { ...KVM_HOST, tpmSocketPath: undefined }), /tpmSocketPath/);
});

t.test('user strings are escaped in option values', async (t) => {
  t.equal(escapeOptionValue('/a,b,,c'), '/a,,b,,,,c');
  const argv = buildArgv(parseDomainXml(domainXml({ devices: "<serial type='unix'><source mode='bind' path='/run/a,b.sock'/><log file='/l/x,y'/></serial>" })),
    { ...KVM_HOST, qmpSocketPath: '/run/q,mp.sock', pidfilePath: '/run/p,id' });
  t.equal(all(argv, '-chardev')[0], 'socket,id=charmonitor,path=/run/q,,mp.sock,server=on,wait=off');
  t.equal(all(argv, '-chardev')[1], 'socket,id=charserial0,path=/run/a,,b.sock,server=on,wait=off,logfile=/l/x,,y');
  t.equal(opt(argv, '-pidfile'), '/run/p,id', '-pidfile takes a plain file name');
  const disk = all(argvOf(domainXml({ devices: "<disk type='file' device='disk'><source file='/v/a,b &quot;c&quot;.img'/><target dev='vda'/></disk>" })), '-blockdev')[0]!;
  t.equal(JSON.parse(disk).filename, '/v/a,b "c".img', 'blockdev JSON carries the path verbatim');
});

t.test('the builder is deterministic and pure', async (t) => {
  for (const name of ['full-i440fx', 'q35', 'chardevs', 'explicit-addresses']) {
    const xml = readFixture(`${name}.xml`);
    const a = normalizeDomainXml(xml, countingHost());
    const b = normalizeDomainXml(xml, countingHost());
    const before = JSON.stringify(a.def);
    t.same(buildArgv(a.def, KVM_HOST, { incoming: true }), buildArgv(b.def, KVM_HOST, { incoming: true }), name);
    t.equal(JSON.stringify(a.def), before, `${name}: the model is not modified`);
  }
});

t.test('normalization writes back exactly the layout the builder chose', async (t) => {
  for (const name of ['full-i440fx', 'explicit-addresses', 'console-only', 'chardevs']) {
    const xml = readFixture(`${name}.xml`);
    if (!/machine='pc-/.test(xml)) {
      t.pass(`${name}: alias machine, compared via golden files`);
      continue;
    }
    t.same(buildArgv(parseDomainXml(normalizeDomainXml(xml, countingHost()).xml), KVM_HOST), buildArgv(parseDomainXml(xml), KVM_HOST), name);
  }
});

t.test('formatting of the XML does not matter', async (t) => {
  const a = `<domain type='kvm'><name>t1</name><uuid>${UUID}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os><devices>${VDA}</devices></domain>`;
  const b = `<?xml version="1.0"?>\n<domain type="kvm">\n  <!-- c -->\n  <devices>\n    <disk device="disk" type="file">\n      <target bus="virtio" dev="vda"/>\n      <source file="/v/a.img"/>\n    </disk>\n  </devices>\n  <os>\n    <type machine="pc-i440fx-7.2" arch="x86_64">  hvm  </type>\n  </os>\n  <vcpu> 1 </vcpu>\n  <memory unit="KiB">65536</memory>\n  <uuid>${UUID.toUpperCase()}</uuid>\n  <name>t1</name>\n</domain>\n`;
  t.same(argvOf(b), argvOf(a));
});
