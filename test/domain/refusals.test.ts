/**
 * Everything the builder does not understand is refused with a DomainXmlError naming the
 * element: each case is [what, xml, code, element path].
 */
import t from 'tap';
import { DomainXmlError } from '../../src/errors.js';
import { parseDomainXml } from '../../src/domain/index.js';
import { domainXml as d, NIC, refusal, UUID, VDA } from './helpers.js';

const head = (o: { name?: string; uuid?: string; memory?: string; vcpu?: string; extra?: string } = {}) =>
  `<name>${o.name ?? 't1'}</name>${o.uuid ?? `<uuid>${UUID}</uuid>`}${o.memory ?? "<memory unit='MiB'>64</memory>"}${o.vcpu ?? '<vcpu>1</vcpu>'}${o.extra ?? ''}`;
const os = (inner: string, typeAttrs = "arch='x86_64' machine='pc-i440fx-7.2'", osAttrs = '') =>
  `<os${osAttrs}><type ${typeAttrs}>hvm</type>${inner}</os>`;
const disk = (inner: string, attrs = "type='file' device='disk'") => `<disk ${attrs}>${inner}</disk>`;
const SRC = "<source file='/v/a.img'/>";
const mac = (n: number) => `52:54:00:00:00:${String(n).padStart(2, '0')}`;
const serial = (inner: string, type = 'pty') => `<serial type='${type}'>${inner}</serial>`;
const tablet = "<input type='tablet' bus='usb'/>";

