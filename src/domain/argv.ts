/**
 * The qemu command line of a completed domain. Pure: the same model and host settings give the
 * same argv byte for byte, which is what lets a migration destination rebuild the source's
 * machine exactly. Devices use -blockdev/-device with explicit bus, address and id everywhere
 * so that nothing is left to qemu's own (version-dependent) placement.
 */
import type {
  Accel,
  ArgvOptions,
  CharLog,
  CharSource,
  ControllerDef,
  CpuDef,
  DiskDef,
  DomainDef,
  HostSettings,
  HypervDef,
  ImageChain,
  PciAddress,
  PciModel,
  SpiceGraphicsDef,
  VideoDef,
} from './model.js';
import { cpuRanges } from './cpuset.js';
import { kibRoundUpToMiB } from './units.js';
import { HYPERV_FEATURES } from './model.js';
import { PCI_DRIVERS, pciBusId } from './pci.js';

/** qemu's boolean option values. */
const onOff = (v: boolean) => (v ? 'on' : 'off');

/** qemu's option syntax: a comma inside a value is written twice. */
export const escapeOptionValue = (s: string) => s.replace(/,/g, ',,');

/** `type='kvm'` follows the host (KVM, or TCG where KVM is unavailable); `type='qemu'` is always TCG. */
export const effectiveAccel = (def: DomainDef, hostAccel: Accel): Accel => (def.type === 'kvm' ? hostAccel : 'tcg');

