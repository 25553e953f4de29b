/**
 * Strict walk of libvirt domain XML into raw device lists (what the user wrote, defaults filled),
 * then `completeDomain` adds implicit controllers, addresses and ids. Everything not understood
 * is refused with the element's path; nothing that could change the guest is ever dropped.
 */
import { qemuFeatureName, CPU_MODELS } from './cpu.js';
import {
  completeDomain,
  type RawChannel,
  type RawConsole,
  type RawController,
  type RawDisk,
  type RawDomain,
  type RawInterface,
  type RawSerial,
} from './layout.js';
import type {
  BootDev,
  CharLog,
  CharSource,
  ClockDef,
  CpuDef,
  DiskBus,
  DomainDef,
  DriveAddress,
  FeaturesDef,
  GraphicsDef,
  InputDef,
  MachineFamily,
  MemballoonDef,
  OsDef,
  PciAddress,
  PciModel,
  RngDef,
  UsbAddress,
  VideoDef,
  VirtioSerialAddress,
} from './model.js';
import { bytesToKiBCeil, scaledToBytes } from './units.js';
import { Blockers, fail, Node } from './walk.js';
import { PCI_DRIVERS } from './pci.js';
import { parseXmlTree, serializeChildren, type XElement } from './xml.js';

const MIN_MEMORY_KIB = 16 * 1024;
const MAX_MEMORY_KIB = 4 * 1024 * 1024 * 1024;
const MAX_VCPUS = 255;

const NAME_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const UUID_RE = /^([0-9a-fA-F]{8})-?([0-9a-fA-F]{4})-?([0-9a-fA-F]{4})-?([0-9a-fA-F]{4})-?([0-9a-fA-F]{12})$/;
const MAC_RE = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
const IFNAME_RE = /^[A-Za-z0-9_.:-]{1,15}$/;
const HOST_RE = /^[A-Za-z0-9:][A-Za-z0-9.:-]{0,252}$/;
const MACHINE_RE = /^(pc|q35|pc-i440fx-[0-9]+\.[0-9]+(\.[0-9]+)?|pc-q35-[0-9]+\.[0-9]+(\.[0-9]+)?)$/;
const EMULATORS = ['qemu-system-x86_64', 'qemu-kvm', 'kvm'];

export interface ParseResult {
  def: DomainDef;
  root: XElement;
  /** XML element of every device and of a few writable sub-elements, by model `element` path. */
  nodes: Map<string, XElement>;
}

export interface ParseOptions {
  /** Define time: a missing uuid or MAC is filled in by the caller afterwards. */
  allowMissingIds: boolean;
}

/** Parses and validates domain XML into the completed model. Throws DomainXmlError. */
export function parseDomainXml(xml: string): DomainDef {
  return parseInternal(xml, { allowMissingIds: false }).def;
}

export function parseInternal(xml: string, opts: ParseOptions): ParseResult {
  const root = parseXmlTree(xml);
  if (root.name !== 'domain') throw fail('unsupported_element', `/${root.name}`, 'the root element must be <domain>');
  const nodes = new Map<string, XElement>();
  const blockers = new Blockers();
  const raw = parseDomain(new Node(root, '/domain', {}, blockers), opts, nodes);
  blockers.throwIfAny();
  return { def: completeDomain(raw!), root, nodes };
}

export function machineFamily(machine: string, path: string): MachineFamily {
  if (!MACHINE_RE.test(machine)) {
    throw fail('unsupported_value', path, `machine type '${machine}' is not supported (pc, q35, pc-i440fx-X.Y, pc-q35-X.Y)`);
  }
  return machine === 'q35' || machine.startsWith('pc-q35-') ? 'q35' : 'i440fx';
}

function canonicalUuid(v: string): string | undefined {
  const m = UUID_RE.exec(v);
  if (!m) return undefined;
  const u = m.slice(1).join('-').toLowerCase();
  return /^[0-]+$/.test(u) ? undefined : u;
}

/** Absolute host path without '.'/'..' components or control characters. */
function hostPath(value: string, path: string): string {
  if (!value.startsWith('/') || /[\u0000-\u001f\u007f]/.test(value) || value.split('/').some((s) => s === '.' || s === '..')) {
    throw fail('invalid_value', path, `'${value}' must be an absolute path without '.' or '..' components`);
  }
  return value;
}

function scaledKiB(node: Node): bigint {
  node.expect({ attrs: ['unit'], text: true });
  try {
    return bytesToKiBCeil(scaledToBytes(node.requireText(), node.attr('unit')));
  } catch (e) {
    if (e instanceof RangeError) throw fail('invalid_value', node.path, e.message);
    throw e;
  }
}

function memoryKiB(node: Node, what: string): number {
  const kib = scaledKiB(node);
  if (kib < BigInt(MIN_MEMORY_KIB) || kib > BigInt(MAX_MEMORY_KIB)) {
    throw fail('invalid_value', node.path, `${what} must be between 16 MiB and 4 TiB`);
  }
  return Number(kib);
}

/**
 * Each part of the domain (identity, memory, os, cpu, features, clock, each device) is walked on
 * its own: one that fails is recorded in the blockers and the walk goes on, so the answer lists
 * them all. Whatever a failed part would have given is left out: the result only matters when
 * nothing failed.
 */
