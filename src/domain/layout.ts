/**
 * Completes a parsed domain the way libvirt does at define time: controllers that devices need
 * are added, every device gets an address (PCI slot, drive unit, USB port, virtio-serial port)
 * and a libvirt-style id, and boot order becomes per-device bootindex. The result depends only
 * on the XML; normalization writes the addresses back so that later versions of this code (or
 * an edit that adds a device) cannot move an existing device.
 */
import type {
  BootDev,
  ChannelDef,
  CharLog,
  CharSource,
  ConsoleDef,
  ControllerDef,
  ControllerType,
  DiskDef,
  DomainDef,
  DriveAddress,
  InputDef,
  InterfaceDef,
  MachineFamily,
  MemballoonDef,
  PciAddress,
  RedirdevDef,
  RngDef,
  SerialDef,
  UsbAddress,
  VideoDef,
  VirtioSerialAddress,
  WatchdogAction,
  WatchdogDef,
} from './model.js';
import { fail } from './walk.js';
import { checkPciControllers, pciAddr, pciBusId, placePci, type PciConnect, type PciPlacement } from './pci.js';

export type RawDisk = Omit<DiskDef, 'address' | 'id' | 'bootIndex'> & { address?: PciAddress | DriveAddress };
export interface RawController extends Pick<ControllerDef, 'chassis' | 'port' | 'chassisNr' | 'busNr'> {
  element: string;
  type: ControllerType;
  index?: number;
  model?: ControllerDef['model'];
  ports?: number;
  vectors?: number;
  queues?: number;
  iothread?: number;
  master?: { startport: number };
  address?: PciAddress;
}
/** `mac` is '' when missing (define time only). */
export type RawInterface = Omit<InterfaceDef, 'address' | 'id' | 'netdevId' | 'bootIndex'> & { address?: PciAddress };
export interface RawSerial {
  element: string;
  source: CharSource;
  log?: CharLog;
  port?: number;
}
export interface RawConsole {
  element: string;
  targetType: 'serial' | 'virtio';
  source: CharSource;
  log?: CharLog;
  port?: number;
  address?: VirtioSerialAddress;
}
export interface RawChannel {
  element: string;
  name: string;
  source: CharSource;
  log?: CharLog;
  address?: VirtioSerialAddress;
}
type RawRng = Omit<RngDef, 'id' | 'objectId' | 'address'> & { address?: PciAddress };
export type RawRedirdev = Omit<RedirdevDef, 'id' | 'chardevId' | 'address'> & { address?: UsbAddress };
export type RawWatchdog = Omit<WatchdogDef, 'id'> & { action: WatchdogAction };

export interface RawDomain extends Omit<DomainDef,
  'disks' | 'controllers' | 'interfaces' | 'serials' | 'consoles' | 'channels' | 'videos' | 'inputs' | 'redirdevs' | 'memballoon' | 'rngs'
  | 'watchdogs' | 'watchdogAction'> {
  disks: RawDisk[];
  controllers: RawController[];
  interfaces: RawInterface[];
  serials: RawSerial[];
  consoles: RawConsole[];
  channels: RawChannel[];
  videos: Omit<VideoDef, 'id'>[];
  inputs: Omit<InputDef, 'id'>[];
  redirdevs: RawRedirdev[];
  memballoon?: Omit<MemballoonDef, 'id'>;
  rngs: RawRng[];
  watchdogs: RawWatchdog[];
}

const DEVICES = '/domain/devices';
/** USB ports of each controller model without a `ports` attribute (libvirt's count; the EHCI's six are shared with its UHCI companions). */
const USB_PORTS: Record<string, number> = { 'piix3-uhci': 2, 'qemu-xhci': 4, 'nec-xhci': 4, 'ich9-ehci1': 6 };
const VIRTIO_SERIAL_PORTS = 31;
const ICH9_SET = ['ich9-ehci1', 'ich9-uhci1', 'ich9-uhci2', 'ich9-uhci3'] as const;