export function buildArgv(def: DomainDef, host: HostSettings, opts: ArgvOptions = {}): string[] {
  const accel = effectiveAccel(def, host.accel);
  const pci = (a: PciAddress) =>
    `bus=${pciBusId(def.machineFamily, a.bus)},addr=0x${a.slot.toString(16)}${a.function ? `.0x${a.function.toString(16)}` : ''}${a.multifunction ? ',multifunction=on' : ''}`;
  const argv: string[] = [];
  const add = (...args: string[]) => argv.push(...args);
  const fileArg = host.fileArg ?? ((p: string) => p);
  const needs = <T>(v: T | undefined, what: string): T => {
    if (v === undefined) throw new Error(`buildArgv: this domain needs HostSettings.${what}`);
    return v;
  };

  add('-name', `guest=${def.name},debug-threads=on`);
  add('-S');
  const pflash = firmwareArgs(def, fileArg, host.nvramPath);
  add(...pflash.blockdevs);
  add('-machine', [machineOption(def, accel), ...pflash.machine].join(','));
  const cpu = cpuOption(def, accel);
  if (cpu) add('-cpu', cpu);
  add('-m', `size=${kibRoundUpToMiB(def.memoryKiB)}k`);
  const hugepageDir = () => {
    if (host.hugepagesPath === undefined) throw new Error('a hugepages guest needs HostSettings.hugepagesPath');
    return escapeOptionValue(host.hugepagesPath);
  };
  // As libvirt: with hugepages the RAM is a file on hugetlbfs, its RAMBlock still named pc.ram
  // (x-use-canonical-path-for-ramblock-id=false), so it migrates to and from a plain-RAM guest.
  if (def.hugepages && !def.cpu?.numa) {
    add('-object', `memory-backend-file,id=pc.ram,mem-path=${hugepageDir()},x-use-canonical-path-for-ramblock-id=false,prealloc=on,size=${kibRoundUpToMiB(def.memoryKiB) * 1024}`);
  }
  add('-smp', smpOption(def));
  for (let i = 1; i <= def.iothreads; i++) add('-object', `iothread,id=iothread${i}`);
  for (const cell of def.cpu?.numa ?? []) {
    const id = `ram-node${cell.id}`;
    const size = cell.memoryKiB * 1024;
    add('-object', def.hugepages ? `memory-backend-file,id=${id},mem-path=${hugepageDir()},prealloc=on,size=${size}` : `memory-backend-ram,id=${id},size=${size}`);
    // A list with gaps is one cpus= key per range (qemu's syntax for non-contiguous sets).
    const cpus = cpuRanges(cell.cpus).map(([lo, hi]) => `cpus=${lo === hi ? lo : `${lo}-${hi}`}`).join(',');
    add('-numa', `node,nodeid=${cell.id},${cpus},memdev=${id}`);
  }
  add('-uuid', def.uuid);
  if (def.smbios) add(...smbiosArgs(def.smbios));
  add('-no-user-config', '-nodefaults');
  add('-chardev', `socket,id=charmonitor,path=${escapeOptionValue(host.qmpSocketPath)},server=on,wait=off`);
  add('-mon', 'chardev=charmonitor,id=monitor,mode=control');
  const rtcClock = def.clock.rtcTrack && { guest: 'vm', wall: 'host', realtime: 'rt' }[def.clock.rtcTrack];
  add('-rtc', `base=${def.clock.offset}${rtcClock ? `,clock=${rtcClock}` : ''}${def.clock.rtcTickPolicy === 'catchup' ? ',driftfix=slew' : ''}`);
  // libvirt passes the policy whenever a pit timer is listed, delay unless discard (qemu's default is delay too).
  if (def.clock.pit) add('-global', `kvm-pit.lost_tick_policy=${def.clock.pitTickPolicy ?? 'delay'}`);
  // libvirt passes -no-shutdown and acts on qemu's events itself; qemu's -action does the same
  // here without a manager watching. on_crash='restart' pauses, and the agent resets the guest.
  // The watchdog action is the same setting as -watchdog-action, which qemu 7.2 implements as
  // -action watchdog=: one option holds every action.
  add('-action', [
    `reboot=${def.onReboot === 'restart' ? 'reset' : 'shutdown'}`,
    `shutdown=${def.onPoweroff === 'destroy' ? 'poweroff' : 'pause'}`,
    `panic=${def.onCrash === 'destroy' ? 'shutdown' : 'pause'}`,
    ...(def.watchdogAction ? [`watchdog=${def.watchdogAction}`] : []),
  ].join(','));
  if (def.pm) {
    const pmDevice = def.machineFamily === 'q35' ? 'ICH9-LPC' : 'PIIX4_PM';
    if (def.pm.s3 !== undefined) add('-global', `${pmDevice}.disable_s3=${def.pm.s3 ? 0 : 1}`);
    if (def.pm.s4 !== undefined) add('-global', `${pmDevice}.disable_s4=${def.pm.s4 ? 0 : 1}`);
  }
  const menu = def.os.bootMenu;
  add('-boot', [
    ...(menu ? [`menu=${onOff(menu.enable)}`] : []),
    ...(menu?.timeoutMs !== undefined ? [`splash-time=${menu.timeoutMs}`] : []),
    'strict=on',
  ].join(','));
  add(...pflash.options);
  if (def.os.kernel) add('-kernel', fileArg(def.os.kernel));
  if (def.os.initrd) add('-initrd', fileArg(def.os.initrd));
  if (def.os.cmdline !== undefined) add('-append', def.os.cmdline);

  for (const c of def.controllers) {
    if (!c.builtin) add('-device', controllerDevice(c, pci));
  }
  for (const d of def.disks) {
    if (d.source !== undefined) add(...blockdevArgs(d, fileArg, host.imageChain?.(d.source)));
    add('-device', diskDevice(d, def.controllers, pci));
  }
  for (const n of def.interfaces) {
    // bridge and network: the host made the tap (qemu runs unprivileged under a seccomp filter
    // that forbids spawning qemu-bridge-helper). vhost stays off on every host alike: qemu's
    // own user cannot open /dev/vhost-net, and the virtio-net features offered must not depend
    // on the host (a migration between vhost and non-vhost hosts could fail on them).
    const backend = n.type === 'user' ? 'user'
      : n.type === 'ethernet' ? `tap,ifname=${n.targetDev},script=no,downscript=no`
      : `tap,ifname=${needs(host.tapName, 'tapName')(n.id)},script=no,downscript=no,vhost=off`;
    add('-netdev', `${backend},id=${n.netdevId}`);
    const driver = { virtio: 'virtio-net-pci', e1000: 'e1000', e1000e: 'e1000e', rtl8139: 'rtl8139' }[n.model];
    const hostMtu = n.mtu !== undefined && n.model === 'virtio' ? `,host_mtu=${n.mtu}` : '';
    add('-device', `${driver},netdev=${n.netdevId},id=${n.id},mac=${n.mac}${hostMtu},${pci(n.address)}${bootindex(n.bootIndex)}`);
  }
  const socketPath = (id: string, s: CharSource) => (s.type === 'unix' && s.path === undefined ? needs(host.channelSocketPath, 'channelSocketPath')(id) : undefined);
  for (const s of def.serials) {
    add('-chardev', chardevOption(s.chardevId, s.source, s.log, fileArg));
    add('-device', `isa-serial,chardev=${s.chardevId},id=${s.id},index=${s.port}`);
  }
  for (const c of def.consoles) {
    add('-chardev', chardevOption(c.chardevId, c.source, c.log, fileArg));
    add('-device', `virtconsole,chardev=${c.chardevId},id=${c.id},bus=virtio-serial${c.address.controller}.0,nr=${c.address.port}`);
  }
  for (const c of def.channels) {
    add('-chardev', chardevOption(c.chardevId, c.source, c.log, fileArg, socketPath(c.id, c.source)));
    add('-device', `virtserialport,chardev=${c.chardevId},id=${c.id},name=${c.name},bus=virtio-serial${c.address.controller}.0,nr=${c.address.port}`);
  }
  if (def.tpm) {
    // As libvirt: the emulator backend on a chardev to swtpm's control socket (qemu hands
    // swtpm the data channel over it); the device, ISA (tis) or sysbus (crb), takes no address.
    add('-tpmdev', 'emulator,id=tpm-tpm0,chardev=chrtpm');
    add('-chardev', `socket,id=chrtpm,path=${escapeOptionValue(needs(host.tpmSocketPath, 'tpmSocketPath'))}`);
    add('-device', `${def.tpm.model},tpmdev=tpm-tpm0,id=tpm0`);
  }
  for (const i of def.inputs) {
    if (i.bus === 'ps2') continue; // the i8042 PS/2 mouse and keyboard are part of the machine
    const driver = i.bus === 'usb'
      ? { tablet: 'usb-tablet', mouse: 'usb-mouse', keyboard: 'usb-kbd' }[i.type]
      : `virtio-${i.type}-pci`;
    const where = i.address!.type === 'usb' ? `bus=usb.0,port=${i.address!.port}` : pci(i.address as PciAddress);
    add('-device', `${driver},id=${i.id},${where}`);
  }
  for (const a of def.audios) add('-audiodev', `id=audio${a.id},driver=${a.type}`);
  // libvirt hands the first audio backend to VNC (its audio capture extension).
  const audiodev = def.audios[0] ? `,audiodev=audio${def.audios[0].id}` : '';
  for (const g of def.graphics) {
    if (g.type === 'spice') {
      add('-spice', spiceOption(g, () => needs(host.spicePort, 'spicePort')));
      continue;
    }
    const listen = g.listen.includes(':') ? `[${g.listen}]` : g.listen;
    add('-vnc', `${g.autoport ? `${listen}:0,to=99` : `${listen}:${g.port! - 5900}`}${audiodev}`);
  }
  for (const snd of def.sounds) {
    const backend = `audio${snd.audioId ?? def.audios[0]!.id}`;
    if (snd.model === 'ac97') {
      add('-device', `AC97,id=${snd.id},audiodev=${backend},${pci(snd.address!)}`);
      continue;
    }
    add('-device', `${snd.model === 'ich9' ? 'ich9-intel-hda' : 'intel-hda'},id=${snd.id},${pci(snd.address!)}`);
    snd.codecs.forEach((codec, cad) => add('-device', `hda-${codec},id=${snd.id}-codec${cad},bus=${snd.id}.0,cad=${cad},audiodev=${backend}`));
  }
  for (const v of def.videos) {
    if (v.model !== 'none') add('-device', `${videoDevice(v)},${pci(v.address!)}`);
  }
  if (def.panic) add('-device', `pvpanic${def.panic.ioport !== undefined ? `,ioport=${def.panic.ioport}` : ''}`);
  for (const w of def.watchdogs) {
    if (w.model === 'ib700') add('-device', `ib700,id=${w.id}`);
    if (w.model === 'i6300esb') add('-device', `i6300esb,id=${w.id},${pci(w.address!)}`);
  }
  // The iTCO is built into ICH9-LPC; noreboot=off lets it reset the machine.
  if (def.watchdogs.some((w) => w.model === 'itco')) add('-global', 'ICH9-LPC.noreboot=off');
  for (const r of def.redirdevs) {
    add('-chardev', `spicevmc,id=${r.chardevId},name=usbredir`);
    add('-device', `usb-redir,chardev=${r.chardevId},id=${r.id},bus=usb.0,port=${r.address.port}`);
  }
  if (def.memballoon?.model === 'virtio') add('-device', `virtio-balloon-pci,id=${def.memballoon.id},${pci(def.memballoon.address!)}`);
  for (const r of def.rngs) {
    add('-object', `rng-random,id=${r.objectId},filename=${r.backend}`);
    // libvirt's default period when only bytes are limited is one second.
    const rate = r.rate ? `,max-bytes=${r.rate.bytes},period=${r.rate.periodMs ?? 1000}` : '';
    add('-device', `virtio-rng-pci,rng=${r.objectId},id=${r.id}${rate},${pci(r.address)}`);
  }
  add('-display', 'none');
  add('-pidfile', host.pidfilePath);
  if (opts.incoming) add('-incoming', 'defer');
  return argv;
}