function parseDomain(d: Node, opts: ParseOptions, nodes: Map<string, XElement>): RawDomain | undefined {
  const blockers = d.blockers!;
  const part = <T>(fn: () => T) => blockers.attempt(fn);
  d.expect({
    attrs: ['type'],
    children: ['name', 'uuid', 'title', 'description', 'metadata', 'memory', 'currentMemory', 'vcpu', 'cpu', 'os',
      'features', 'clock', 'on_poweroff', 'on_reboot', 'on_crash', 'devices'],
  });
  const type = part(() => d.requireEnumAttr('type', ['kvm', 'qemu'] as const));

  const name = part(() => {
    const nameNode = d.requireChild('name').expect({ text: true });
    const value = nameNode.text();
    if (!NAME_RE.test(value)) throw fail('invalid_value', nameNode.path, `domain name '${value}' must match [A-Za-z0-9_.-]{1,64}`);
    return value;
  });

  const uuid = part(() => {
    const uuidNode = d.child('uuid');
    if (uuidNode) {
      uuidNode.expect({ text: true });
      const u = canonicalUuid(uuidNode.text());
      if (!u) throw fail('invalid_value', uuidNode.path, `'${uuidNode.text()}' is not a valid UUID`);
      return u;
    }
    if (!opts.allowMissingIds) throw fail('missing_element', '/domain/uuid', 'the domain needs a <uuid>');
    return '';
  });

  const title = part(() => {
    const titleNode = d.child('title')?.expect({ text: true });
    const value = titleNode?.text();
    if (value !== undefined && /[\r\n]/.test(value)) throw fail('invalid_value', titleNode!.path, 'the title must be a single line');
    return value;
  });
  const description = part(() => d.child('description')?.expect({ text: true }).text());
  // Metadata belongs to applications: kept verbatim, never interpreted.
  const metadata = part(() => {
    const metadataNode = d.child('metadata');
    if (!metadataNode) return undefined;
    const names = metadataNode.el.children.flatMap((c) => (c.kind === 'element' ? [c.name] : []));
    metadataNode.expect({ children: names, repeated: names, text: true });
    return serializeChildren(metadataNode.el);
  });

  const memory = part(() => {
    const memoryKiBValue = memoryKiB(d.requireChild('memory'), 'memory');
    const curNode = d.child('currentMemory');
    const currentMemoryKiB = curNode ? memoryKiB(curNode, 'currentMemory') : memoryKiBValue;
    if (currentMemoryKiB > memoryKiBValue) throw fail('invalid_value', curNode!.path, 'currentMemory must not exceed memory');
    return { memoryKiB: memoryKiBValue, currentMemoryKiB };
  });

  const vcpu = part(() => {
    const vcpuNode = d.requireChild('vcpu').expect({ attrs: ['placement', 'current'], text: true });
    vcpuNode.enumAttr('placement', ['static'] as const);
    const vcpus = Number(vcpuNode.requireText());
    if (!/^[0-9]+$/.test(vcpuNode.text()) || vcpus < 1 || vcpus > MAX_VCPUS) {
      throw fail('invalid_value', vcpuNode.path, `vcpu must be an integer in 1..${MAX_VCPUS}`);
    }
    return { vcpus, vcpusCurrent: vcpuNode.intAttr('current', 1, vcpus) ?? vcpus };
  });

  const osNode = part(() => d.requireChild('os'));
  const osPart = osNode && part(() => parseOs(osNode));
  const family = osPart && part(() => machineFamily(osPart.machine, `${osNode!.path}/type/@machine`));
  const cpuNode = d.child('cpu');
  const cpu = cpuNode && vcpu && part(() => parseCpu(cpuNode, vcpu.vcpus));
  const features = part(() => parseFeatures(d.child('features')));
  const clock = part(() => parseClock(d.child('clock')));
  const lifecycle = part(() => parseLifecycle(d));

  const devices: DeviceLists = { disks: [], controllers: [], interfaces: [], serials: [], consoles: [], channels: [], graphics: [], videos: [], inputs: [], rngs: [] };
  const devicesNode = d.child('devices');
  // Devices are walked for their blockers even when the machine type is unknown (as i440fx then).
  const extras = devicesNode ? parseDevices(devicesNode, devices, family ?? 'i440fx', nodes, opts) : {};
  // Every part is there unless one failed (each failure is a blocker).
  if (blockers.any) return undefined;
  return {
    type: type!, name: name!, uuid: uuid!,
    ...(title !== undefined ? { title } : {}),
    ...(description !== undefined ? { description } : {}),
    ...(metadata !== undefined ? { metadata } : {}),
    ...memory!, ...vcpu!,
    machine: osPart!.machine, machineFamily: family!, os: osPart!.os,
    ...(cpu ? { cpu } : {}),
    features: features!,
    clock: clock!,
    ...lifecycle!,
    ...devices,
    ...extras,
  };
}

function parseOs(n: Node): { os: OsDef; machine: string } {
  n.expect({ children: ['type', 'boot', 'bootmenu', 'kernel', 'initrd', 'cmdline'], repeated: ['boot'] });
  const t = n.requireChild('type').expect({ attrs: ['arch', 'machine'], text: true });
  if (t.text() !== 'hvm') throw fail('unsupported_value', t.path, `os type '${t.text()}' is not supported (hvm)`);
  t.enumAttr('arch', ['x86_64'] as const);
  const machine = t.attr('machine') ?? 'pc';

  const bootDevs: BootDev[] = [];
  for (const b of n.children('boot')) {
    b.expect({ attrs: ['dev'] });
    const dev = b.requireEnumAttr('dev', ['hd', 'cdrom', 'network'] as const);
    if (bootDevs.includes(dev)) throw fail('invalid_value', b.attrPath('dev'), `boot device '${dev}' is listed twice`);
    bootDevs.push(dev);
  }
  const os: OsDef = { arch: 'x86_64', bootDevs };
  const menu = n.child('bootmenu');
  if (menu) {
    menu.expect({ attrs: ['enable', 'timeout'] });
    const enable = menu.requireEnumAttr('enable', ['yes', 'no'] as const) === 'yes';
    const timeoutMs = menu.intAttr('timeout', 0, 65535);
    os.bootMenu = timeoutMs === undefined ? { enable } : { enable, timeoutMs };
  }
  for (const key of ['kernel', 'initrd'] as const) {
    const k = n.child(key)?.expect({ text: true });
    if (k) os[key] = hostPath(k.requireText(), k.path);
    // qemu reads -initrd of a multiboot kernel as a comma-separated module list (each module
    // "FILE ARGS"), while the Linux loader takes it as one file name: no escaping serves both,
    // so the initrd path may hold neither commas nor blanks (-kernel is always one file name).
    if (k && key === 'initrd' && /[,\s]/.test(os.initrd!)) throw fail('invalid_value', k.path, `initrd path must not contain commas or blanks: ${os.initrd}`);
  }
  const cmdline = n.child('cmdline')?.expect({ text: true });
  if (cmdline) os.cmdline = cmdline.text();
  if (!os.kernel && (os.initrd !== undefined || os.cmdline !== undefined)) {
    throw fail('missing_element', `${n.path}/kernel`, 'initrd and cmdline need a <kernel>');
  }
  return { os, machine };
}