function defaultUsbModel(family: MachineFamily): 'piix3-uhci' | 'qemu-xhci' {
  return family === 'q35' ? 'qemu-xhci' : 'piix3-uhci';
}

export function completeDomain(raw: RawDomain): DomainDef {
  const { disks: rawDisks, controllers: rawControllers, interfaces: rawIfaces, serials: rawSerials,
    consoles: rawConsoles, channels: rawChannels, videos: rawVideos, inputs: rawInputs, redirdevs: rawRedirdevs, memballoon: rawBalloon,
    rngs: rawRngs, watchdogs: rawWatchdogs, ...base } = raw;
  const family = raw.machineFamily;
  const controllers = completeControllers(rawControllers, family);

  const ensureController = (type: ControllerType, index: number): ControllerDef => {
    let c = controllers.find((x) => x.type === type && x.index === index && !x.master);
    if (!c) {
      c = controllerDef({ type, index }, family);
      controllers.push(c);
    }
    return c;
  };

  const disks = completeDisks(rawDisks, family, ensureController);
  const interfaces = rawIfaces.map((r, i): InterfaceDef => ({ ...r, address: r.address!, id: `net${i}`, netdevId: `hostnet${i}` }));
  const macs = new Map<string, string>();
  for (const n of interfaces) {
    if (n.mac === '') continue;
    if (macs.has(n.mac)) throw fail('invalid_value', `${n.element}/mac/@address`, `MAC address ${n.mac} is already used by ${macs.get(n.mac)}`);
    macs.set(n.mac, n.element);
  }
  assignBootIndexes(raw.os.bootDevs, raw.os.kernel !== undefined, disks, interfaces);

  const serials = completeSerials(rawSerials, rawConsoles);
  const { consoles, channels } = completeVirtioSerial(rawConsoles, rawChannels, ensureController, controllers);
  checkSpiceUsers(raw);
  const inputs = rawInputs.map((r, i): InputDef => ({ ...r, id: `input${i}` }));
  const usbRedirs = rawRedirdevs.map((r) => ({ ...r }));
  assignUsbPorts([...inputs.filter((i) => i.bus === 'usb'), ...usbRedirs], controllers, ensureController);
  const redirdevs = usbRedirs.map((r, i): RedirdevDef => ({ ...r, address: r.address!, id: `redir${i}`, chardevId: `charredir${i}` }));

  const videos: VideoDef[] = rawVideos.map((v, i) => ({ ...v, id: `video${i}` }));
  // A display needs a video card; libvirt adds VGA too.
  if (videos.length === 0 && raw.graphics.length > 0) videos.push({ model: 'vga', vramKiB: 16384, primary: true, id: 'video0' });
  const memballoon: MemballoonDef | undefined = rawBalloon && { ...rawBalloon, id: 'balloon0' };
  const rngs = rawRngs.map((r, i): RngDef => ({ ...r, address: r.address!, id: `rng${i}`, objectId: `objrng${i}` }));
  const watchdogs = rawWatchdogs.map(({ action: _action, ...w }, i): WatchdogDef => ({ ...w, id: `watchdog${i}` }));
  for (const d of [...disks, ...controllers]) {
    if (d.iothread !== undefined && d.iothread > raw.iothreads) {
      throw fail('invalid_value', `${d.element ?? DEVICES}/driver/@iothread`, `iothread ${d.iothread} does not exist (<iothreads> is ${raw.iothreads})`);
    }
  }

  // The ICH9 USB2 set is one multifunction slot: q35's 00:1d (as libvirt), else wherever its
  // uhci1 (function 0) lands, the others placed beside it afterwards.
  const usbSet = placeIch9Set(family, controllers);
  if (!controllers.some((c) => c.type === 'pci' && c.index === 0)) {
    controllers.unshift(controllerDef({ type: 'pci', index: 0, model: family === 'q35' ? 'pcie-root' : 'pci-root' }, family));
  }
  checkPciControllers(controllers, family);
  const primaryVideo = videos.find((v) => v.primary && v.model !== 'none');
  const ordered: PciPlacement[] = [
    // libvirt's order of assignment: network, other controllers, virtio disks, balloon, rng, video, inputs.
    ...interfaces.map((n) => ({ user: n, connect: (n.model === 'virtio' || n.model === 'e1000e' ? 'pcie' : 'pci') as PciConnect })),
    ...controllers.filter((c) => !c.builtin && c.type !== 'pci' && !usbSet.later.includes(c)).map((c) => ({ user: c, connect: controllerConnect(c) })),
    ...disks.filter((d) => d.bus === 'virtio').map((d) => ({ user: d, connect: 'pcie' as const })),
    ...(memballoon && memballoon.model === 'virtio' ? [{ user: memballoon, connect: 'pcie' as const }] : []),
    ...rngs.map((r) => ({ user: r, connect: 'pcie' as const })),
    ...(primaryVideo ? [{ user: primaryVideo, connect: (primaryVideo.model === 'virtio' ? 'pcie' : 'pci') as PciConnect }] : []),
    ...watchdogs.filter((w) => w.model === 'i6300esb').map((w) => ({ user: w, connect: 'pci' as const })),
    // Further displays: qxl is conventional PCI, virtio-gpu-pci a PCIe endpoint.
    ...videos.filter((v) => !v.primary).map((v) => ({ user: v, connect: (v.model === 'virtio' ? 'pcie' : 'pci') as PciConnect })),
    ...raw.sounds.map((snd) => ({ user: snd, connect: 'pci' as const })),
    ...inputs.filter((i) => i.bus === 'virtio').map((i) => ({ user: i, connect: 'pcie' as const })),
  ];
  completeSounds(raw, family, ordered);
  placePci(family, controllers, ordered, chipsetFunctions(family, ordered, controllers), primaryVideo);
  usbSet.placeRest();
  // PCI controllers first, in index order (a bus is made before what plugs into it), then the rest as given.
  controllers.sort((a, b) => (a.type === 'pci' ? 0 : 1) - (b.type === 'pci' ? 0 : 1) || (a.type === 'pci' && b.type === 'pci' ? a.index - b.index : 0));

  return {
    ...base, disks, controllers, interfaces, serials, consoles, channels, videos, inputs, redirdevs, ...(memballoon ? { memballoon } : {}), rngs,
    watchdogs, ...(rawWatchdogs[0] ? { watchdogAction: rawWatchdogs[0].action } : {}),
  };
}