/**
 * libvirt's -spice: the port (port=0 for no socket at all, qemu's way of saying none), no
 * ticketing (there is no password), the server's settings in libvirt's order, and seamless
 * migration always (a client follows the guest when the source tells it where to).
 */
function spiceOption(g: SpiceGraphicsDef, autoPort: () => number): string {
  const parts = g.listen === undefined ? ['port=0'] : [`port=${g.autoport ? autoPort() : g.port}`, `addr=${g.listen}`];
  if (g.mouseMode) parts.push(`agent-mouse=${onOff(g.mouseMode === 'client')}`);
  parts.push('disable-ticketing=on');
  if (g.plaintextDefault) parts.push('plaintext-channel=default');
  parts.push(...g.compression.map(([key, value]) => `${key}=${value}`));
  if (!g.copyPaste) parts.push('disable-copy-paste=on');
  if (!g.fileTransfer) parts.push('disable-agent-file-xfer=on');
  parts.push('seamless-migration=on');
  return parts.join(',');
}

/** Each video model's qemu device as the primary (VGA-compatible) one and as a further display. */
const VIDEO_DRIVERS = {
  vga: ['VGA'], cirrus: ['cirrus-vga'], bochs: ['bochs-display'],
  qxl: ['qxl-vga', 'qxl'], virtio: ['virtio-vga', 'virtio-gpu-pci'],
} as const;