type Case = [string, string, string, string];
const cases: Case[] = [
  // document
  ['DOCTYPE', `<!DOCTYPE domain>${d()}`, 'invalid_xml', '/'],
  ['ENTITY declaration', `<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>${d({ head: head({ name: '&x;' }) })}`, 'invalid_xml', '/'],
  ['entity reference', d({ head: head({ name: 't&x;' }) }), 'invalid_xml', '/'],
  ['stray ampersand in an attribute', d({ devices: "<disk type='file' device='disk'><source file='/v/a&b'/><target dev='vda'/></disk>" }), 'invalid_xml', '/'],
  ['illegal character reference', d({ head: head({ name: 't&#1;' }) }), 'invalid_xml', '/'],
  ['malformed', '<domain type="kvm"><name>x</domain>', 'invalid_xml', '/'],
  ['not XML', 'hello', 'invalid_xml', '/'],
  ['empty', '', 'invalid_xml', '/'],
  ['two roots', `${d()}<domain/>`, 'invalid_xml', '/'],
  ['control character', d({ head: head({ name: 't\u0001' }) }), 'invalid_xml', '/'],
  ['root is not domain', "<vm type='kvm'/>", 'unsupported_element', '/vm'],
  ['qemu command line', d({ body: "<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-device'/></qemu:commandline>" }), 'unsupported_element', '/domain/qemu:commandline'],
  ['text where none belongs', d({ body: '<features><acpi>yes</acpi></features>' }), 'invalid_value', '/domain/features/acpi'],

  // domain
  ['missing type', d({ attrs: '' }), 'missing_attribute', '/domain/@type'],
  ['type xen', d({ attrs: "type='xen'" }), 'unsupported_value', '/domain/@type'],
  ['live id', d({ attrs: "type='kvm' id='3'" }), 'unsupported_attribute', '/domain/@id'],
  ['missing name', d({ head: `<uuid>${UUID}</uuid><memory>65536</memory><vcpu>1</vcpu>` }), 'missing_element', '/domain/name'],
  ['name with a space', d({ head: head({ name: 'my vm' }) }), 'invalid_value', '/domain/name'],
  ['name with a comma', d({ head: head({ name: 'a,b' }) }), 'invalid_value', '/domain/name'],
  ['name with a slash', d({ head: head({ name: '../x' }) }), 'invalid_value', '/domain/name'],
  ['name too long', d({ head: head({ name: 'a'.repeat(65) }) }), 'invalid_value', '/domain/name'],
  ['two names', d({ head: `${head()}<name>t2</name>` }), 'duplicate_element', '/domain/name[2]'],
  ['missing uuid', d({ head: head({ uuid: '' }) }), 'missing_element', '/domain/uuid'],
  ['bad uuid', d({ head: head({ uuid: '<uuid>not-a-uuid</uuid>' }) }), 'invalid_value', '/domain/uuid'],
  ['short uuid', d({ head: head({ uuid: '<uuid>8f0e4d2c-6b1a-4c3e-9d5f-7a8b9c0d1e2</uuid>' }) }), 'invalid_value', '/domain/uuid'],
  ['nil uuid', d({ head: head({ uuid: '<uuid>00000000-0000-0000-0000-000000000000</uuid>' }) }), 'invalid_value', '/domain/uuid'],
  ['title over two lines', d({ head: `${head()}<title>a&#10;b</title>` }), 'invalid_value', '/domain/title'],
  ['metadata attribute', d({ head: `${head()}<metadata foo='1'/>` }), 'unsupported_attribute', '/domain/metadata/@foo'],
  ['missing memory', d({ head: `<name>t1</name><uuid>${UUID}</uuid><vcpu>1</vcpu>` }), 'missing_element', '/domain/memory'],
  ['memory dumpCore', d({ head: head({ memory: "<memory unit='MiB' dumpCore='on'>64</memory>" }) }), 'unsupported_attribute', '/domain/memory/@dumpCore'],
  ['maxMemory', d({ head: head({ extra: "<maxMemory slots='16' unit='GiB'>4</maxMemory>" }) }), 'unsupported_element', '/domain/maxMemory'],
  ['memoryBacking', d({ body: '<memoryBacking><hugepages/></memoryBacking>' }), 'unsupported_element', '/domain/memoryBacking'],
  ['memtune', d({ body: "<memtune><hard_limit unit='G'>1</hard_limit></memtune>" }), 'unsupported_element', '/domain/memtune'],
  ['blkiotune', d({ body: '<blkiotune><weight>800</weight></blkiotune>' }), 'unsupported_element', '/domain/blkiotune'],
  ['numatune', d({ body: "<numatune><memory mode='strict' nodeset='0'/></numatune>" }), 'unsupported_element', '/domain/numatune'],
  ['iothreads', d({ body: '<iothreads>2</iothreads>' }), 'unsupported_element', '/domain/iothreads'],
  ['cputune', d({ body: "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>" }), 'unsupported_element', '/domain/cputune'],
  ['vcpus', d({ body: "<vcpus><vcpu id='0' enabled='yes'/></vcpus>" }), 'unsupported_element', '/domain/vcpus'],
  ['resource', d({ body: '<resource><partition>/machine</partition></resource>' }), 'unsupported_element', '/domain/resource'],
  ['sysinfo', d({ body: "<sysinfo type='smbios'/>" }), 'unsupported_element', '/domain/sysinfo'],
  ['seclabel', d({ body: "<seclabel type='dynamic' model='selinux'/>" }), 'unsupported_element', '/domain/seclabel'],
  ['pm', d({ body: "<pm><suspend-to-mem enabled='no'/></pm>" }), 'unsupported_element', '/domain/pm'],
  ['perf', d({ body: "<perf><event name='cmt' enabled='yes'/></perf>" }), 'unsupported_element', '/domain/perf'],
  ['genid', d({ body: '<genid/>' }), 'unsupported_element', '/domain/genid'],
  ['launchSecurity', d({ body: "<launchSecurity type='sev'/>" }), 'unsupported_element', '/domain/launchSecurity'],

  // vcpu
  ['zero vcpus', d({ head: head({ vcpu: '<vcpu>0</vcpu>' }) }), 'invalid_value', '/domain/vcpu'],
  ['256 vcpus', d({ head: head({ vcpu: '<vcpu>256</vcpu>' }) }), 'invalid_value', '/domain/vcpu'],
  ['vcpu not a number', d({ head: head({ vcpu: '<vcpu>two</vcpu>' }) }), 'invalid_value', '/domain/vcpu'],
  ['missing vcpu', d({ head: head({ vcpu: '' }) }), 'missing_element', '/domain/vcpu'],
  ['vcpu current above vcpu', d({ head: head({ vcpu: "<vcpu current='3'>2</vcpu>" }) }), 'invalid_value', '/domain/vcpu/@current'],
  ['vcpu placement auto', d({ head: head({ vcpu: "<vcpu placement='auto'>1</vcpu>" }) }), 'unsupported_value', '/domain/vcpu/@placement'],
  ['vcpu cpuset', d({ head: head({ vcpu: "<vcpu cpuset='1-3'>1</vcpu>" }) }), 'unsupported_attribute', '/domain/vcpu/@cpuset'],

  // os
  ['missing os', d({ os: '' }), 'missing_element', '/domain/os'],
  ['os type xen', d({ os: "<os><type arch='x86_64'>xen</type></os>" }), 'unsupported_value', '/domain/os/type'],
  ['arch i686', d({ os: os('', "arch='i686' machine='pc'") }), 'unsupported_value', '/domain/os/type/@arch'],
  ['arch aarch64', d({ os: os('', "arch='aarch64' machine='virt'") }), 'unsupported_value', '/domain/os/type/@arch'],
  ['machine isapc', d({ os: os('', "arch='x86_64' machine='isapc'") }), 'unsupported_value', '/domain/os/type/@machine'],
  ['machine microvm', d({ os: os('', "arch='x86_64' machine='microvm'") }), 'unsupported_value', '/domain/os/type/@machine'],
  ['machine with a comma', d({ os: os('', "arch='x86_64' machine='pc,accel=tcg'") }), 'unsupported_value', '/domain/os/type/@machine'],
  ['firmware efi', d({ os: os('', undefined, " firmware='efi'") }), 'unsupported_attribute', '/domain/os/@firmware'],
  ['loader', d({ os: os("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>") }), 'unsupported_element', '/domain/os/loader'],
  ['nvram', d({ os: os('<nvram>/var/lib/nvram.fd</nvram>') }), 'unsupported_element', '/domain/os/nvram'],
  ['smbios', d({ os: os("<smbios mode='sysinfo'/>") }), 'unsupported_element', '/domain/os/smbios'],
  ['bios', d({ os: os("<bios useserial='yes'/>") }), 'unsupported_element', '/domain/os/bios'],
  ['dtb', d({ os: os('<dtb>/x.dtb</dtb>') }), 'unsupported_element', '/domain/os/dtb'],
  ['boot from floppy', d({ os: os("<boot dev='fd'/>") }), 'unsupported_value', '/domain/os/boot[1]/@dev'],
  ['boot dev twice', d({ os: os("<boot dev='hd'/><boot dev='cdrom'/><boot dev='hd'/>") }), 'invalid_value', '/domain/os/boot[3]/@dev'],
  ['boot without dev', d({ os: os('<boot/>') }), 'missing_attribute', '/domain/os/boot[1]/@dev'],
  ['bootmenu enable maybe', d({ os: os("<bootmenu enable='maybe'/>") }), 'unsupported_value', '/domain/os/bootmenu/@enable'],
  ['bootmenu timeout too big', d({ os: os("<bootmenu enable='yes' timeout='70000'/>") }), 'invalid_value', '/domain/os/bootmenu/@timeout'],
  ['initrd without kernel', d({ os: os('<initrd>/boot/initrd</initrd>') }), 'missing_element', '/domain/os/kernel'],
  ['cmdline without kernel', d({ os: os('<cmdline>quiet</cmdline>') }), 'missing_element', '/domain/os/kernel'],
  ['relative kernel', d({ os: os('<kernel>boot/vmlinuz</kernel>') }), 'invalid_value', '/domain/os/kernel'],
  ['kernel with ..', d({ os: os('<kernel>/srv/../etc/shadow</kernel>') }), 'invalid_value', '/domain/os/kernel'],
  // A multiboot kernel would load every comma-separated "FILE ARGS" of -initrd as a module.
  ['initrd with a comma', d({ os: os('<kernel>/v/vmlinuz</kernel><initrd>/v/initrd.img,/etc/shadow</initrd>') }), 'invalid_value', '/domain/os/initrd'],
  ['initrd with a blank', d({ os: os('<kernel>/v/vmlinuz</kernel><initrd>/v/initrd.img /etc/shadow</initrd>') }), 'invalid_value', '/domain/os/initrd'],

  // features
  ['hyperv', d({ body: "<features><hyperv><relaxed state='on'/></hyperv></features>" }), 'unsupported_element', '/domain/features/hyperv'],
  ['kvm hidden', d({ body: "<features><kvm><hidden state='on'/></kvm></features>" }), 'unsupported_element', '/domain/features/kvm'],
  ['smm', d({ body: "<features><smm state='on'/></features>" }), 'unsupported_element', '/domain/features/smm'],
  ['pmu', d({ body: "<features><pmu state='off'/></features>" }), 'unsupported_element', '/domain/features/pmu'],
  ['apic eoi', d({ body: "<features><apic eoi='on'/></features>" }), 'unsupported_attribute', '/domain/features/apic/@eoi'],
  ['vmport auto', d({ body: "<features><vmport state='auto'/></features>" }), 'unsupported_value', '/domain/features/vmport/@state'],
  ['acpi twice', d({ body: '<features><acpi/><acpi/></features>' }), 'duplicate_element', '/domain/features/acpi[2]'],

  // cpu
  ['unknown cpu model', d({ body: '<cpu><model>Pentium9000</model></cpu>' }), 'unsupported_value', '/domain/cpu/model'],
  ['cpu match minimum', d({ body: "<cpu match='minimum'><model>Haswell</model></cpu>" }), 'unsupported_value', '/domain/cpu/@match'],
  ['cpu mode weird', d({ body: "<cpu mode='host'/>" }), 'unsupported_value', '/domain/cpu/@mode'],
  ['cpu migratable', d({ body: "<cpu mode='host-passthrough' migratable='on'/>" }), 'unsupported_attribute', '/domain/cpu/@migratable'],
  ['cpu model with host-model', d({ body: "<cpu mode='host-model'><model fallback='allow'/></cpu>" }), 'unsupported_element', '/domain/cpu/model'],
  ['cpu check with host-passthrough', d({ body: "<cpu mode='host-passthrough' check='none'/>" }), 'unsupported_attribute', '/domain/cpu/@check'],
  ['cpu vendor', d({ body: '<cpu><model>Haswell</model><vendor>Intel</vendor></cpu>' }), 'unsupported_element', '/domain/cpu/vendor'],
  ['cpu numa', d({ body: "<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>" }), 'unsupported_element', '/domain/cpu/numa'],
  ['cpu cache', d({ body: "<cpu mode='host-passthrough'><cache mode='passthrough'/></cpu>" }), 'unsupported_element', '/domain/cpu/cache'],
  ['model vendor_id', d({ body: "<cpu><model vendor_id='GenuineIOtel'>Haswell</model></cpu>" }), 'unsupported_attribute', '/domain/cpu/model/@vendor_id'],
  ['model fallback bad', d({ body: "<cpu><model fallback='maybe'>Haswell</model></cpu>" }), 'unsupported_value', '/domain/cpu/model/@fallback'],
  ['unknown cpu feature', d({ body: "<cpu><model>Haswell</model><feature policy='require' name='warp-drive'/></cpu>" }), 'unsupported_value', '/domain/cpu/feature[1]/@name'],
  ['not settable feature', d({ body: "<cpu><model>Haswell</model><feature name='vmx'/><feature name='osxsave'/></cpu>" }), 'unsupported_value', '/domain/cpu/feature[2]/@name'],
  ['bad feature policy', d({ body: "<cpu><model>Haswell</model><feature policy='require' name='vmx'/><feature policy='maybe' name='svm'/></cpu>" }), 'unsupported_value', '/domain/cpu/feature[2]/@policy'],
  ['feature twice', d({ body: "<cpu><model>Haswell</model><feature name='lahf_lm'/><feature policy='disable' name='lahf-lm'/></cpu>" }), 'invalid_value', '/domain/cpu/feature[2]/@name'],
  ['features without a model', d({ body: "<cpu><feature name='vmx'/></cpu>" }), 'missing_element', '/domain/cpu/model'],
  ['topology mismatch', d({ head: head({ vcpu: '<vcpu>4</vcpu>' }), body: "<cpu><topology sockets='1' cores='2' threads='1'/></cpu>" }), 'invalid_value', '/domain/cpu/topology'],
  ['topology without threads', d({ body: "<cpu><topology sockets='1' cores='1'/></cpu>" }), 'missing_attribute', '/domain/cpu/topology/@threads'],
  ['topology clusters', d({ body: "<cpu><topology sockets='1' clusters='1' cores='1' threads='1'/></cpu>" }), 'unsupported_attribute', '/domain/cpu/topology/@clusters'],
  ['topology zero', d({ body: "<cpu><topology sockets='0' cores='1' threads='1'/></cpu>" }), 'invalid_value', '/domain/cpu/topology/@sockets'],

  // clock
  ['clock offset variable', d({ body: "<clock offset='variable' adjustment='0'/>" }), 'unsupported_attribute', '/domain/clock/@adjustment'],
  ['clock offset timezone', d({ body: "<clock offset='timezone'/>" }), 'unsupported_value', '/domain/clock/@offset'],
  ['kvmclock timer', d({ body: "<clock offset='utc'><timer name='kvmclock' present='yes'/></clock>" }), 'unsupported_value', '/domain/clock/timer[1]/@name'],
  ['rtc tickpolicy merge', d({ body: "<clock offset='utc'><timer name='rtc' tickpolicy='merge'/></clock>" }), 'unsupported_value', '/domain/clock/timer[1]/@tickpolicy'],
  ['pit catchup', d({ body: "<clock offset='utc'><timer name='rtc'/><timer name='pit' tickpolicy='catchup'/></clock>" }), 'unsupported_value', '/domain/clock/timer[2]/@tickpolicy'],
  ['no pit', d({ body: "<clock offset='utc'><timer name='pit' present='no'/></clock>" }), 'unsupported_value', '/domain/clock/timer[1]/@present'],
  ['hpet tickpolicy', d({ body: "<clock offset='utc'><timer name='hpet' tickpolicy='delay'/></clock>" }), 'unsupported_attribute', '/domain/clock/timer[1]/@tickpolicy'],
  ['rtc track', d({ body: "<clock offset='utc'><timer name='rtc' track='guest'/></clock>" }), 'unsupported_attribute', '/domain/clock/timer[1]/@track'],
  ['timer catchup child', d({ body: "<clock offset='utc'><timer name='rtc' tickpolicy='catchup'><catchup threshold='123'/></timer></clock>" }), 'unsupported_element', '/domain/clock/timer[1]/catchup'],
  ['timer twice', d({ body: "<clock><timer name='rtc'/><timer name='rtc'/></clock>" }), 'invalid_value', '/domain/clock/timer[2]/@name'],

  // lifecycle
  ['on_poweroff restart', d({ body: '<on_poweroff>restart</on_poweroff>' }), 'unsupported_value', '/domain/on_poweroff'],
  ['on_poweroff rename-restart', d({ body: '<on_poweroff>rename-restart</on_poweroff>' }), 'unsupported_value', '/domain/on_poweroff'],
  ['on_reboot preserve', d({ body: '<on_reboot>preserve</on_reboot>' }), 'unsupported_value', '/domain/on_reboot'],
  ['on_crash restart', d({ body: '<on_crash>restart</on_crash>' }), 'unsupported_value', '/domain/on_crash'],
  ['on_crash coredump-destroy', d({ body: '<on_crash>coredump-destroy</on_crash>' }), 'unsupported_value', '/domain/on_crash'],
  ['reboot destroy with poweroff preserve', d({ body: '<on_poweroff>preserve</on_poweroff><on_reboot>destroy</on_reboot><on_crash>preserve</on_crash>' }), 'unsupported_value', '/domain/on_reboot'],
  ['crash destroy with poweroff preserve', d({ body: '<on_poweroff>preserve</on_poweroff>' }), 'unsupported_value', '/domain/on_crash'],
  ['on_lockfailure', d({ body: '<on_lockfailure>poweroff</on_lockfailure>' }), 'unsupported_element', '/domain/on_lockfailure'],

  // devices that are not supported at all
  ...['hostdev', 'filesystem', 'sound', 'watchdog', 'smartcard', 'redirdev', 'hub', 'panic', 'tpm', 'shmem', 'iommu',
    'vsock', 'lease', 'parallel', 'nvram', 'memory', 'crypto', 'audio', 'redirfilter'].map(
    (el): Case => [`<${el}>`, d({ devices: `${VDA}<${el}/>` }), 'unsupported_element', `/domain/devices/${el}[1]`]),
  ['second hostdev is still indexed', d({ devices: "<hostdev mode='subsystem'/>" }), 'unsupported_element', '/domain/devices/hostdev[1]'],

  // emulator
  ['emulator bash', d({ devices: '<emulator>/bin/bash</emulator>' }), 'unsupported_value', '/domain/devices/emulator'],
  ['emulator relative', d({ devices: '<emulator>qemu-kvm</emulator>' }), 'invalid_value', '/domain/devices/emulator'],
  ['two emulators', d({ devices: '<emulator>/usr/bin/kvm</emulator><emulator>/usr/bin/kvm</emulator>' }), 'duplicate_element', '/domain/devices/emulator[2]'],

  // disks
  ['network disk', d({ devices: disk("<source protocol='nbd' name='x'/><target dev='vda'/>", "type='network' device='disk'") }), 'unsupported_value', '/domain/devices/disk[1]/@type'],
  ['volume disk', d({ devices: disk("<source pool='p' volume='v'/><target dev='vda'/>", "type='volume' device='disk'") }), 'unsupported_value', '/domain/devices/disk[1]/@type'],
  ['floppy', d({ devices: disk(`${SRC}<target dev='fda' bus='fdc'/>`, "type='file' device='floppy'") }), 'unsupported_value', '/domain/devices/disk[1]/@device'],
  ['lun', d({ devices: disk("<source dev='/dev/sdb'/><target dev='sda' bus='scsi'/>", "type='block' device='lun'") }), 'unsupported_value', '/domain/devices/disk[1]/@device'],
  ['missing disk type', d({ devices: disk(`${SRC}<target dev='vda'/>`, "device='disk'") }), 'missing_attribute', '/domain/devices/disk[1]/@type'],
  ['disk snapshot attr', d({ devices: disk(`${SRC}<target dev='vda'/>`, "type='file' device='disk' snapshot='no'") }), 'unsupported_attribute', '/domain/devices/disk[1]/@snapshot'],
  ['driver type vmdk', d({ devices: disk(`<driver name='qemu' type='vmdk'/>${SRC}<target dev='vda'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/driver/@type'],
  ['driver name tap', d({ devices: disk(`<driver name='tap' type='raw'/>${SRC}<target dev='vda'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/driver/@name'],
  ['bad cache on the second disk', d({ devices: VDA + disk(`<driver name='qemu' type='raw' cache='fast'/>${SRC}<target dev='vdb'/>`) }), 'unsupported_value', '/domain/devices/disk[2]/driver/@cache'],
  ['io native without O_DIRECT', d({ devices: disk(`<driver name='qemu' type='raw' cache='writeback' io='native'/>${SRC}<target dev='vda'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/driver/@io'],
  ['io_uring', d({ devices: disk(`<driver name='qemu' type='raw' io='io_uring'/>${SRC}<target dev='vda'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/driver/@io'],
  ['driver iothread', d({ devices: disk(`<driver name='qemu' type='raw' iothread='1'/>${SRC}<target dev='vda'/>`) }), 'unsupported_attribute', '/domain/devices/disk[1]/driver/@iothread'],
  ['detect_zeroes', d({ devices: disk(`<driver name='qemu' type='raw' detect_zeroes='on'/>${SRC}<target dev='vda'/>`) }), 'unsupported_attribute', '/domain/devices/disk[1]/driver/@detect_zeroes'],
  ['disk without source', d({ devices: disk("<target dev='vda'/>") }), 'missing_element', '/domain/devices/disk[1]/source'],
  ['file disk with dev source', d({ devices: disk("<source dev='/dev/sdb'/><target dev='vda'/>") }), 'unsupported_attribute', '/domain/devices/disk[1]/source/@dev'],
  ['block disk with file source', d({ devices: disk(`${SRC}<target dev='vda'/>`, "type='block' device='disk'") }), 'unsupported_attribute', '/domain/devices/disk[1]/source/@file'],
  ['relative source', d({ devices: disk("<source file='a.img'/><target dev='vda'/>") }), 'invalid_value', '/domain/devices/disk[1]/source/@file'],
  ['source with ..', d({ devices: disk("<source file='/srv/vm/../../etc/shadow'/><target dev='vda'/>") }), 'invalid_value', '/domain/devices/disk[1]/source/@file'],
  ['source startupPolicy', d({ devices: disk("<source file='/v/a.img' startupPolicy='optional'/><target dev='vda'/>") }), 'unsupported_attribute', '/domain/devices/disk[1]/source/@startupPolicy'],
  ['source seclabel', d({ devices: disk("<source file='/v/a.img'><seclabel relabel='no'/></source><target dev='vda'/>") }), 'unsupported_element', '/domain/devices/disk[1]/source/seclabel'],
  ['missing target', d({ devices: disk(SRC) }), 'missing_element', '/domain/devices/disk[1]/target'],
  ['bus usb', d({ devices: disk(`${SRC}<target dev='sda' bus='usb'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/target/@bus'],
  ['bus xen', d({ devices: disk(`${SRC}<target dev='xvda' bus='xen'/>`) }), 'invalid_value', '/domain/devices/disk[1]/target/@dev'],
  ['target tray', d({ devices: disk(`<target dev='hdc' bus='ide' tray='open'/>`, "type='file' device='cdrom'") }), 'unsupported_attribute', '/domain/devices/disk[1]/target/@tray'],
  ['target vda on ide', d({ devices: disk(`${SRC}<target dev='vda' bus='ide'/>`) }), 'invalid_value', '/domain/devices/disk[1]/target/@dev'],
  ['target hda on sata', d({ devices: disk(`${SRC}<target dev='hda' bus='sata'/>`) }), 'invalid_value', '/domain/devices/disk[1]/target/@dev'],
  ['same target twice', d({ devices: VDA + VDA }), 'invalid_value', '/domain/devices/disk[2]/target/@dev'],
  ['virtio cdrom', d({ devices: disk("<target dev='vdb' bus='virtio'/>", "type='file' device='cdrom'") }), 'unsupported_value', '/domain/devices/disk[1]/target/@bus'],
  ['read-only IDE disk', d({ devices: disk(`${SRC}<target dev='hda' bus='ide'/><readonly/>`) }), 'unsupported_element', '/domain/devices/disk[1]/readonly'],
  ['read-only SATA disk', d({ devices: disk(`${SRC}<target dev='sda' bus='sata'/><readonly/>`) }), 'unsupported_element', '/domain/devices/disk[1]/readonly'],
  ['fifth IDE disk', d({ devices: disk(`${SRC}<target dev='hde' bus='ide'/>`) }), 'invalid_value', '/domain/devices/disk[1]/target/@dev'],
  ['IDE unit 2', d({ devices: disk(`${SRC}<target dev='hda' bus='ide'/><address type='drive' controller='0' bus='0' target='0' unit='2'/>`) }), 'invalid_value', '/domain/devices/disk[1]/address'],
  ['IDE on q35', d({ os: os('', "arch='x86_64' machine='q35'"), devices: disk(`${SRC}<target dev='hda' bus='ide'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/target/@bus'],
  ['same drive address twice', d({ devices: disk(`${SRC}<target dev='hda' bus='ide'/>`) + disk(`${SRC}<target dev='hdb' bus='ide'/><address type='drive' controller='0' bus='0' target='0' unit='0'/>`) }), 'invalid_value', '/domain/devices/disk[2]/address'],
  ['pci address on an IDE disk', d({ devices: disk(`${SRC}<target dev='hda' bus='ide'/><address type='pci' slot='5'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/address/@type'],
  ['drive address on a virtio disk', d({ devices: disk(`${SRC}<target dev='vda'/><address type='drive' unit='0'/>`) }), 'unsupported_value', '/domain/devices/disk[1]/address/@type'],
  ['backingStore', d({ devices: disk(`${SRC}<backingStore/><target dev='vda'/>`) }), 'unsupported_element', '/domain/devices/disk[1]/backingStore'],
  ['iotune', d({ devices: disk(`${SRC}<target dev='vda'/><iotune><total_bytes_sec>1</total_bytes_sec></iotune>`) }), 'unsupported_element', '/domain/devices/disk[1]/iotune'],
  ['encryption', d({ devices: disk(`${SRC}<target dev='vda'/><encryption format='luks'/>`) }), 'unsupported_element', '/domain/devices/disk[1]/encryption'],
  ['disk alias', d({ devices: disk(`${SRC}<target dev='vda'/><alias name='virtio-disk0'/>`) }), 'unsupported_element', '/domain/devices/disk[1]/alias'],
  ['disk serial with a comma', d({ devices: disk(`${SRC}<target dev='vda'/><serial>a,b</serial>`) }), 'invalid_value', '/domain/devices/disk[1]/serial'],
  ['boot loadparm', d({ devices: disk(`${SRC}<target dev='vda'/><boot order='1' loadparm='x'/>`) }), 'unsupported_attribute', '/domain/devices/disk[1]/boot/@loadparm'],
  ['boot order 0', d({ devices: disk(`${SRC}<target dev='vda'/><boot order='0'/>`) }), 'invalid_value', '/domain/devices/disk[1]/boot/@order'],
  ['per-device boot with os boot', d({ os: os("<boot dev='hd'/>"), devices: disk(`${SRC}<target dev='vda'/><boot order='1'/>`) }), 'invalid_value', '/domain/devices/disk[1]/boot'],
  ['same boot order twice', d({ devices: disk(`${SRC}<target dev='vda'/><boot order='1'/>`) + NIC(mac(1), "<boot order='1'/>") }), 'invalid_value', '/domain/devices/interface[1]/boot/@order'],

  // controllers
  ['controller fdc', d({ devices: "<controller type='fdc' index='0'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@type'],
  ['usb ehci', d({ devices: "<controller type='usb' index='0' model='ich9-ehci1'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@model'],
  ['usb index 1', d({ devices: "<controller type='usb' index='1' model='qemu-xhci'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@index'],
  ['two usb 0', d({ devices: "<controller type='usb' index='0' model='qemu-xhci'/><controller type='usb' index='0' model='qemu-xhci'/>" }), 'invalid_value', '/domain/devices/controller[2]/@index'],
  ['usb master', d({ devices: "<controller type='usb' index='0' model='qemu-xhci'><master startport='0'/></controller>" }), 'unsupported_element', '/domain/devices/controller[1]/master'],
  ['usb ports', d({ devices: "<controller type='usb' index='0' model='qemu-xhci' ports='15'/>" }), 'unsupported_attribute', '/domain/devices/controller[1]/@ports'],
  ['pcie-root-port on i440fx', d({ devices: "<controller type='pci' index='1' model='pcie-root-port'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@model'],
  ['pcie switch ports', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-switch-upstream-port'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@model'],
  ['pci expander bus', d({ devices: "<controller type='pci' index='1' model='pci-expander-bus'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@model'],
  ['root port with another qemu model', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-root-port'><model name='ioh3420'/></controller>" }), 'unsupported_value', '/domain/devices/controller[1]/model/@name'],
  ['root port target with busNr', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-root-port'><target busNr='3'/></controller>" }), 'unsupported_attribute', '/domain/devices/controller[1]/target/@busNr'],
  ['a root port at index 0', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='0' model='pcie-root-port'/>" }), 'invalid_value', '/domain/devices/controller[1]/@index'],
  ['a device on a bus no controller provides', d({ devices: disk(SRC + "<target dev='vda' bus='virtio'/><address type='pci' bus='0x03' slot='0x00'/>") }), 'invalid_value', '/domain/devices/disk[1]/address/@bus'],
  ['a device on slot 1 of a root port', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-root-port'/>" + disk(SRC + "<target dev='vda' bus='virtio'/><address type='pci' bus='0x01' slot='0x01'/>") }), 'invalid_value', '/domain/devices/disk[1]/address/@slot'],
  ['two devices in one root port', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-root-port'/>" + disk(SRC + "<target dev='vda' bus='virtio'/><address type='pci' bus='0x01' slot='0x00'/>") + disk("<source file='/v/b.img'/><target dev='vdb' bus='virtio'/><address type='pci' bus='0x01' slot='0x00'/>") }), 'invalid_value', '/domain/devices/disk[2]/address'],
  ['a root port below a bridge', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-root-port'/><controller type='pci' index='2' model='pcie-to-pci-bridge'/><controller type='pci' index='3' model='pcie-root-port'><address type='pci' bus='0x02' slot='0x01'/></controller>" }), 'invalid_value', '/domain/devices/controller[3]/address'],
  ['a controller on a bus of a higher index', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='pci' index='1' model='pcie-to-pci-bridge'><address type='pci' bus='0x02' slot='0x00'/></controller><controller type='pci' index='2' model='pcie-root-port'/>" }), 'invalid_value', '/domain/devices/controller[1]/address/@bus'],
  ['pcie-root on i440fx', d({ devices: "<controller type='pci' index='0' model='pcie-root'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@model'],
  ['pci-root without model', d({ devices: "<controller type='pci' index='0'/>" }), 'missing_attribute', '/domain/devices/controller[1]/@model'],
  ['scsi lsilogic', d({ devices: "<controller type='scsi' index='0' model='lsilogic'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@model'],
  ['scsi driver queues', d({ devices: "<controller type='scsi' index='0' model='virtio-scsi'><driver queues='4'/></controller>" }), 'unsupported_element', '/domain/devices/controller[1]/driver'],
  ['ide model', d({ devices: "<controller type='ide' index='0' model='piix4'/>" }), 'unsupported_attribute', '/domain/devices/controller[1]/@model'],
  ['ide at a wrong slot', d({ devices: "<controller type='ide' index='0'><address type='pci' slot='4'/></controller>" }), 'invalid_value', '/domain/devices/controller[1]/address'],
  ['ide index 1', d({ devices: "<controller type='ide' index='1'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@index'],
  ['ide on q35', d({ os: os('', "arch='x86_64' machine='q35'"), devices: "<controller type='ide' index='0'/>" }), 'unsupported_value', '/domain/devices/controller[1]/@type'],
  ['virtio-serial ports', d({ devices: "<controller type='virtio-serial' index='0' ports='16'/>" }), 'unsupported_attribute', '/domain/devices/controller[1]/@ports'],
  ['address on pci-root', d({ devices: "<controller type='pci' index='0' model='pci-root'><address type='pci' slot='3'/></controller>" }), 'unsupported_element', '/domain/devices/controller[1]/address'],

  // interfaces
  ['interface network', d({ devices: `<interface type='network'><mac address='${mac(1)}'/><source network='default'/></interface>` }), 'unsupported_value', '/domain/devices/interface[1]/@type'],
  ['interface direct', d({ devices: `<interface type='direct'><mac address='${mac(1)}'/></interface>` }), 'unsupported_value', '/domain/devices/interface[1]/@type'],
  ['interface vhostuser', d({ devices: `<interface type='vhostuser'><mac address='${mac(1)}'/></interface>` }), 'unsupported_value', '/domain/devices/interface[1]/@type'],
  ['nic model ne2k_pci', d({ devices: `<interface type='user'><mac address='${mac(1)}'/><model type='ne2k_pci'/></interface>` }), 'unsupported_value', '/domain/devices/interface[1]/model/@type'],
  ['missing mac', d({ devices: "<interface type='user'><model type='virtio'/></interface>" }), 'missing_element', '/domain/devices/interface[1]/mac'],
  ['bad mac', d({ devices: NIC('52:54:00:00:00') }), 'invalid_value', '/domain/devices/interface[1]/mac/@address'],
  ['multicast mac', d({ devices: NIC('01:00:5e:00:00:01') }), 'invalid_value', '/domain/devices/interface[1]/mac/@address'],
  ['same mac twice', d({ devices: NIC(mac(1)) + NIC(mac(1).toUpperCase()) }), 'invalid_value', '/domain/devices/interface[2]/mac/@address'],
  ['bridge without source', d({ devices: `<interface type='bridge'><mac address='${mac(1)}'/></interface>` }), 'missing_element', '/domain/devices/interface[1]/source'],
  ['bridge name with a comma', d({ devices: `<interface type='bridge'><mac address='${mac(1)}'/><source bridge='br0,helper=/bin/sh'/></interface>` }), 'invalid_value', '/domain/devices/interface[1]/source/@bridge'],
  ['bridge with a target', d({ devices: `<interface type='bridge'><mac address='${mac(1)}'/><source bridge='br0'/><target dev='vnet0'/></interface>` }), 'unsupported_element', '/domain/devices/interface[1]/target'],
  ['ethernet without target', d({ devices: `<interface type='ethernet'><mac address='${mac(1)}'/></interface>` }), 'missing_element', '/domain/devices/interface[1]/target'],
  ['ethernet managed tap', d({ devices: `<interface type='ethernet'><mac address='${mac(1)}'/><target dev='tap0' managed='yes'/></interface>` }), 'unsupported_value', '/domain/devices/interface[1]/target/@managed'],
  ['tap name too long', d({ devices: `<interface type='ethernet'><mac address='${mac(1)}'/><target dev='tap-name-too-long'/></interface>` }), 'invalid_value', '/domain/devices/interface[1]/target/@dev'],
  ['user with a source', d({ devices: `<interface type='user'><mac address='${mac(1)}'/><source network='x'/></interface>` }), 'unsupported_element', '/domain/devices/interface[1]/source'],
  ['nic driver', d({ devices: NIC(mac(1), "<driver name='vhost' queues='2'/>") }), 'unsupported_element', '/domain/devices/interface[1]/driver'],
  ['nic bandwidth', d({ devices: NIC(mac(1), "<bandwidth><inbound average='1000'/></bandwidth>") }), 'unsupported_element', '/domain/devices/interface[1]/bandwidth'],
  ['nic link state', d({ devices: NIC(mac(1), "<link state='down'/>") }), 'unsupported_element', '/domain/devices/interface[1]/link'],
  ['nic mtu', d({ devices: NIC(mac(1), "<mtu size='9000'/>") }), 'unsupported_element', '/domain/devices/interface[1]/mtu'],
  ['nic filterref', d({ devices: NIC(mac(1), "<filterref filter='clean-traffic'/>") }), 'unsupported_element', '/domain/devices/interface[1]/filterref'],
  ['nic rom', d({ devices: NIC(mac(1), "<rom bar='off'/>") }), 'unsupported_element', '/domain/devices/interface[1]/rom'],

  // PCI addresses
  ['pci domain 1', d({ devices: NIC(mac(1), "<address type='pci' domain='0x0001' bus='0x00' slot='0x03' function='0x0'/>") }), 'invalid_value', '/domain/devices/interface[1]/address/@domain'],
  ['pci bus 1', d({ devices: NIC(mac(1), "<address type='pci' domain='0x0000' bus='0x01' slot='0x03' function='0x0'/>") }), 'invalid_value', '/domain/devices/interface[1]/address/@bus'],
  ['pci slot 0', d({ devices: NIC(mac(1), "<address type='pci' slot='0x00'/>") }), 'invalid_value', '/domain/devices/interface[1]/address/@slot'],
  ['pci slot 32', d({ devices: NIC(mac(1), "<address type='pci' slot='0x20'/>") }), 'invalid_value', '/domain/devices/interface[1]/address/@slot'],
  ['pci function 8', d({ devices: NIC(mac(1), "<address type='pci' slot='3' function='8'/>") }), 'invalid_value', '/domain/devices/interface[1]/address/@function'],
  ['pci slot missing', d({ devices: NIC(mac(1), "<address type='pci' bus='0'/>") }), 'missing_attribute', '/domain/devices/interface[1]/address/@slot'],
  ['pci slot not a number', d({ devices: NIC(mac(1), "<address type='pci' slot='three'/>") }), 'invalid_value', '/domain/devices/interface[1]/address/@slot'],
  ['pci slot of the chipset', d({ devices: NIC(mac(1), "<address type='pci' slot='0x01' function='0x4'/>") }), 'invalid_value', '/domain/devices/interface[1]/address'],
  ['q35 chipset slot', d({ os: os('', "arch='x86_64' machine='q35'"), devices: NIC(mac(1), "<address type='pci' slot='0x1f' function='0x5'/>") }), 'invalid_value', '/domain/devices/interface[1]/address'],
  ['same pci slot twice', d({ devices: NIC(mac(1), "<address type='pci' slot='5'/>") + NIC(mac(2), "<address type='pci' slot='0x05'/>") }), 'invalid_value', '/domain/devices/interface[2]/address'],
  ['function 1 without function 0', d({ devices: NIC(mac(1), "<address type='pci' slot='5' function='1'/>") }), 'invalid_value', '/domain/devices/interface[1]/address'],
  ['function 1 without multifunction', d({ devices: NIC(mac(1), "<address type='pci' slot='5'/>") + NIC(mac(2), "<address type='pci' slot='5' function='1'/>") }), 'invalid_value', '/domain/devices/interface[2]/address'],
  ['ccw address', d({ devices: NIC(mac(1), "<address type='ccw' cssid='0xfe'/>") }), 'unsupported_value', '/domain/devices/interface[1]/address/@type'],
  ['address zpci child', d({ devices: NIC(mac(1), "<address type='pci' slot='5'><zpci uid='1'/></address>") }), 'unsupported_element', '/domain/devices/interface[1]/address/zpci'],

  // serial, console, channel
  ['serial spicevmc', d({ devices: serial('', 'spicevmc') }), 'unsupported_value', '/domain/devices/serial[1]/@type'],
  ['serial host device', d({ devices: serial("<source path='/dev/ttyS0'/>", 'dev') }), 'unsupported_value', '/domain/devices/serial[1]/@type'],
  ['serial udp', d({ devices: serial('', 'udp') }), 'unsupported_value', '/domain/devices/serial[1]/@type'],
  ['serial usb target', d({ devices: serial("<target type='usb-serial' port='0'/>") }), 'unsupported_value', '/domain/devices/serial[1]/target/@type'],
  ['serial pci model', d({ devices: serial("<target type='isa-serial' port='0'><model name='pci-serial'/></target>") }), 'unsupported_value', '/domain/devices/serial[1]/target/model/@name'],
  ['serial port 4', d({ devices: serial("<target port='4'/>") }), 'invalid_value', '/domain/devices/serial[1]/target/@port'],
  ['serial port twice', d({ devices: serial("<target port='1'/>") + serial("<target port='1'/>") }), 'invalid_value', '/domain/devices/serial[2]/target/@port'],
  ['five serials', d({ devices: serial('').repeat(5) }), 'invalid_value', '/domain/devices/serial[5]'],
  ['file serial without source', d({ devices: serial('', 'file') }), 'missing_element', '/domain/devices/serial[1]/source'],
  ['file serial relative path', d({ devices: serial("<source path='serial.log'/>", 'file') }), 'invalid_value', '/domain/devices/serial[1]/source/@path'],
  ['file serial append maybe', d({ devices: serial("<source path='/v/s.log' append='maybe'/>", 'file') }), 'unsupported_value', '/domain/devices/serial[1]/source/@append'],
  ['unix serial without mode', d({ devices: serial("<source path='/v/s.sock'/>", 'unix') }), 'missing_attribute', '/domain/devices/serial[1]/source/@mode'],
  ['unix reconnect', d({ devices: serial("<source mode='connect' path='/v/s.sock'><reconnect enabled='yes' timeout='10'/></source>", 'unix') }), 'unsupported_element', '/domain/devices/serial[1]/source/reconnect'],
  ['tcp telnets', d({ devices: serial("<source mode='bind' host='127.0.0.1' service='4555'/><protocol type='telnets'/>", 'tcp') }), 'unsupported_value', '/domain/devices/serial[1]/protocol/@type'],
  ['tcp tls', d({ devices: serial("<source mode='bind' host='127.0.0.1' service='4555' tls='yes'/>", 'tcp') }), 'unsupported_attribute', '/domain/devices/serial[1]/source/@tls'],
  ['tcp port 0', d({ devices: serial("<source mode='bind' host='127.0.0.1' service='0'/>", 'tcp') }), 'invalid_value', '/domain/devices/serial[1]/source/@service'],
  ['tcp bad host', d({ devices: serial("<source mode='bind' host='a,b' service='1'/>", 'tcp') }), 'invalid_value', '/domain/devices/serial[1]/source/@host'],
  ['tcp host like an option', d({ devices: serial("<source mode='connect' host='-x' service='1'/>", 'tcp') }), 'invalid_value', '/domain/devices/serial[1]/source/@host'],
  ['protocol on a pty', d({ devices: serial("<protocol type='raw'/>") }), 'unsupported_element', '/domain/devices/serial[1]/protocol'],
  ['null with a source', d({ devices: serial("<source path='/x'/>", 'null') }), 'unsupported_element', '/domain/devices/serial[1]/source'],
  ['log without file', d({ devices: serial("<log append='on'/>") }), 'missing_attribute', '/domain/devices/serial[1]/log/@file'],
  ['serial address', d({ devices: serial("<address type='isa' iobase='0x3f8'/>") }), 'unsupported_element', '/domain/devices/serial[1]/address'],
  ['console sclp', d({ devices: "<console type='pty'><target type='sclp'/></console>" }), 'unsupported_value', '/domain/devices/console[1]/target/@type'],
  ['console unlike its serial', d({ devices: `${serial('')}<console type='file'><source path='/v/c.log'/><target type='serial' port='0'/></console>` }), 'invalid_value', '/domain/devices/console[1]'],
  ['console on a missing port', d({ devices: `${serial("<target port='0'/>")}<console type='pty'><target type='serial' port='1'/></console>` }), 'invalid_value', '/domain/devices/console[1]/target/@port'],
  ['second serial console', d({ devices: "<console type='pty'/><console type='pty'><target type='serial'/></console>" }), 'unsupported_value', '/domain/devices/console[2]/target/@type'],
  ['virtio-serial address on a serial console', d({ devices: "<console type='pty'><target type='serial'/><address type='virtio-serial' port='1'/></console>" }), 'unsupported_element', '/domain/devices/console[1]/address'],
  ['channel guestfwd', d({ devices: "<channel type='unix'><source mode='bind' path='/v/c'/><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>" }), 'unsupported_value', '/domain/devices/channel[1]/target/@type'],
  ['channel spicevmc', d({ devices: "<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>" }), 'unsupported_value', '/domain/devices/channel[1]/@type'],
  ['channel without target', d({ devices: "<channel type='unix'><source mode='bind' path='/v/c'/></channel>" }), 'missing_element', '/domain/devices/channel[1]/target'],
  ['channel without name', d({ devices: "<channel type='unix'><source mode='bind' path='/v/c'/><target type='virtio'/></channel>" }), 'missing_attribute', '/domain/devices/channel[1]/target/@name'],
  ['channel state', d({ devices: "<channel type='unix'><source mode='bind' path='/v/c'/><target type='virtio' name='a' state='connected'/></channel>" }), 'unsupported_attribute', '/domain/devices/channel[1]/target/@state'],
  ['channel unix without path', d({ devices: "<channel type='unix'><source mode='bind'/><target type='virtio' name='a'/></channel>" }), 'missing_attribute', '/domain/devices/channel[1]/source/@path'],
  ['channel name twice', d({ devices: "<channel type='pty'><target type='virtio' name='a'/></channel><channel type='pty'><target type='virtio' name='a'/></channel>" }), 'invalid_value', '/domain/devices/channel[2]/target/@name'],
  ['channel on port 0', d({ devices: "<channel type='pty'><target type='virtio' name='a'/><address type='virtio-serial' controller='0' bus='0' port='0'/></channel>" }), 'invalid_value', '/domain/devices/channel[1]/address/@port'],
  ['virtio-serial port twice', d({ devices: "<channel type='pty'><target type='virtio' name='a'/><address type='virtio-serial' port='2'/></channel><channel type='pty'><target type='virtio' name='b'/><address type='virtio-serial' port='2'/></channel>" }), 'invalid_value', '/domain/devices/channel[2]/address'],
  ['virtio-serial port 31', d({ devices: "<channel type='pty'><target type='virtio' name='a'/><address type='virtio-serial' port='31'/></channel>" }), 'invalid_value', '/domain/devices/channel[1]/address/@port'],

  // graphics, video, input
  ['spice', d({ devices: "<graphics type='spice' autoport='yes'/>" }), 'unsupported_value', '/domain/devices/graphics[1]/@type'],
  ['sdl', d({ devices: "<graphics type='sdl'/>" }), 'unsupported_value', '/domain/devices/graphics[1]/@type'],
  ['vnc password', d({ devices: "<graphics type='vnc' autoport='yes' passwd='secret'/>" }), 'unsupported_attribute', '/domain/devices/graphics[1]/@passwd'],
  ['vnc keymap', d({ devices: "<graphics type='vnc' autoport='yes' keymap='de'/>" }), 'unsupported_attribute', '/domain/devices/graphics[1]/@keymap'],
  ['vnc websocket', d({ devices: "<graphics type='vnc' autoport='yes' websocket='5700'/>" }), 'unsupported_attribute', '/domain/devices/graphics[1]/@websocket'],
  ['vnc port below 5900', d({ devices: "<graphics type='vnc' port='5800' autoport='no'/>" }), 'invalid_value', '/domain/devices/graphics[1]/@port'],
  ['vnc fixed without port', d({ devices: "<graphics type='vnc' autoport='no'/>" }), 'missing_attribute', '/domain/devices/graphics[1]/@port'],
  ['vnc listen on a name', d({ devices: "<graphics type='vnc' autoport='yes' listen='example.com'/>" }), 'invalid_value', '/domain/devices/graphics[1]/@listen'],
  ['vnc listen network', d({ devices: "<graphics type='vnc' autoport='yes'><listen type='network' network='default'/></graphics>" }), 'unsupported_value', '/domain/devices/graphics[1]/listen/@type'],
  ['vnc listen mismatch', d({ devices: "<graphics type='vnc' autoport='yes' listen='127.0.0.1'><listen type='address' address='0.0.0.0'/></graphics>" }), 'invalid_value', '/domain/devices/graphics[1]/listen/@address'],
  ['two graphics', d({ devices: "<graphics type='vnc' autoport='yes'/><graphics type='vnc' autoport='yes'/>" }), 'duplicate_element', '/domain/devices/graphics[2]'],
  ['video qxl', d({ devices: "<video><model type='qxl'/></video>" }), 'unsupported_value', '/domain/devices/video[1]/model/@type'],
  ['video bochs', d({ devices: "<video><model type='bochs'/></video>" }), 'unsupported_value', '/domain/devices/video[1]/model/@type'],
  ['video without model', d({ devices: '<video/>' }), 'missing_element', '/domain/devices/video[1]/model'],
  ['vga vram not a power of two', d({ devices: "<video><model type='vga' vram='3072'/></video>" }), 'invalid_value', '/domain/devices/video[1]/model/@vram'],
  ['cirrus vram 32 MiB', d({ devices: "<video><model type='cirrus' vram='32768'/></video>" }), 'invalid_value', '/domain/devices/video[1]/model/@vram'],
  ['virtio vram', d({ devices: "<video><model type='virtio' vram='16384'/></video>" }), 'unsupported_attribute', '/domain/devices/video[1]/model/@vram'],
  ['video two heads', d({ devices: "<video><model type='vga' heads='2'/></video>" }), 'unsupported_value', '/domain/devices/video[1]/model/@heads'],
  ['video vgamem', d({ devices: "<video><model type='vga' vgamem='16384'/></video>" }), 'unsupported_attribute', '/domain/devices/video[1]/model/@vgamem'],
  ['video acceleration', d({ devices: "<video><model type='virtio'><acceleration accel3d='yes'/></model></video>" }), 'unsupported_element', '/domain/devices/video[1]/model/acceleration'],
  ['two videos', d({ devices: "<video><model type='vga'/></video><video><model type='virtio'/></video>" }), 'duplicate_element', '/domain/devices/video[2]'],
  ['ps2 tablet', d({ devices: "<input type='tablet' bus='ps2'/>" }), 'unsupported_value', '/domain/devices/input[1]/@bus'],
  ['input passthrough', d({ devices: "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>" }), 'unsupported_value', '/domain/devices/input[1]/@type'],
  ['input xen bus', d({ devices: "<input type='mouse' bus='xen'/>" }), 'unsupported_value', '/domain/devices/input[1]/@bus'],
  ['usb input without usb', d({ devices: `<controller type='usb' index='0' model='none'/>${tablet}` }), 'unsupported_value', '/domain/devices/input[1]/@bus'],
  ['usb port 3 on uhci', d({ devices: "<controller type='usb' index='0' model='piix3-uhci'/><input type='tablet' bus='usb'><address type='usb' bus='0' port='3'/></input>" }), 'invalid_value', '/domain/devices/input[1]/address/@port'],
  ['usb port twice', d({ devices: "<input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input><input type='mouse' bus='usb'><address type='usb' bus='0' port='1'/></input>" }), 'invalid_value', '/domain/devices/input[2]/address/@port'],
  ['three usb inputs on uhci', d({ devices: "<input type='tablet' bus='usb'/><input type='mouse' bus='usb'/><input type='keyboard' bus='usb'/>" }), 'invalid_value', '/domain/devices/input[3]'],
  ['usb hub port', d({ devices: "<input type='tablet' bus='usb'><address type='usb' bus='0' port='1.2'/></input>" }), 'invalid_value', '/domain/devices/input[1]/address/@port'],
  ['address on a ps2 mouse', d({ devices: "<input type='mouse' bus='ps2'><address type='pci' slot='5'/></input>" }), 'unsupported_element', '/domain/devices/input[1]/address'],

  // memballoon, rng
  ['balloon without model', d({ devices: '<memballoon/>' }), 'missing_attribute', '/domain/devices/memballoon[1]/@model'],
  ['balloon xen', d({ devices: "<memballoon model='xen'/>" }), 'unsupported_value', '/domain/devices/memballoon[1]/@model'],
  ['balloon stats', d({ devices: "<memballoon model='virtio'><stats period='10'/></memballoon>" }), 'unsupported_element', '/domain/devices/memballoon[1]/stats'],
  ['balloon autodeflate', d({ devices: "<memballoon model='virtio' autodeflate='on'/>" }), 'unsupported_attribute', '/domain/devices/memballoon[1]/@autodeflate'],
  ['two balloons', d({ devices: "<memballoon model='virtio'/><memballoon model='none'/>" }), 'duplicate_element', '/domain/devices/memballoon[2]'],
  ['rng egd', d({ devices: "<rng model='virtio'><backend model='egd' type='tcp'/></rng>" }), 'unsupported_value', '/domain/devices/rng[1]/backend/@model'],
  ['rng hwrng', d({ devices: "<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>" }), 'unsupported_value', '/domain/devices/rng[1]/backend'],
  ['rng transitional', d({ devices: "<rng model='virtio-transitional'><backend model='random'>/dev/urandom</backend></rng>" }), 'unsupported_value', '/domain/devices/rng[1]/@model'],
  ['rng without backend', d({ devices: "<rng model='virtio'/>" }), 'missing_element', '/domain/devices/rng[1]/backend'],
  ['rng rate without bytes', d({ devices: "<rng model='virtio'><backend model='random'>/dev/urandom</backend><rate period='1000'/></rng>" }), 'missing_attribute', '/domain/devices/rng[1]/rate/@bytes'],
];

t.test('one answer lists every blocker, in document order, each once', async (t) => {
  const xml = d({
    attrs: "type='kvm' id='7'",
    body: "<pm><suspend-to-mem enabled='no'/></pm><clock offset='variable'/>",
    devices: `${VDA}<watchdog model='itco' action='reset'/>${disk('<bogus/>' + SRC + "<target dev='vdb'/>")}<audio id='1' type='none'/>`,
  });
  const err = refusal(() => parseDomainXml(xml));
  t.same(err.errors.map((e) => [e.code, e.element]), [
    ['unsupported_attribute', '/domain/@id'],
    ['unsupported_element', '/domain/pm'],
    ['unsupported_value', '/domain/clock/@offset'],
    ['unsupported_element', '/domain/devices/watchdog[1]'],
    ['unsupported_element', '/domain/devices/disk[2]/bogus'],
    ['unsupported_element', '/domain/devices/audio[1]'],
  ]);
  t.equal(err.code, 'unsupported_attribute', 'the first mirrored at the top');
  t.match(err.message, /\(and 5 more: see errors\)$/);
});

t.test('the base domain is valid', async (t) => {
  t.ok(parseDomainXml(d({ devices: VDA + NIC(mac(1)) })));
});

for (const [what, xml, code, element] of cases) {
  t.test(what, async (t) => {
    const err = refusal(() => parseDomainXml(xml));
    t.ok(err instanceof DomainXmlError);
    t.equal(err.statusCode, 400);
    t.match(err, { code, element }, err.message);
    t.equal(err.details.element, element);
    t.match(err.errors[0], { code, element }, 'the first blocker heads errors');
    t.ok(err.message.length > 0);
  });
}