function parseCpu(n: Node, vcpus: number): CpuDef {
  n.expect({ attrs: ['mode', 'match', 'check'], children: ['model', 'topology', 'feature'], repeated: ['feature'] });
  const mode = n.enumAttr('mode', ['custom', 'host-model', 'host-passthrough', 'maximum'] as const) ?? 'custom';
  const cpu: CpuDef = { mode, features: [] };
  const modelNode = n.child('model');
  if (mode === 'custom') {
    // 'minimum' would let the host add features: the guest CPU would differ between hosts.
    const match = n.enumAttr('match', ['exact', 'strict'] as const);
    if (match) cpu.match = match;
    const check = n.enumAttr('check', ['none', 'partial', 'full'] as const);
    if (check) cpu.check = check;
    if (modelNode) {
      modelNode.expect({ attrs: ['fallback'], text: true });
      const model = modelNode.requireText();
      if (model === 'host') cpu.mode = 'host-passthrough';
      else if (model === 'max') cpu.mode = 'maximum';
      else if (!CPU_MODELS.has(model)) throw fail('unsupported_value', modelNode.path, `CPU model '${model}' is not known to qemu`);
      else cpu.model = model;
      const fallback = modelNode.enumAttr('fallback', ['allow', 'forbid'] as const);
      if (fallback) cpu.fallback = fallback;
    }
  } else {
    for (const a of ['match', 'check']) {
      if (n.attr(a) !== undefined) throw fail('unsupported_attribute', n.attrPath(a), `${a} only applies to mode='custom'`);
    }
    if (modelNode) throw fail('unsupported_element', modelNode.path, `<model> only applies to mode='custom'`);
  }

  const seen = new Set<string>();
  for (const f of n.children('feature')) {
    f.expect({ attrs: ['policy', 'name'] });
    const policy = f.enumAttr('policy', ['require', 'force', 'disable', 'forbid', 'optional'] as const) ?? 'require';
    const fname = f.requireAttr('name');
    const q = qemuFeatureName(fname);
    if (!q) throw fail('unsupported_value', f.attrPath('name'), `CPU feature '${fname}' is not known to qemu`);
    if (seen.has(q)) throw fail('invalid_value', f.attrPath('name'), `CPU feature '${fname}' is listed twice`);
    seen.add(q);
    cpu.features.push({ name: q, policy });
  }
  if (cpu.mode === 'custom' && !cpu.model && cpu.features.length > 0) {
    throw fail('missing_element', `${n.path}/model`, 'CPU features need a <model>');
  }

  const topo = n.child('topology');
  if (topo) {
    topo.expect({ attrs: ['sockets', 'dies', 'cores', 'threads'] });
    for (const a of ['sockets', 'cores', 'threads']) topo.requireAttr(a);
    const t = {
      sockets: topo.intAttr('sockets', 1, MAX_VCPUS)!,
      cores: topo.intAttr('cores', 1, MAX_VCPUS)!,
      threads: topo.intAttr('threads', 1, MAX_VCPUS)!,
    };
    const dies = topo.intAttr('dies', 1, MAX_VCPUS);
    if (t.sockets * t.cores * t.threads * (dies ?? 1) !== vcpus) {
      throw fail('invalid_value', topo.path, `sockets*dies*cores*threads must equal the vcpu count ${vcpus}`);
    }
    cpu.topology = dies === undefined ? t : { sockets: t.sockets, dies, cores: t.cores, threads: t.threads };
  }
  return cpu;
}

function parseFeatures(n: Node | undefined): FeaturesDef {
  const f: FeaturesDef = { acpi: false, apic: false, pae: false };
  if (!n) return f;
  n.expect({ children: ['acpi', 'apic', 'pae', 'vmport'] });
  for (const key of ['acpi', 'apic', 'pae'] as const) {
    const c = n.child(key);
    if (c) {
      c.expect({});
      f[key] = true;
    }
  }
  const vmport = n.child('vmport');
  if (vmport) f.vmport = vmport.expect({ attrs: ['state'] }).requireEnumAttr('state', ['on', 'off'] as const) === 'on';
  return f;
}

function parseClock(n: Node | undefined): ClockDef {
  if (!n) return { offset: 'utc' };
  n.expect({ attrs: ['offset'], children: ['timer'], repeated: ['timer'] });
  const clock: ClockDef = { offset: n.enumAttr('offset', ['utc', 'localtime'] as const) ?? 'utc' };
  const seen = new Set<string>();
  for (const t of n.children('timer')) {
    t.expect({ attrs: ['name', 'tickpolicy', 'present'] });
    const name = t.requireEnumAttr('name', ['rtc', 'pit', 'hpet'] as const);
    if (seen.has(name)) throw fail('invalid_value', t.attrPath('name'), `timer '${name}' is listed twice`);
    seen.add(name);
    if (name === 'hpet') {
      if (t.attr('tickpolicy') !== undefined) throw fail('unsupported_attribute', t.attrPath('tickpolicy'), 'the hpet timer has no tick policy');
      const present = t.boolAttr('present', 'yes', 'no');
      if (present !== undefined) clock.hpet = present;
      continue;
    }
    // Removing the RTC or the PIT is not supported.
    t.enumAttr('present', ['yes'] as const);
    if (name === 'rtc') {
      const p = t.enumAttr('tickpolicy', ['catchup', 'delay'] as const);
      if (p) clock.rtcTickPolicy = p;
    } else {
      const p = t.enumAttr('tickpolicy', ['delay', 'discard'] as const);
      if (p) clock.pitTickPolicy = p;
    }
  }
  return clock;
}

function parseLifecycle(d: Node): Pick<RawDomain, 'onPoweroff' | 'onReboot' | 'onCrash'> {
  const action = <T extends string>(name: string, allowed: readonly T[], dflt: T): T => {
    const n = d.child(name)?.expect({ text: true });
    if (!n) return dflt;
    const v = n.text();
    if (!(allowed as readonly string[]).includes(v)) {
      throw fail('unsupported_value', n.path, `${name} '${v}' cannot be done by qemu here (supported: ${allowed.join(', ')})`);
    }
    return v as T;
  };
  const onPoweroff = action('on_poweroff', ['destroy', 'preserve'] as const, 'destroy');
  const onReboot = action('on_reboot', ['restart', 'destroy'] as const, 'restart');
  const onCrash = action('on_crash', ['destroy', 'preserve'] as const, 'destroy');
  // qemu turns a reboot (reboot=shutdown) and a panic (panic=shutdown) into a shutdown, and
  // the shutdown action then applies: with on_poweroff='preserve' they would pause instead.
  if (onPoweroff === 'preserve') {
    if (onReboot === 'destroy') throw fail('unsupported_value', '/domain/on_reboot', "on_reboot='destroy' needs on_poweroff='destroy'");
    if (onCrash === 'destroy') throw fail('unsupported_value', '/domain/on_crash', "on_crash='destroy' needs on_poweroff='destroy'");
  }
  return { onPoweroff, onReboot, onCrash };
}