/**
 * As libvirt: VGA's vram as vgamem_mb, bochs-display's in bytes, no size at all for cirrus;
 * heads as max_outputs; qxl's four memory sizes (vram64_size_mb 0 when not given).
 */
function videoDevice(v: VideoDef): string {
  const drivers: readonly string[] = VIDEO_DRIVERS[v.model as keyof typeof VIDEO_DRIVERS];
  const parts = [drivers[v.primary ? 0 : 1]!, `id=${v.id}`];
  if (v.heads !== undefined) parts.push(`max_outputs=${v.heads}`);
  if (v.model === 'vga') parts.push(`vgamem_mb=${v.vramKiB! / 1024}`);
  if (v.model === 'bochs') parts.push(`vgamem=${v.vramKiB! * 1024}`);
  if (v.qxl) {
    parts.push(`ram_size=${v.qxl.ramKiB * 1024}`, `vram_size=${v.vramKiB! * 1024}`, `vram64_size_mb=${v.qxl.vram64KiB / 1024}`, `vgamem_mb=${v.qxl.vgamemKiB / 1024}`);
  }
  return parts.join(',');
}

function machineOption(def: DomainDef, accel: Accel): string {
  const parts = [def.machine, `accel=${accel}`, 'usb=off', 'dump-guest-core=off'];
  if (!def.features.acpi) parts.push('acpi=off');
  if (def.features.vmport !== undefined) parts.push(`vmport=${onOff(def.features.vmport)}`);
  if (def.features.smm) parts.push(`smm=${onOff(def.features.smm.on)}`);
  if (def.hugepages && !def.cpu?.numa) parts.push('memory-backend=pc.ram');
  if (def.clock.hpet !== undefined) parts.push(`hpet=${onOff(def.clock.hpet)}`);
  return parts.join(',');
}