/**
 * Checks the ICH9 USB2 set (an EHCI and its three UHCI companions: all four or none) and
 * places it where libvirt does: with no addresses, on q35 at 00:1d (uhci1 .0 multifunction,
 * uhci2 .1, uhci3 .2, ehci1 .7); on i440fx in the slot its uhci1 gets, which `placeRest` then
 * shares with the others. Given addresses are kept (all four, or none).
 */
function placeIch9Set(family: MachineFamily, controllers: ControllerDef[]): { later: ControllerDef[]; placeRest: () => void } {
  const set = controllers.filter((c) => c.type === 'usb' && (ICH9_SET as readonly string[]).includes(c.model ?? ''));
  const none = { later: [], placeRest: () => undefined };
  if (set.length === 0) return none;
  const byModel = new Map(set.map((c) => [c.model!, c]));
  for (const c of set) {
    if (set.filter((x) => x.model === c.model).length > 1) throw fail('unsupported_value', `${c.element}/@model`, `only one ICH9 USB2 set is supported (a second ${c.model})`);
  }
  const missing = ICH9_SET.filter((m) => !byModel.has(m));
  if (missing.length > 0) {
    throw fail('missing_element', set[0]!.element ?? DEVICES, `the ICH9 USB2 controllers go together: ${missing.join(', ')} ${missing.length > 1 ? 'are' : 'is'} missing (an ich9-ehci1 and its ich9-uhci1..3 companions, each with <master startport>)`);
  }
  const withAddress = set.filter((c) => c.address);
  if (withAddress.length === 4) return none;
  if (withAddress.length > 0) {
    const bare = set.find((c) => !c.address)!;
    throw fail('missing_element', `${bare.element}/address`, 'give the ICH9 USB2 controllers PCI addresses all four, or none');
  }
  const fn: Record<string, number> = { 'ich9-uhci1': 0, 'ich9-uhci2': 1, 'ich9-uhci3': 2, 'ich9-ehci1': 7 };
  const at = (slot: number) => {
    for (const c of set) c.address = { type: 'pci', domain: 0, bus: 0, slot, function: fn[c.model!]!, multifunction: c.model === 'ich9-uhci1' };
  };
  if (family === 'q35') {
    at(0x1d);
    return none;
  }
  const first = byModel.get('ich9-uhci1')!;
  return { later: set.filter((c) => c !== first), placeRest: () => at((first.address as PciAddress).slot) };
}