// ---- devices -------------------------------------------------------------------------------

const DEVICE_KINDS = ['emulator', 'disk', 'controller', 'interface', 'serial', 'console', 'channel', 'graphics',
  'video', 'input', 'memballoon', 'rng'];

type DeviceLists = Pick<RawDomain, 'disks' | 'controllers' | 'interfaces' | 'serials' | 'consoles' | 'channels' | 'graphics' | 'videos' | 'inputs' | 'rngs'>;

/** Each device on its own (see parseDomain); the devices that occur once are answered apart. */
function parseDevices(n: Node, raw: DeviceLists, family: MachineFamily, nodes: Map<string, XElement>, opts: ParseOptions): Pick<RawDomain, 'emulator' | 'memballoon'> {
  // Unknown device kinds are refused in the loop, so the blockers keep document order.
  const present = [...new Set(n.elements().map((dev) => dev.name))];
  n.expect({ children: present, indexAll: { except: ['emulator'] } });
  const once: Pick<RawDomain, 'emulator' | 'memballoon'> = {};
  for (const dev of n.elements()) {
    if (!DEVICE_KINDS.includes(dev.name)) {
      n.blockers!.add(fail('unsupported_element', dev.path, `element <${dev.name}> is not supported here`));
      continue;
    }
    if (dev.name !== 'emulator') nodes.set(dev.path, dev.el);
    n.blockers!.attempt(() => {
      switch (dev.name) {
        case 'emulator': {
          const path = hostPath(dev.expect({ text: true }).requireText(), dev.path);
          if (!EMULATORS.includes(path.slice(path.lastIndexOf('/') + 1))) {
            throw fail('unsupported_value', dev.path, `emulator must be one of ${EMULATORS.join(', ')}`);
          }
          once.emulator = path;
          break;
        }
        case 'disk': raw.disks.push(parseDisk(dev)); break;
        case 'controller': raw.controllers.push(parseController(dev, family)); break;
        case 'interface': raw.interfaces.push(parseInterface(dev, opts.allowMissingIds)); break;
        case 'serial': raw.serials.push(parseSerial(dev)); break;
        case 'console': raw.consoles.push(parseConsole(dev)); break;
        case 'channel': raw.channels.push(parseChannel(dev)); break;
        case 'graphics': raw.graphics.push(parseGraphics(dev)); break;
        case 'video': raw.videos.push(parseVideo(dev)); break;
        case 'input': raw.inputs.push(parseInput(dev)); break;
        case 'memballoon': {
          if (once.memballoon) throw fail('duplicate_element', dev.path, 'only one <memballoon> is allowed');
          once.memballoon = parseMemballoon(dev);
          break;
        }
        case 'rng': raw.rngs.push(parseRng(dev)); break;
      }
    });
  }
  for (const [list, what] of [[raw.graphics, 'graphics'], [raw.videos, 'video']] as const) {
    if (list.length > 1) n.blockers!.add(fail('duplicate_element', `${n.path}/${what}[2]`, `only one <${what}> is supported`));
  }
  return once;
}

type AddressKind = 'pci' | 'drive' | 'usb' | 'virtio-serial';
type AddressOf<K extends AddressKind> = K extends 'pci' ? PciAddress : K extends 'drive' ? DriveAddress
  : K extends 'usb' ? UsbAddress : VirtioSerialAddress;

function parseAddress<K extends AddressKind>(dev: Node, kinds: readonly K[]): AddressOf<K> | undefined {
  const a = dev.child('address');
  if (!a) return undefined;
  if (kinds.length === 0) throw fail('unsupported_element', a.path, `<${dev.name}> of this kind takes no <address>`);
  const type = a.requireEnumAttr('type', kinds);
  let addr: PciAddress | DriveAddress | UsbAddress | VirtioSerialAddress;
  switch (type as AddressKind) {
    case 'pci': {
      a.expect({ attrs: ['type', 'domain', 'bus', 'slot', 'function', 'multifunction'] });
      a.requireAttr('slot');
      addr = {
        type: 'pci',
        domain: a.intAttr('domain', 0, 0) ?? 0,
        bus: a.intAttr('bus', 0, 255) ?? 0,
        slot: a.intAttr('slot', 0, 31)!,
        function: a.intAttr('function', 0, 7) ?? 0,
        multifunction: a.boolAttr('multifunction', 'on', 'off') ?? false,
      };
      break;
    }
    case 'drive':
      a.expect({ attrs: ['type', 'controller', 'bus', 'target', 'unit'] });
      addr = {
        type: 'drive',
        controller: a.intAttr('controller', 0, 31) ?? 0,
        bus: a.intAttr('bus', 0, 1) ?? 0,
        target: a.intAttr('target', 0, 255) ?? 0,
        unit: a.intAttr('unit', 0, 16383) ?? 0,
      };
      break;
    case 'usb':
      a.expect({ attrs: ['type', 'bus', 'port'] });
      a.requireAttr('port');
      addr = { type: 'usb', bus: a.intAttr('bus', 0, 0) ?? 0, port: a.intAttr('port', 1, 15)! };
      break;
    case 'virtio-serial':
      a.expect({ attrs: ['type', 'controller', 'bus', 'port'] });
      a.requireAttr('port');
      addr = {
        type: 'virtio-serial',
        controller: a.intAttr('controller', 0, 31) ?? 0,
        bus: a.intAttr('bus', 0, 0) ?? 0,
        port: a.intAttr('port', 0, 30) ?? 0,
      };
      break;
  }
  return addr as AddressOf<K>;
}

function parseBootOrder(dev: Node): number | undefined {
  const b = dev.child('boot');
  if (!b) return undefined;
  b.expect({ attrs: ['order'] });
  b.requireAttr('order');
  return b.intAttr('order', 1, 999);
}