/**
 * The firmware: a pflash loader on flash unit 0 and its variable store on unit 1, each a file
 * node and a raw node as libvirt builds them (the machine names the raw nodes); a rom loader is
 * -bios. The store's file is the XML's, or the host's own one when the XML names none.
 */
function firmwareArgs(def: DomainDef, fileArg: (path: string) => string, hostNvramPath: string | undefined): { blockdevs: string[]; machine: string[]; options: string[] } {
  const out = { blockdevs: [] as string[], machine: [] as string[], options: [] as string[] };
  const loader = def.os.loader;
  if (def.features.smm?.tsegMiB !== undefined) out.options.push('-global', `mch.extended-tseg-mbytes=${def.features.smm.tsegMiB}`);
  if (!loader) return out;
  if (loader.path === undefined) throw new Error('buildArgv: the firmware is not chosen yet (normalize the XML first)');
  if (loader.type === 'rom') {
    out.options.push('-bios', fileArg(loader.path));
    return out;
  }
  const flash = (unit: number, file: string, readonly: boolean) => {
    out.blockdevs.push('-blockdev', JSON.stringify({ driver: 'file', filename: fileArg(file), 'node-name': `pflash${unit}-storage`, 'read-only': readonly }));
    out.blockdevs.push('-blockdev', JSON.stringify({ 'node-name': `pflash${unit}-format`, 'read-only': readonly, driver: 'raw', file: `pflash${unit}-storage` }));
    out.machine.push(`pflash${unit}=pflash${unit}-format`);
  };
  flash(0, loader.path, loader.readonly);
  if (def.os.nvram) {
    const store = def.os.nvram.path ?? hostNvramPath;
    if (store === undefined) throw new Error('buildArgv: this domain needs HostSettings.nvramPath');
    flash(1, store, false);
  }
  if (loader.secure) out.options.push('-global', 'driver=cfi.pflash01,property=secure,value=on');
  return out;
}

/** libvirt's -smbios: one per table, keys in its fixed order, commas doubled. */
function smbiosArgs(s: NonNullable<DomainDef['smbios']>): string[] {
  const args: string[] = [];
  const tables = [[0, s.bios], [1, s.system], [2, s.baseBoard], [3, s.chassis]] as const;
  for (const [type, entries] of tables) {
    if (entries) args.push('-smbios', [`type=${type}`, ...entries.map(([k, v]) => `${k}=${escapeOptionValue(v)}`)].join(','));
  }
  if (s.oemStrings) args.push('-smbios', ['type=11', ...s.oemStrings.map((v) => `value=${escapeOptionValue(v)}`)].join(','));
  return args;
}