function controllerDef(c: Omit<RawController, 'element' | 'index'> & { element?: string; index: number }, family: MachineFamily): ControllerDef {
  const at = c.element ?? DEVICES;
  const def: ControllerDef = { ...c, builtin: false, id: '' };
  if (c.element === undefined) delete def.element;
  if (c.model === undefined) delete def.model;
  const onlyIndex0 = () => {
    if (c.index !== 0) throw fail('unsupported_value', `${at}/@index`, `only one ${c.type} controller (index 0) is supported`);
  };
  const builtinAt = (slot: number, fn: number) => {
    const a = c.address;
    if (a && (a.slot !== slot || a.function !== fn)) {
      throw fail('invalid_value', `${at}/address`, `the builtin ${c.type} controller sits at slot ${slot} function ${fn}`);
    }
    def.builtin = true;
  };
  switch (c.type) {
    case 'pci':
      def.builtin = c.index === 0;
      def.id = pciBusId(family, c.index);
      break;
    case 'ide':
      if (family === 'q35') throw fail('unsupported_value', `${at}/@type`, "q35 machines have no IDE controller; use bus='sata'");
      onlyIndex0();
      builtinAt(1, 1);
      def.id = 'ide';
      break;
    case 'sata':
      if (family === 'q35' && c.index === 0) {
        builtinAt(0x1f, 2);
        def.id = 'ide'; // the ICH9 AHCI of q35 is named 'ide' by qemu
      } else {
        def.id = `sata${c.index}`;
      }
      break;
    case 'usb':
      onlyIndex0();
      def.model ??= defaultUsbModel(family);
      def.builtin = def.model === 'none';
      // The ICH9 UHCI companions have no id of their own (libvirt passes none): they hang off usb.0.
      def.id = c.master ? '' : 'usb';
      break;
    case 'scsi':
      def.model ??= 'virtio-scsi';
      def.id = `scsi${c.index}`;
      break;
    case 'virtio-serial':
      def.id = `virtio-serial${c.index}`;
      break;
  }
  return def;
}

function completeControllers(raw: RawController[], family: MachineFamily): ControllerDef[] {
  const taken = new Set<string>();
  for (const c of raw) {
    // A USB companion shares the index of its EHCI.
    if (c.index === undefined || c.master) continue;
    const key = `${c.type}:${c.index}`;
    if (taken.has(key)) throw fail('invalid_value', `${c.element}/@index`, `there are two ${c.type} controllers with index ${c.index}`);
    taken.add(key);
  }
  return raw.map((c) => {
    let index = c.index;
    if (index === undefined && c.master) index = 0;
    if (index === undefined) {
      // A bare root port or bridge never takes index 0: that is the root's, implicit or not.
      index = c.type === 'pci' && c.model !== 'pci-root' && c.model !== 'pcie-root' ? 1 : 0;
      while (taken.has(`${c.type}:${index}`)) index++;
      taken.add(`${c.type}:${index}`);
    }
    return controllerDef({ ...c, index }, family);
  });
}