const DISK_PREFIX: Record<string, DiskBus> = { vd: 'virtio', hd: 'ide', sd: 'scsi' };

function parseDisk(dev: Node): RawDisk {
  // The discriminating attributes first: what else is allowed depends on them.
  const type = dev.requireEnumAttr('type', ['file', 'block'] as const);
  const device = dev.enumAttr('device', ['disk', 'cdrom'] as const) ?? 'disk';
  dev.expect({ attrs: ['type', 'device'], children: ['driver', 'source', 'target', 'readonly', 'shareable', 'serial', 'wwn', 'boot', 'address'] });

  const driver = dev.child('driver');
  driver?.expect({ attrs: ['name', 'type', 'cache', 'io', 'discard'] });
  driver?.enumAttr('name', ['qemu'] as const);
  const format = driver?.enumAttr('type', ['raw', 'qcow2'] as const) ?? 'raw';
  const cache = driver?.enumAttr('cache', ['none', 'writethrough', 'writeback', 'directsync', 'unsafe'] as const);
  const io = driver?.enumAttr('io', ['threads', 'native'] as const);
  const discard = driver?.enumAttr('discard', ['ignore', 'unmap'] as const);
  if (io === 'native' && cache !== 'none' && cache !== 'directsync') {
    throw fail('unsupported_value', driver!.attrPath('io'), "io='native' needs cache='none' or cache='directsync'");
  }

  const attrName = type === 'file' ? 'file' : 'dev';
  const src = dev.child('source');
  src?.expect({ attrs: [attrName] });
  let source = src?.attr(attrName);
  if (source !== undefined) source = hostPath(source, src!.attrPath(attrName));
  else if (device === 'disk') {
    throw fail('missing_element', src ? src.attrPath(attrName) : `${dev.path}/source`, 'a disk needs a source (only a cdrom may be empty)');
  }

  const tgt = dev.requireChild('target').expect({ attrs: ['dev', 'bus'] });
  const target = tgt.requireAttr('dev');
  const prefixBus = DISK_PREFIX[target.slice(0, 2)];
  if (!/^[a-z]{3,5}$/.test(target) || !prefixBus) {
    throw fail('invalid_value', tgt.attrPath('dev'), `target dev '${target}' must be vdX, hdX or sdX`);
  }
  const bus = tgt.enumAttr('bus', ['virtio', 'ide', 'sata', 'scsi'] as const) ?? prefixBus;
  const expectPrefix = { virtio: 'vd', ide: 'hd', sata: 'sd', scsi: 'sd' }[bus];
  if (!target.startsWith(expectPrefix)) {
    throw fail('invalid_value', tgt.attrPath('dev'), `target dev '${target}' does not fit bus '${bus}' (use ${expectPrefix}X)`);
  }

  for (const flag of ['readonly', 'shareable']) dev.child(flag)?.expect({});
  const serialNode = dev.child('serial')?.expect({ text: true });
  const serial = serialNode?.text();
  if (serial !== undefined && !/^[A-Za-z0-9_.+ -]{1,20}$/.test(serial)) {
    throw fail('invalid_value', serialNode!.path, 'a disk serial is 1-20 characters of [A-Za-z0-9_.+ -]');
  }
  const wwnNode = dev.child('wwn')?.expect({ text: true });
  let wwn: string | undefined;
  if (wwnNode) {
    // As libvirt: 16 hex digits, 0x optional; only IDE and SCSI disks take one (not virtio, not SATA).
    const m = /^(?:0x)?([0-9a-fA-F]{16})$/.exec(wwnNode.text());
    if (!m) throw fail('invalid_value', wwnNode.path, `'${wwnNode.text()}' is not a WWN (16 hex digits, 0x optional)`);
    if (bus !== 'ide' && bus !== 'scsi') throw fail('unsupported_element', wwnNode.path, `only IDE and SCSI disks take a <wwn> (as in libvirt), not bus '${bus}'`);
    wwn = m[1]!.toLowerCase();
  }
  const disk: RawDisk = {
    element: dev.path, type, device, format, target, bus,
    readonly: device === 'cdrom' || dev.child('readonly') !== undefined,
    shareable: dev.child('shareable') !== undefined,
  };
  if (cache) disk.cache = cache;
  if (io) disk.io = io;
  if (discard) disk.discard = discard;
  if (source !== undefined) disk.source = source;
  if (serial !== undefined) disk.serial = serial;
  if (wwn !== undefined) disk.wwn = wwn;
  const bootOrder = parseBootOrder(dev);
  if (bootOrder !== undefined) disk.bootOrder = bootOrder;
  const address = parseAddress(dev, bus === 'virtio' ? ['pci'] as const : ['drive'] as const);
  if (address) disk.address = address;
  return disk;
}

const USB_MODELS = ['none', 'piix3-uhci', 'qemu-xhci', 'nec-xhci', 'ich9-ehci1', 'ich9-uhci1', 'ich9-uhci2', 'ich9-uhci3'] as const;