function cpuOption(def: DomainDef, accel: Accel): string | undefined {
  const cpu: CpuDef | undefined = def.cpu;
  // TCG has no host CPU to pass through: 'max' is the closest it can do.
  let name = !cpu ? undefined : cpu.mode === 'custom' ? cpu.model : cpu.mode === 'maximum' ? 'max' : accel === 'kvm' ? 'host' : 'max';
  const timers = [
    ...(def.clock.kvmclock !== undefined ? [`kvmclock=${onOff(def.clock.kvmclock)}`] : []),
    ...(def.clock.hypervclock !== undefined ? [`hv-time=${onOff(def.clock.hypervclock)}`] : []),
    ...(def.clock.tscFrequency !== undefined ? [`tsc-frequency=${def.clock.tscFrequency}`] : []),
    ...hypervProperties(def.features.hyperv),
  ];
  // Paravirtual timers are CPU properties: with no model, libvirt names x86's default one.
  if (name === undefined && timers.length > 0) name = 'qemu64';
  if (name === undefined) return undefined;
  const parts = [name];
  if (cpu?.migratable !== undefined) parts.push(`migratable=${onOff(cpu.migratable)}`);
  for (const f of cpu?.features ?? []) {
    parts.push(`${f.policy === 'disable' || f.policy === 'forbid' ? '-' : '+'}${f.name}`);
  }
  parts.push(...timers);
  // check='full': refuse to start rather than silently drop a feature the host lacks.
  if (cpu?.check === 'full' && cpu.mode === 'custom' && cpu.model) parts.push('enforce');
  return parts.join(',');
}

/** As libvirt: each enlightenment that is on, as qemu's hv-* property (off is qemu's default). */
function hypervProperties(h: HypervDef | undefined): string[] {
  if (!h) return [];
  return HYPERV_FEATURES.filter((name) => h.features[name]).flatMap((name) => {
    if (name === 'spinlocks') return [`hv-spinlocks=0x${h.spinlockRetries!.toString(16)}`];
    if (name === 'vendor_id') return [`hv-vendor-id=${escapeOptionValue(h.vendorId!)}`];
    return [`hv-${name}=on`, ...(name === 'stimer' && h.stimerDirect ? ['hv-stimer-direct=on'] : [])];
  });
}

function smpOption(def: DomainDef): string {
  const t = def.cpu?.topology;
  const parts = [String(def.vcpusCurrent)];
  if (def.vcpusCurrent < def.vcpus) parts.push(`maxcpus=${def.vcpus}`);
  if (!t) {
    parts.push(`sockets=${def.vcpus}`, 'cores=1', 'threads=1');
    return parts.join(',');
  }
  // libvirt 9 with qemu 7.2 (which has dies on x86) always passes dies= for a <topology>.
  parts.push(`sockets=${t.sockets}`, `dies=${t.dies}`);
  parts.push(`cores=${t.cores}`, `threads=${t.threads}`);
  return parts.join(',');
}

const USB_DRIVERS: Record<string, string> = {
  'piix3-uhci': 'piix3-usb-uhci',
  'qemu-xhci': 'qemu-xhci',
  'nec-xhci': 'nec-usb-xhci',
  'ich9-ehci1': 'ich9-usb-ehci1',
  'ich9-uhci1': 'ich9-usb-uhci1',
  'ich9-uhci2': 'ich9-usb-uhci2',
  'ich9-uhci3': 'ich9-usb-uhci3',
};