/** libvirt's virDiskNameToIndex: vda=0 ... vdz=25, vdaa=26. */
function diskIndex(target: string): number {
  let idx = 0;
  for (const ch of target.slice(2)) idx = idx * 26 + (ch.charCodeAt(0) - 96);
  return idx - 1;
}

/** libvirt's default SCSI drive address (wide buses): 15 units per controller, unit 7 being the HBA's own. */
function defaultScsiAddress(idx: number): DriveAddress {
  const unit = idx % 15;
  return { type: 'drive', controller: Math.floor(idx / 15), bus: 0, target: 0, unit: unit >= 7 ? unit + 1 : unit };
}

function completeDisks(raw: RawDisk[], family: MachineFamily, ensure: (t: ControllerType, i: number) => ControllerDef): DiskDef[] {
  const targets = new Map<string, string>();
  const units = new Map<string, string>();
  return raw.map((r): DiskDef => {
    const tpath = `${r.element}/target/@dev`;
    if (targets.has(r.target)) throw fail('invalid_value', tpath, `target '${r.target}' is already used by ${targets.get(r.target)}`);
    targets.set(r.target, r.element);
    const idx = diskIndex(r.target);
    if (r.device === 'cdrom' && r.bus === 'virtio') throw fail('unsupported_value', `${r.element}/target/@bus`, 'a cdrom cannot be on virtio');
    if (r.device === 'disk' && r.readonly && (r.bus === 'ide' || r.bus === 'sata')) {
      throw fail('unsupported_element', `${r.element}/readonly`, `a read-only disk is not supported on ${r.bus}`);
    }
    if (r.bus === 'virtio') return { ...r, address: r.address!, id: `virtio-disk${idx}` };

    const apath = `${r.element}/address`;
    let a = r.address as DriveAddress | undefined;
    let id: string;
    const check = (ok: boolean, what: string) => {
      if (!ok) throw fail('invalid_value', a === r.address ? apath : tpath, `${what} (target '${r.target}')`);
    };
    switch (r.bus) {
      case 'ide':
        if (family === 'q35') throw fail('unsupported_value', `${r.element}/target/@bus`, "q35 machines have no IDE bus; use bus='sata'");
        a ??= { type: 'drive', controller: 0, bus: Math.floor(idx / 2), target: 0, unit: idx % 2 };
        check(a.controller === 0 && a.bus <= 1 && a.target === 0 && a.unit <= 1, 'IDE has controller 0, buses 0-1, units 0-1');
        id = `ide0-${a.bus}-${a.unit}`;
        break;
      case 'sata':
        a ??= { type: 'drive', controller: Math.floor(idx / 6), bus: 0, target: 0, unit: idx % 6 };
        check(a.bus === 0 && a.target === 0 && a.unit <= 5, 'an AHCI controller has bus 0 and units 0-5');
        id = `sata${a.controller}-0-${a.unit}`;
        break;
      default: {
        a ??= defaultScsiAddress(idx);
        if (ensure('scsi', a.controller).model === 'lsilogic') {
          // The LSI 53C895A: one bus, targets 0-6 (7 is the HBA), LUN 0; libvirt gives the unit as scsi-id.
          check(a.bus === 0 && a.target === 0 && a.unit <= 6, 'an lsilogic controller has bus 0, target 0 and units 0-6');
          id = `scsi${a.controller}-${a.bus}-${a.unit}`;
        } else {
          check(a.bus === 0 && a.unit <= 16383, 'virtio-scsi has bus 0 and units 0-16383');
          id = `scsi${a.controller}-0-${a.target}-${a.unit}`;
        }
        break;
      }
    }
    ensure(r.bus, a.controller);
    const key = `${r.bus}:${a.controller}:${a.bus}:${a.target}:${a.unit}`;
    if (units.has(key)) throw fail('invalid_value', r.address ? apath : tpath, `drive address ${id} is already used by ${units.get(key)}`);
    units.set(key, r.element);
    return { ...r, address: a, id };
  });
}