function parseController(dev: Node, family: MachineFamily): RawController {
  const type = dev.requireEnumAttr('type', ['usb', 'ide', 'sata', 'scsi', 'virtio-serial', 'pci'] as const);
  const usbModel = type === 'usb' ? dev.enumAttr('model', USB_MODELS) : undefined;
  const scsiModel = type === 'scsi' ? dev.enumAttr('model', ['virtio-scsi', 'lsilogic'] as const) : undefined;
  const xhci = usbModel === 'qemu-xhci' || usbModel === 'nec-xhci';
  const companion = usbModel !== undefined && usbModel.startsWith('ich9-uhci');
  // What each kind takes, as libvirt: ports only on xhci (p2/p3) and virtio-serial (max_ports).
  dev.expect({
    attrs: ['type', 'index', 'model', ...(xhci || type === 'virtio-serial' ? ['ports'] : []), ...(type === 'virtio-serial' ? ['vectors'] : [])],
    children: ['address', ...(companion ? ['master'] : []), ...(type === 'scsi' ? ['driver'] : []), ...(type === 'pci' ? ['model', 'target'] : [])],
  });
  const c: RawController = { element: dev.path, type };
  const index = dev.intAttr('index', 0, type === 'pci' ? 255 : 31);
  if (index !== undefined) c.index = index;
  switch (type) {
    case 'usb': {
      if (usbModel) c.model = usbModel;
      // qemu's xhci has at most 15 ports of each kind.
      const ports = dev.intAttr('ports', 1, 15);
      if (ports !== undefined) c.ports = ports;
      if (companion) {
        const master = dev.requireChild('master').expect({ attrs: ['startport'] });
        master.requireAttr('startport');
        const startport = master.intAttr('startport', 0, 5)!;
        // Each UHCI companion serves two of the EHCI's six ports: uhci1 0-1, uhci2 2-3, uhci3 4-5.
        const expected = 2 * (Number(usbModel!.slice(-1)) - 1);
        if (startport !== expected) throw fail('invalid_value', master.attrPath('startport'), `${usbModel} takes the EHCI's ports from ${expected} (startport='${expected}')`);
        c.master = { startport };
      }
      break;
    }
    case 'scsi': {
      if (scsiModel) c.model = scsiModel;
      const driver = dev.child('driver');
      if (driver) {
        driver.expect({ attrs: scsiModel === 'lsilogic' ? [] : ['queues'] });
        const queues = driver.intAttr('queues', 1, 1024);
        if (queues !== undefined) c.queues = queues;
      }
      break;
    }
    case 'virtio-serial': {
      // qemu's default is 31 ports (0-30); libvirt passes the attribute as max_ports.
      const ports = dev.intAttr('ports', 1, 31);
      if (ports !== undefined) c.ports = ports;
      const vectors = dev.intAttr('vectors', 0, 2048);
      if (vectors !== undefined) c.vectors = vectors;
      if (dev.attr('model') !== undefined) throw fail('unsupported_attribute', dev.attrPath('model'), `<controller type='${type}'> takes no model`);
      break;
    }
    case 'pci':
      Object.assign(c, parsePciController(dev, family));
      break;
    default:
      if (dev.attr('model') !== undefined) {
        throw fail('unsupported_attribute', dev.attrPath('model'), `<controller type='${type}'> takes no model`);
      }
  }
  const rootOrNone = (type === 'pci' && (c.model === 'pci-root' || c.model === 'pcie-root')) || (type === 'usb' && c.model === 'none');
  const address = parseAddress(dev, rootOrNone ? [] : ['pci'] as const);
  if (address) c.address = address;
  return c;
}

const PCI_MODELS: Record<MachineFamily, readonly PciModel[]> = {
  i440fx: ['pci-root', 'pci-bridge'],
  q35: ['pcie-root', 'pcie-root-port', 'pcie-to-pci-bridge', 'dmi-to-pci-bridge', 'pci-bridge'],
};
/** `<controller type='pci'>` in the forms virt-install writes (bare) and libvirt normalizes to (model name, target). */
function parsePciController(dev: Node, family: MachineFamily): Pick<RawController, 'model' | 'chassis' | 'port' | 'chassisNr'> {
  const model = dev.requireEnumAttr('model', PCI_MODELS[family]);
  const out: Pick<RawController, 'model' | 'chassis' | 'port' | 'chassisNr'> = { model };
  const name = dev.child('model')?.expect({ attrs: ['name'] }).requireAttr('name');
  if (name !== undefined && name !== PCI_DRIVERS[model]) {
    throw fail('unsupported_value', `${dev.path}/model/@name`, `a ${model} is qemu's ${PCI_DRIVERS[model] ?? 'builtin root'} here, not ${name}`);
  }
  const target = dev.child('target');
  if (target) {
    if (model === 'pcie-root-port') {
      target.expect({ attrs: ['chassis', 'port'] });
      const chassis = target.intAttr('chassis', 0, 255);
      const port = target.intAttr('port', 0, 255);
      if (chassis !== undefined) out.chassis = chassis;
      if (port !== undefined) out.port = port;
    } else if (model === 'pci-bridge') {
      target.expect({ attrs: ['chassisNr'] });
      const chassisNr = target.intAttr('chassisNr', 1, 255);
      if (chassisNr !== undefined) out.chassisNr = chassisNr;
    } else {
      target.expect({});
    }
  }
  return out;
}

function parseInterface(dev: Node, allowMissingIds: boolean): RawInterface {
  const type = dev.requireEnumAttr('type', ['user', 'bridge', 'network', 'ethernet'] as const);
  dev.expect({ attrs: ['type'], children: ['mac', 'model', 'source', 'target', 'boot', 'address'] });
  const iface: RawInterface = { element: dev.path, type, mac: '', model: 'rtl8139' };

  const macNode = dev.child('mac');
  if (macNode) {
    macNode.expect({ attrs: ['address'] });
    const mac = macNode.requireAttr('address').toLowerCase();
    if (!MAC_RE.test(mac)) throw fail('invalid_value', macNode.attrPath('address'), `'${mac}' is not a MAC address`);
    if (parseInt(mac.slice(0, 2), 16) & 1) throw fail('invalid_value', macNode.attrPath('address'), `'${mac}' is a multicast MAC address`);
    iface.mac = mac;
  } else if (!allowMissingIds) {
    throw fail('missing_element', `${dev.path}/mac`, 'the interface needs a <mac address>');
  }
  // libvirt's default NIC for x86 qemu guests; normalization writes it into the XML.
  const modelNode = dev.child('model');
  if (modelNode) iface.model = modelNode.expect({ attrs: ['type'] }).requireEnumAttr('type', ['virtio', 'e1000', 'e1000e', 'rtl8139'] as const);

  const src = dev.child('source');
  const tgt = dev.child('target');
  if (type === 'bridge') {
    const s = dev.requireChild('source').expect({ attrs: ['bridge'] });
    iface.bridge = ifname(s.requireAttr('bridge'), s.attrPath('bridge'));
  } else if (type === 'network') {
    // The host maps the network's name to one of its bridges (the agent's --network); not here.
    const s = dev.requireChild('source').expect({ attrs: ['network'] });
    const network = s.requireAttr('network');
    if (!/^[A-Za-z0-9_.+-]{1,64}$/.test(network)) throw fail('invalid_value', s.attrPath('network'), `'${network}' is not a network name`);
    iface.network = network;
  } else if (src) {
    throw fail('unsupported_element', src.path, `<source> is not supported for interface type '${type}'`);
  }
  if (type === 'ethernet') {
    const t = dev.requireChild('target').expect({ attrs: ['dev', 'managed'] });
    t.enumAttr('managed', ['no'] as const);
    iface.targetDev = ifname(t.requireAttr('dev'), t.attrPath('dev'));
  } else if ((type === 'bridge' || type === 'network') && tgt) {
    // The name of the tap the agent creates. A vnet* name is one libvirt generated (a live
    // XML's): libvirt drops it from an inactive definition, and so is it passed over here.
    const t = tgt.expect({ attrs: ['dev'] });
    const name = ifname(t.requireAttr('dev'), t.attrPath('dev'));
    if (!name.startsWith('vnet')) iface.targetDev = name;
  } else if (tgt) {
    throw fail('unsupported_element', tgt.path, `<target> is not supported for interface type '${type}'`);
  }
  const bootOrder = parseBootOrder(dev);
  if (bootOrder !== undefined) iface.bootOrder = bootOrder;
  const address = parseAddress(dev, ['pci'] as const);
  if (address) iface.address = address;
  return iface;
}