/** A controller's -device, with the properties libvirt passes for it. */
function controllerDevice(c: ControllerDef, pci: (a: PciAddress) => string): string {
  const parts: string[] = [];
  switch (c.type) {
    case 'usb':
      parts.push(USB_DRIVERS[c.model!]!);
      if (c.ports !== undefined) parts.push(`p2=${c.ports}`, `p3=${c.ports}`);
      // A UHCI companion has no id; it serves ports of its EHCI's bus.
      if (c.master) parts.push(`masterbus=usb.0`, `firstport=${c.master.startport}`);
      break;
    case 'sata':
      parts.push('ahci');
      break;
    case 'scsi':
      parts.push(c.model === 'lsilogic' ? 'lsi' : 'virtio-scsi-pci');
      if (c.queues !== undefined) parts.push(`num_queues=${c.queues}`);
      if (c.iothread !== undefined) parts.push(`iothread=iothread${c.iothread}`);
      break;
    case 'pci':
      parts.push(PCI_DRIVERS[c.model as PciModel]!);
      if (c.model === 'pcie-root-port' || c.model === 'pcie-switch-downstream-port') parts.push(`port=0x${c.port!.toString(16)}`, `chassis=${c.chassis}`);
      if (c.busNr !== undefined) parts.push(`bus_nr=${c.busNr}`);
      if (c.model === 'pci-bridge') parts.push(`chassis_nr=${c.chassisNr}`);
      break;
    default:
      parts.push('virtio-serial-pci');
      if (c.ports !== undefined) parts.push(`max_ports=${c.ports}`);
      if (c.vectors !== undefined) parts.push(`vectors=${c.vectors}`);
  }
  if (c.id !== '') parts.push(`id=${c.id}`);
  parts.push(pci(c.address!));
  return parts.join(',');
}

const bootindex = (i: number | undefined) => (i === undefined ? '' : `,bootindex=${i}`);

/** cache mode -> (O_DIRECT, ignore flushes, guest-visible write cache), as libvirt maps it. */
const CACHE: Record<string, [boolean, boolean, boolean]> = {
  none: [true, false, true],
  writethrough: [false, false, false],
  writeback: [false, false, true],
  directsync: [true, false, false],
  unsafe: [false, true, true],
};

/**
 * A protocol node (the file or block device) under a format node; JSON avoids any escaping. With
 * a chain, each backing layer (and data file) is a read-only node pair of its own, written
 * bottom-up so every node exists before one refers to it, the last one with `backing: null`.
 */
function blockdevArgs(d: DiskDef, fileArg: (path: string) => string, chain: ImageChain | undefined): string[] {
  const cache = d.cache && { direct: CACHE[d.cache]![0], 'no-flush': CACHE[d.cache]![1] };
  const common = {
    ...(d.readonly ? { 'read-only': true } : {}),
    ...(cache ? { cache } : {}),
    ...(d.discard ? { discard: d.discard } : {}),
  };
  const protocol = d.type === 'file' ? 'file' : d.device === 'cdrom' ? 'host_cdrom' : 'host_device';
  const args: string[] = [];
  const node = (o: object) => args.push('-blockdev', JSON.stringify(o));
  const layerName = (k: number) => (k === 0 ? `drive-${d.id}` : `drive-${d.id}-b${k}`);
  const below = (k: number, dataFile: string | undefined) => {
    if (!chain) return {};
    const extra: Record<string, unknown> = { backing: k < chain.backing.length ? layerName(k + 1) : null };
    if (dataFile !== undefined) {
      node({ driver: 'file', filename: dataFile, 'node-name': `data-${d.id}${k ? `-b${k}` : ''}`, ...(k ? { 'read-only': true } : common) });
      extra['data-file'] = `data-${d.id}${k ? `-b${k}` : ''}`;
    }
    return extra;
  };
  const layers = chain?.backing ?? [];
  for (let k = layers.length; k >= 1; k--) {
    const layer = layers[k - 1]!;
    const backingCommon = { 'read-only': true, ...(cache ? { cache } : {}) };
    node({ driver: 'file', filename: layer.file, 'node-name': `file-${d.id}-b${k}`, ...backingCommon });
    node({ driver: layer.format, file: `file-${d.id}-b${k}`, 'node-name': layerName(k), ...backingCommon, ...(layer.format === 'qcow2' ? below(k, layer.dataFile) : {}) });
  }
  node({ driver: protocol, filename: fileArg(d.source!), 'node-name': `file-${d.id}`, ...common, ...(d.io ? { aio: d.io } : {}) });
  node({ driver: d.format, file: `file-${d.id}`, 'node-name': layerName(0), ...common, ...(d.format === 'qcow2' ? below(0, chain?.dataFile) : {}) });
  return args;
}