function assignBootIndexes(bootDevs: BootDev[], hasKernel: boolean, disks: DiskDef[], ifaces: InterfaceDef[]): void {
  const perDevice = [...disks, ...ifaces].filter((d) => d.bootOrder !== undefined);
  if (perDevice.length > 0) {
    if (bootDevs.length > 0) {
      throw fail('invalid_value', `${perDevice[0]!.element}/boot`, 'per-device <boot order> cannot be combined with <os><boot dev>');
    }
    const seen = new Map<number, string>();
    for (const d of perDevice) {
      if (seen.has(d.bootOrder!)) throw fail('invalid_value', `${d.element}/boot/@order`, `boot order ${d.bootOrder} is already used by ${seen.get(d.bootOrder!)}`);
      seen.set(d.bootOrder!, d.element);
      d.bootIndex = d.bootOrder!;
    }
    return;
  }
  // libvirt: no boot element and no kernel means boot from the first hard disk.
  const devs: BootDev[] = bootDevs.length > 0 ? bootDevs : hasKernel ? [] : ['hd'];
  devs.forEach((dev, i) => {
    const target = dev === 'network' ? ifaces[0] : disks.find((d) => d.device === (dev === 'hd' ? 'disk' : 'cdrom'));
    if (target) target.bootIndex = i + 1;
  });
}

const sameBackend = (a: { source: CharSource; log?: CharLog }, b: { source: CharSource; log?: CharLog }) =>
  JSON.stringify([a.source, a.log ?? null]) === JSON.stringify([b.source, b.log ?? null]);

function completeSerials(raw: RawSerial[], consoles: RawConsole[]): SerialDef[] {
  const ports = new Map<number, string>();
  for (const s of raw) {
    if (s.port === undefined) continue;
    if (ports.has(s.port)) throw fail('invalid_value', `${s.element}/target/@port`, `serial port ${s.port} is already used by ${ports.get(s.port)}`);
    ports.set(s.port, s.element);
  }
  const serials = raw.map((s, i): SerialDef => {
    let port = s.port;
    if (port === undefined) {
      port = [0, 1, 2, 3].find((p) => !ports.has(p));
      if (port === undefined) throw fail('invalid_value', s.element, 'all four serial ports are in use');
      ports.set(port, s.element);
    }
    const def: SerialDef = { element: s.element, origin: 'serial', source: s.source, port, id: `serial${i}`, chardevId: `charserial${i}` };
    if (s.log) def.log = s.log;
    return def;
  });

  consoles.forEach((c, i) => {
    if (c.targetType !== 'serial') return;
    // As in libvirt, a serial console is another view of a serial port, not a device of its own.
    if (i > 0) throw fail('unsupported_value', `${c.element}/target/@type`, 'only the first console may be a serial console');
    const port = c.port ?? 0;
    if (serials.length === 0) {
      const def: SerialDef = { element: c.element, origin: 'console', source: c.source, port, id: 'serial0', chardevId: 'charserial0' };
      if (c.log) def.log = c.log;
      serials.push(def);
      return;
    }
    const s = serials.find((x) => x.port === port);
    if (!s) throw fail('invalid_value', `${c.element}/target/@port`, `there is no serial port ${port} for the console`);
    if (!sameBackend(s, c)) throw fail('invalid_value', c.element, `the serial console must have the same source as ${s.element}`);
  });
  return serials;
}