function ifname(v: string, path: string): string {
  if (!IFNAME_RE.test(v) || v === '.' || v === '..') throw fail('invalid_value', path, `'${v}' is not a valid network interface name`);
  return v;
}

/** The character-device backend shared by serial, console and channel. */
function parseCharSource(dev: Node, type: (typeof CHAR_TYPES)[number], hostPlacedSocket = false): { source: CharSource; log?: CharLog } {
  const src = dev.child('source');
  const proto = dev.child('protocol');
  if (proto && type !== 'tcp') throw fail('unsupported_element', proto.path, '<protocol> only applies to tcp');
  let source: CharSource;
  switch (type) {
    case 'pty':
      // A live domain reports its pty as <source path>; it is output, not configuration.
      src?.expect({ attrs: ['path'] });
      source = { type };
      break;
    case 'null':
      if (src) throw fail('unsupported_element', src.path, "type 'null' takes no <source>");
      source = { type };
      break;
    case 'file': {
      const s = dev.requireChild('source').expect({ attrs: ['path', 'append'] });
      source = { type, path: hostPath(s.requireAttr('path'), s.attrPath('path')) };
      const append = s.boolAttr('append', 'on', 'off');
      if (append !== undefined) source.append = append;
      break;
    }
    case 'unix': {
      // A virtio channel that listens may leave the path to the host (virt-install writes
      // <source mode='bind'/>, or no <source>): the socket goes in the guest's run directory.
      if (hostPlacedSocket && (!src || (src.attr('path') === undefined && src.attr('mode') !== 'connect'))) {
        src?.expect({ attrs: ['mode'] }).enumAttr('mode', ['bind'] as const);
        source = { type, mode: 'bind' };
        break;
      }
      const s = dev.requireChild('source').expect({ attrs: ['mode', 'path'] });
      source = { type, mode: s.requireEnumAttr('mode', ['bind', 'connect'] as const), path: hostPath(s.requireAttr('path'), s.attrPath('path')) };
      break;
    }
    case 'tcp': {
      const s = dev.requireChild('source').expect({ attrs: ['mode', 'host', 'service'] });
      const host = s.requireAttr('host');
      if (!HOST_RE.test(host)) throw fail('invalid_value', s.attrPath('host'), `'${host}' is not a host name or address`);
      s.requireAttr('service');
      const protocol = proto?.expect({ attrs: ['type'] }).requireEnumAttr('type', ['raw', 'telnet'] as const) ?? 'raw';
      source = { type, mode: s.requireEnumAttr('mode', ['bind', 'connect'] as const), host, service: s.intAttr('service', 1, 65535)!, protocol };
      break;
    }
  }
  const logNode = dev.child('log');
  if (!logNode) return { source };
  logNode.expect({ attrs: ['file', 'append'] });
  const log: CharLog = { file: hostPath(logNode.requireAttr('file'), logNode.attrPath('file')) };
  const append = logNode.boolAttr('append', 'on', 'off');
  if (append !== undefined) log.append = append;
  return { source, log };
}

const CHAR_CHILDREN = ['source', 'protocol', 'log', 'target'];
const CHAR_TYPES = ['pty', 'null', 'file', 'unix', 'tcp'] as const;

function parseSerial(dev: Node): RawSerial {
  const type = dev.requireEnumAttr('type', CHAR_TYPES);
  dev.expect({ attrs: ['type'], children: CHAR_CHILDREN });
  const serial: RawSerial = { element: dev.path, ...parseCharSource(dev, type) };
  const t = dev.child('target');
  if (t) {
    t.enumAttr('type', ['isa-serial'] as const);
    t.expect({ attrs: ['type', 'port'], children: ['model'] });
    t.child('model')?.expect({ attrs: ['name'] }).requireEnumAttr('name', ['isa-serial'] as const);
    const port = t.intAttr('port', 0, 3);
    if (port !== undefined) serial.port = port;
  }
  return serial;
}

function parseConsole(dev: Node): RawConsole {
  const type = dev.requireEnumAttr('type', CHAR_TYPES);
  dev.expect({ attrs: ['type'], children: [...CHAR_CHILDREN, 'address'] });
  const con: RawConsole = { element: dev.path, targetType: 'serial', ...parseCharSource(dev, type) };
  const t = dev.child('target');
  if (t) {
    con.targetType = t.enumAttr('type', ['serial', 'virtio'] as const) ?? 'serial';
    t.expect({ attrs: ['type', 'port'] });
    // For a virtio console the port is only libvirt's console number: the virtio-serial
    // <address> decides where it sits.
    const port = t.intAttr('port', 0, con.targetType === 'serial' ? 3 : 30);
    if (port !== undefined && con.targetType === 'serial') con.port = port;
  }
  const address = parseAddress(dev, con.targetType === 'virtio' ? ['virtio-serial'] as const : []);
  if (address) con.address = address;
  return con;
}

function parseChannel(dev: Node): RawChannel {
  const type = dev.requireEnumAttr('type', CHAR_TYPES);
  dev.expect({ attrs: ['type'], children: [...CHAR_CHILDREN, 'address'] });
  const t = dev.requireChild('target');
  t.requireEnumAttr('type', ['virtio'] as const);
  t.expect({ attrs: ['type', 'name'] });
  const name = t.requireAttr('name');
  if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(name)) throw fail('invalid_value', t.attrPath('name'), `'${name}' is not a valid channel name`);
  const ch: RawChannel = { element: dev.path, name, ...parseCharSource(dev, type, true) };
  const address = parseAddress(dev, ['virtio-serial'] as const);
  if (address) ch.address = address;
  return ch;
}