function diskDevice(d: DiskDef, controllers: ControllerDef[], pci: (a: PciAddress) => string): string {
  const cd = d.device === 'cdrom';
  let driver: string;
  let where: string;
  if (d.address.type === 'pci') {
    driver = 'virtio-blk-pci';
    where = `${d.iothread !== undefined ? `iothread=iothread${d.iothread},` : ''}${pci(d.address)}`;
  } else {
    const a = d.address;
    if (d.bus === 'scsi') {
      driver = cd ? 'scsi-cd' : 'scsi-hd';
      const lsi = controllers.find((c) => c.type === 'scsi' && c.index === a.controller)!.model === 'lsilogic';
      // The lsi HBA has no channel or LUN property: libvirt gives it the unit as scsi-id.
      where = lsi ? `bus=scsi${a.controller}.${a.bus},scsi-id=${a.unit}` : `bus=scsi${a.controller}.0,channel=0,scsi-id=${a.target},lun=${a.unit}`;
      // As libvirt: the VPD device id qemu took from the -drive name before -blockdev (guest-visible).
      where += `,device_id=${escapeOptionValue(d.serial ?? `drive-${d.id}`)}`;
    } else {
      driver = cd ? 'ide-cd' : 'ide-hd';
      const ctrl = controllers.find((c) => c.type === d.bus && c.index === a.controller)!;
      where = d.bus === 'ide' ? `bus=ide.${a.bus},unit=${a.unit}` : `bus=${ctrl.id}.${a.unit}`;
    }
  }
  const parts = [driver, where];
  if (d.source !== undefined) parts.push(`drive=drive-${d.id}`);
  parts.push(`id=${d.id}`);
  if (d.bootIndex !== undefined) parts.push(`bootindex=${d.bootIndex}`);
  if (d.cache) parts.push(`write-cache=${onOff(CACHE[d.cache]![2])}`);
  if (d.shareable) parts.push('share-rw=on');
  if (d.serial !== undefined) parts.push(`serial=${escapeOptionValue(d.serial)}`);
  if (d.wwn !== undefined) parts.push(`wwn=0x${d.wwn}`);
  return parts.join(',');
}

function chardevOption(id: string, s: CharSource, log: CharLog | undefined, fileArg: (path: string) => string, hostSocket?: string): string {
  let opt: string;
  switch (s.type) {
    case 'pty':
    case 'null':
      opt = `${s.type},id=${id}`;
      break;
    case 'spicevmc':
      // A channel's spicevmc is always the SPICE agent's (see SPICE_AGENT_CHANNEL).
      opt = `spicevmc,id=${id},name=vdagent`;
      break;
    case 'file':
      opt = `file,id=${id},path=${escapeOptionValue(fileArg(s.path))}${s.append ? ',append=on' : ''}`;
      break;
    case 'unix':
      opt = `socket,id=${id},path=${escapeOptionValue(s.path ?? hostSocket!)}${s.mode === 'bind' ? ',server=on,wait=off' : ''}`;
      break;
    case 'tcp':
      opt = `socket,id=${id},host=${s.host},port=${s.service}${s.mode === 'bind' ? ',server=on,wait=off' : ''}${s.protocol === 'telnet' ? ',telnet=on' : ''}`;
      break;
  }
  if (log) opt += `,logfile=${escapeOptionValue(fileArg(log.file))}${log.append ? ',logappend=on' : ''}`;
  return opt;
}