function completeVirtioSerial(rawConsoles: RawConsole[], rawChannels: RawChannel[], ensure: (t: ControllerType, i: number) => ControllerDef, controllers: ControllerDef[]) {
  // A controller's ports (max_ports) are 0 .. ports-1.
  const portsOf = (controller: number) => controllers.find((c) => c.type === 'virtio-serial' && c.index === controller)?.ports ?? VIRTIO_SERIAL_PORTS;
  const used = new Map<string, string>();
  const all = [
    ...rawConsoles.flatMap((c, i) => (c.targetType === 'virtio' ? [{ raw: c, console: true, i }] : [])),
    ...rawChannels.map((c, i) => ({ raw: c, console: false, i })),
  ];
  for (const { raw, console } of all) {
    const a = raw.address;
    if (!a) continue;
    if (a.port === 0 && !console) throw fail('invalid_value', `${raw.element}/address/@port`, 'virtio-serial port 0 is reserved for consoles');
    if (a.port >= portsOf(a.controller)) throw fail('invalid_value', `${raw.element}/address/@port`, `virtio-serial controller ${a.controller} has ports 0-${portsOf(a.controller) - 1}`);
    const key = `${a.controller}:${a.port}`;
    if (used.has(key)) throw fail('invalid_value', `${raw.element}/address`, `virtio-serial port ${a.port} is already used by ${used.get(key)}`);
    used.set(key, raw.element);
  }
  const names = new Map<string, string>();
  const consoles: ConsoleDef[] = [];
  const channels: ChannelDef[] = [];
  for (const { raw, console, i } of all) {
    let a = raw.address;
    if (!a) {
      const port = Array.from({ length: portsOf(0) - 1 }, (_, k) => k + 1).find((p) => !used.has(`0:${p}`));
      if (port === undefined) throw fail('invalid_value', raw.element, 'virtio-serial controller 0 has no free port');
      used.set(`0:${port}`, raw.element);
      a = { type: 'virtio-serial', controller: 0, bus: 0, port };
    }
    ensure('virtio-serial', a.controller);
    const common = { element: raw.element, source: raw.source, address: a, ...(raw.log ? { log: raw.log } : {}) };
    if (console) {
      consoles.push({ ...common, id: `console${i}`, chardevId: `charconsole${i}` });
    } else {
      const name = (raw as RawChannel).name;
      if (names.has(name)) throw fail('invalid_value', `${raw.element}/target/@name`, `channel name '${name}' is already used by ${names.get(name)}`);
      names.set(name, raw.element);
      channels.push({ ...common, name, id: `channel${i}`, chardevId: `charchannel${i}` });
    }
  }
  return { consoles, channels };
}

/**
 * The USB devices' ports, as libvirt assigns them: the given ones first, then the others in
 * libvirt's order (inputs, then redirected devices), each the lowest free port.
 */
function assignUsbPorts(usb: Array<{ element: string; address?: PciAddress | UsbAddress }>, controllers: ControllerDef[], ensure: (t: ControllerType, i: number) => ControllerDef): void {
  if (usb.length === 0) return;
  const explicitNone = controllers.find((c) => c.type === 'usb' && c.model === 'none');
  if (explicitNone) throw fail('unsupported_value', `${usb[0]!.element}/@bus`, `the USB controller (${explicitNone.element}) is model 'none'`);
  const ctrl = ensure('usb', 0);
  const max = ctrl.ports ?? USB_PORTS[ctrl.model!];
  if (max === undefined) throw fail('unsupported_value', `${usb[0]!.element}/@bus`, `USB devices need the ICH9 EHCI (ich9-ehci1), not its companion ${ctrl.model}`);
  const used = new Map<number, string>();
  for (const d of usb) {
    const a = d.address as UsbAddress | undefined;
    if (!a) continue;
    if (a.port > max) throw fail('invalid_value', `${d.element}/address/@port`, `the ${ctrl.model} controller has ports 1-${max}`);
    if (used.has(a.port)) throw fail('invalid_value', `${d.element}/address/@port`, `USB port ${a.port} is already used by ${used.get(a.port)}`);
    used.set(a.port, d.element);
  }
  for (const d of usb) {
    if (d.address) continue;
    const port = Array.from({ length: max }, (_, k) => k + 1).find((p) => !used.has(p));
    if (port === undefined) throw fail('invalid_value', d.element, `the ${ctrl.model} controller has no free port`);
    used.set(port, d.element);
    d.address = { type: 'usb', bus: 0, port };
  }
}