const IPV4_RE = /^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}$/;
const IPV6_RE = /^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*$/;

function parseGraphics(dev: Node): GraphicsDef {
  dev.requireEnumAttr('type', ['vnc'] as const);
  dev.expect({ attrs: ['type', 'port', 'autoport', 'listen'], children: ['listen'] });
  const portAttr = dev.attr('port');
  const port = portAttr === '-1' ? undefined : dev.intAttr('port', 5900, 65535);
  const autoport = dev.boolAttr('autoport', 'yes', 'no') ?? port === undefined;
  if (!autoport && port === undefined) throw fail('missing_attribute', dev.attrPath('port'), "autoport='no' needs a port");
  let listen = dev.attr('listen');
  let listenPath = dev.attrPath('listen');
  const l = dev.child('listen');
  if (l) {
    l.requireEnumAttr('type', ['address'] as const);
    l.expect({ attrs: ['type', 'address'] });
    const addr = l.requireAttr('address');
    if (listen !== undefined && listen !== addr) throw fail('invalid_value', l.attrPath('address'), 'the <listen> address differs from the listen attribute');
    listen = addr;
    listenPath = l.attrPath('address');
  }
  listen ??= '127.0.0.1';
  if (!IPV4_RE.test(listen) && !IPV6_RE.test(listen)) throw fail('invalid_value', listenPath, `'${listen}' is not an IP address`);
  const g: GraphicsDef = { element: dev.path, type: 'vnc', listen, autoport };
  if (!autoport) g.port = port!;
  return g;
}

function parseVideo(dev: Node): Omit<VideoDef, 'id'> {
  dev.expect({ children: ['model', 'address'] });
  const m = dev.requireChild('model');
  const model = m.requireEnumAttr('type', ['vga', 'cirrus', 'virtio', 'bochs', 'none'] as const);
  m.expect({ attrs: ['type', 'vram', 'heads', 'primary'] });
  m.enumAttr('heads', ['1'] as const);
  m.enumAttr('primary', ['yes'] as const);
  const v: Omit<VideoDef, 'id'> = { element: dev.path, model };
  const vram = m.attr('vram');
  if (model === 'cirrus') {
    // libvirt passes cirrus no size (qemu's cirrus-vga has a fixed 4 MiB): vram is only kept.
    if (vram !== undefined) v.vramKiB = m.intAttr('vram', 1, 1048576)!;
  } else if (model === 'vga' || model === 'bochs') {
    // qemu takes whole MiB as a power of two (bochs-display at least 4).
    const allowed = model === 'vga' ? [1, 2, 4, 8, 16, 32, 64, 128, 256] : [4, 8, 16, 32, 64, 128, 256];
    const kib = vram === undefined ? 16384 : m.intAttr('vram', 1024, 262144)!;
    if (!allowed.includes(kib / 1024)) {
      throw fail('invalid_value', m.attrPath('vram'), `vram for ${model} must be one of ${allowed.map((x) => x * 1024).join(', ')} KiB`);
    }
    v.vramKiB = kib;
  } else if (vram !== undefined) {
    throw fail('unsupported_attribute', m.attrPath('vram'), `vram does not apply to model '${model}'`);
  }
  const address = parseAddress(dev, model === 'none' ? [] : ['pci'] as const);
  if (address) v.address = address;
  return v;
}

function parseInput(dev: Node): Omit<InputDef, 'id'> {
  const type = dev.requireEnumAttr('type', ['tablet', 'mouse', 'keyboard'] as const);
  const bus = dev.enumAttr('bus', ['usb', 'ps2', 'virtio'] as const) ?? (type === 'tablet' ? 'usb' : 'ps2');
  dev.expect({ attrs: ['type', 'bus'], children: ['address'] });
  if (type === 'tablet' && bus === 'ps2') throw fail('unsupported_value', dev.attrPath('bus'), 'there is no ps2 tablet');
  const input: Omit<InputDef, 'id'> = { element: dev.path, type, bus };
  const address = parseAddress(dev, bus === 'usb' ? ['usb'] as const : bus === 'virtio' ? ['pci'] as const : []);
  if (address) input.address = address;
  return input;
}

function parseMemballoon(dev: Node): Omit<MemballoonDef, 'id'> {
  const model = dev.requireEnumAttr('model', ['virtio', 'none'] as const);
  dev.expect({ attrs: ['model'], children: model === 'virtio' ? ['address', 'stats'] : ['address'] });
  const b: Omit<MemballoonDef, 'id'> = { element: dev.path, model };
  const stats = dev.child('stats');
  if (stats) {
    stats.expect({ attrs: ['period'] });
    stats.requireAttr('period');
    b.statsPeriod = stats.intAttr('period', 0, 2 ** 31 - 1)!;
  }
  const address = parseAddress(dev, model === 'none' ? [] : ['pci'] as const);
  if (address) b.address = address;
  return b;
}

function parseRng(dev: Node): Omit<RngDef, 'id' | 'objectId' | 'address'> & { address?: PciAddress } {
  dev.requireEnumAttr('model', ['virtio'] as const);
  dev.expect({ attrs: ['model'], children: ['backend', 'rate', 'address'] });
  const b = dev.requireChild('backend');
  b.requireEnumAttr('model', ['random'] as const);
  b.expect({ attrs: ['model'], text: true });
  const path = b.text() || '/dev/urandom';
  if (path !== '/dev/random' && path !== '/dev/urandom') {
    throw fail('unsupported_value', b.path, 'the random backend must be /dev/random or /dev/urandom');
  }
  const rng: Omit<RngDef, 'id' | 'objectId' | 'address'> & { address?: PciAddress } = { element: dev.path, model: 'virtio', backend: path };
  const rate = dev.child('rate');
  if (rate) {
    rate.expect({ attrs: ['bytes', 'period'] });
    rate.requireAttr('bytes');
    const bytes = rate.intAttr('bytes', 1, 2 ** 31)!;
    const periodMs = rate.intAttr('period', 1, 2 ** 31);
    rng.rate = periodMs === undefined ? { bytes } : { bytes, periodMs };
  }
  const address = parseAddress(dev, ['pci'] as const);
  if (address) rng.address = address;
  return rng;
}