/** As libvirt: the SPICE agent channel, USB redirection and SPICE audio need a SPICE display. */
function checkSpiceUsers(raw: RawDomain): void {
  if (raw.graphics.some((g) => g.type === 'spice')) return;
  const user = raw.channels.find((c) => c.source.type === 'spicevmc') ?? raw.redirdevs[0] ?? raw.audios.find((a) => a.type === 'spice');
  if (user) throw fail('unsupported_value', `${user.element}/@type`, "type 'spicevmc'/'spice' needs a <graphics type='spice'>");
}

/**
 * Sound as libvirt lays it out: the first ich9 of a q35 sits at 00:1b (where the ICH9's own
 * HDA is), a sound names an existing backend, and one without any backend gets libvirt's
 * implicit `<audio id='1'>`, of type 'spice' with a SPICE display, else 'none'.
 */
function completeSounds(raw: RawDomain, family: MachineFamily, ordered: PciPlacement[]): void {
  for (const snd of raw.sounds) {
    if (snd.audioId !== undefined && !raw.audios.some((a) => a.id === snd.audioId)) {
      throw fail('invalid_value', `${snd.element}/audio/@id`, `there is no <audio id='${snd.audioId}'>`);
    }
  }
  // libvirt 9.0: the implicit backend of a SPICE display is the SPICE client.
  const implicitType = raw.graphics.some((g) => g.type === 'spice') ? 'spice' : 'none';
  if (raw.sounds.length > 0 && raw.audios.length === 0) raw.audios.push({ element: DEVICES, id: 1, type: implicitType });
  const first = raw.sounds.find((snd) => snd.model === 'ich9');
  const slotTaken = ordered.some((p) => {
    const a = p.user.address as PciAddress | undefined;
    return a && a.bus === 0 && a.slot === 0x1b;
  });
  if (family === 'q35' && first && !first.address && !slotTaken) first.address = pciAddr(0x1b);
}

/** xhci and the virtio controllers are PCIe endpoints; UHCI/EHCI, AHCI and lsi are conventional PCI. */
function controllerConnect(c: ControllerDef): PciConnect {
  if (c.type === 'usb') return c.model === 'qemu-xhci' || c.model === 'nec-xhci' ? 'pcie' : 'pci';
  if (c.type === 'sata' || c.model === 'lsilogic') return 'pci';
  return 'pcie';
}

/**
 * The chipset's functions on bus 0: 1.0/1.1/1.3 (PIIX3: ISA, IDE, ACPI; its UHCI sits at 1.2)
 * or 1f.0/1f.2/1f.3 (ICH9: LPC, SATA, SMBus). No other device may take the chipset's slot.
 */
function chipsetFunctions(family: MachineFamily, ordered: PciPlacement[], controllers: ControllerDef[]): Array<{ address: PciAddress; by: string }> {
  const slot = family === 'i440fx' ? 1 : 0x1f;
  const uhci = controllers.find((c) => c.type === 'usb' && c.model === 'piix3-uhci');
  if (family === 'i440fx' && uhci && !uhci.address) uhci.address = pciAddr(1, 2);
  for (const p of ordered) {
    const a = p.user.address as PciAddress | undefined;
    if (a && a.bus === 0 && a.slot === slot && !(p.user === uhci && a.function === 2)) {
      throw fail('invalid_value', `${p.user.element ?? DEVICES}/address`, `PCI slot ${slot} belongs to the chipset`);
    }
  }
  const by = family === 'i440fx' ? 'the PIIX3 chipset' : 'the ICH9 chipset';
  return (family === 'i440fx' ? [0, 1, 3] : [0, 2, 3]).map((fn) => ({ address: pciAddr(slot, fn), by }));
}
