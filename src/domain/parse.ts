/**
 * Strict walk of libvirt domain XML into raw device lists (what the user wrote, defaults filled),
 * then `completeDomain` adds implicit controllers, addresses and ids. Everything not understood
 * is refused with the element's path; nothing that could change the guest is ever dropped.
 */
import { FIRMWARE_FEATURES, HYPERV_FEATURES, TPM_PCR_BANKS } from './model.js';
import { qemuFeatureName, CPU_MODELS } from './cpu.js';
import { parseCpuset } from './cpuset.js';
import {
  completeDomain,
  type RawChannel,
  type RawConsole,
  type RawController,
  type RawDisk,
  type RawDomain,
  type RawInterface,
  type RawRedirdev,
  type RawSerial,
  type RawWatchdog,
} from './layout.js';
import type {
  AudioDef,
  BootDev,
  CpuTuneDef,
  NumaCell,
  PmDef,
  SysinfoDef,
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
  PanicDef,
  TpmDef,
  SoundDef,
  HypervDef,
  PciModel,
  RngDef,
  SpiceGraphicsDef,
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
    children: ['name', 'uuid', 'title', 'description', 'metadata', 'memory', 'currentMemory', 'memoryBacking', 'vcpu',
      'iothreads', 'cputune', 'sysinfo', 'cpu', 'os', 'features', 'clock', 'on_poweroff', 'on_reboot', 'on_crash', 'pm',
      'devices', 'seclabel'],
    repeated: ['seclabel'],
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

  const hugepages = part(() => parseMemoryBacking(d.child('memoryBacking')));
  const vcpu = part(() => {
    const vcpuNode = d.requireChild('vcpu').expect({ attrs: ['placement', 'current', 'cpuset'], text: true });
    // 'auto' asks numad where to run: a host service this agent does not consult.
    vcpuNode.enumAttr('placement', ['static'] as const);
    const vcpus = Number(vcpuNode.requireText());
    if (!/^[0-9]+$/.test(vcpuNode.text()) || vcpus < 1 || vcpus > MAX_VCPUS) {
      throw fail('invalid_value', vcpuNode.path, `vcpu must be an integer in 1..${MAX_VCPUS}`);
    }
    const cpuset = vcpuNode.attr('cpuset') === undefined ? undefined : cpusetAttr(vcpuNode, 'cpuset');
    return { vcpus, vcpusCurrent: vcpuNode.intAttr('current', 1, vcpus) ?? vcpus, cpuset };
  });
  const iothreads = part(() => {
    const n = d.child('iothreads')?.expect({ text: true });
    if (!n) return 0;
    if (!/^[0-9]{1,3}$/.test(n.text()) || Number(n.text()) > MAX_IOTHREADS) {
      throw fail('invalid_value', n.path, `iothreads must be an integer in 0..${MAX_IOTHREADS}`);
    }
    return Number(n.text());
  });
  const cputune = part(() => vcpu && parseCputune(d.child('cputune'), vcpu.vcpus, vcpu.cpuset));
  const sysinfo = part(() => parseSysinfo(d.child('sysinfo'), uuid));

  const osNode = part(() => d.requireChild('os'));
  const osPart = osNode && part(() => parseOs(osNode));
  const family = osPart && part(() => machineFamily(osPart.machine, `${osNode!.path}/type/@machine`));
  const cpuNode = d.child('cpu');
  const cpu = cpuNode && vcpu && part(() => parseCpu(cpuNode, vcpu.vcpus));
  if (cpu?.numa && memory) {
    part(() => {
      const total = cpu.numa!.reduce((sum, c) => sum + c.memoryKiB, 0);
      if (total !== memory.memoryKiB) {
        throw fail('invalid_value', `${cpuNode!.path}/numa`, `the NUMA cells hold ${total} KiB, but <memory> is ${memory.memoryKiB} KiB: they must be equal`);
      }
    });
  }
  const features = part(() => parseFeatures(d.child('features')));
  if (osPart?.os.loader?.secure && features && family) {
    part(() => {
      // The flash is guarded by SMM; i440fx has no SMRAM for it (libvirt refuses the same).
      if (family !== 'q35') throw fail('unsupported_value', '/domain/os/loader/@secure', 'a secure loader needs a q35 machine type');
      if (features.smm?.on === false) throw fail('invalid_value', '/domain/features/smm', 'a secure loader needs <smm state=\'on\'/>');
    });
  }
  const clock = part(() => parseClock(d.child('clock')));
  const lifecycle = part(() => parseLifecycle(d));
  const pm = part(() => parsePm(d.child('pm')));
  const smbios = osPart && sysinfo !== undefined ? part(() => {
    if (osPart.smbiosMode !== 'sysinfo') return undefined;
    if (!sysinfo.def) throw fail('missing_element', '/domain/sysinfo', "<smbios mode='sysinfo'/> needs a <sysinfo type='smbios'>");
    return sysinfo.def;
  }) : undefined;

  const devices: DeviceLists = { disks: [], controllers: [], interfaces: [], serials: [], consoles: [], channels: [], graphics: [], videos: [], inputs: [], redirdevs: [], rngs: [], watchdogs: [], audios: [], sounds: [] };
  const devicesNode = d.child('devices');
  // Devices are walked for their blockers even when the machine type is unknown (as i440fx then).
  const extras = devicesNode ? parseDevices(devicesNode, devices, family ?? 'i440fx', nodes, opts) : {};
  part(() => parseSeclabels(d.children('seclabel')));
  // Every part is there unless one failed (each failure is a blocker).
  if (blockers.any) return undefined;
  const { cpuset: _cpuset, ...vcpuCounts } = vcpu!;
  return {
    type: type!, name: name!,
    // libvirt takes a missing domain uuid from <sysinfo><system><entry name='uuid'>.
    uuid: uuid! === '' && sysinfo?.uuid ? sysinfo.uuid : uuid!,
    ...(title !== undefined ? { title } : {}),
    ...(description !== undefined ? { description } : {}),
    ...(metadata !== undefined ? { metadata } : {}),
    ...memory!, ...vcpuCounts,
    machine: osPart!.machine, machineFamily: family!, os: osPart!.os,
    ...(cpu ? { cpu } : {}),
    features: features!,
    clock: clock!,
    ...lifecycle!,
    ...(pm ? { pm } : {}),
    ...(smbios ? { smbios } : {}),
    ...(hugepages ? { hugepages } : {}),
    iothreads: iothreads!,
    ...(cputune ? { cputune } : {}),
    ...devices,
    ...extras,
  };
}

const MAX_IOTHREADS = 64;

/** A cpuset attribute (host CPUs), in libvirt's syntax. */
function cpusetAttr(n: Node, name: string): number[] {
  const v = n.requireAttr(name);
  const cpus = parseCpuset(v);
  if (!cpus) throw fail('invalid_value', n.attrPath(name), `'${v}' is not a CPU list such as '0-3,^2,8' naming at least one CPU`);
  return cpus;
}

/**
 * Pinning is applied by the agent to qemu's threads after it starts (no argv), as libvirt does:
 * each vCPU thread to its vcpupin (else the <vcpu cpuset>), every other thread to the
 * emulatorpin (else the <vcpu cpuset>). Whether the host has those CPUs is checked at start.
 */
function parseCputune(n: Node | undefined, vcpus: number, cpuset: number[] | undefined): CpuTuneDef | undefined {
  if (!n && !cpuset) return undefined;
  const tune: CpuTuneDef = { vcpupin: [] };
  if (cpuset) tune.cpuset = cpuset;
  if (!n) return tune;
  // shares, period, quota ... are cgroup CPU bandwidth, iothreadpin/vcpusched more host policy:
  // none is applied here, so none is accepted.
  n.expect({ children: ['vcpupin', 'emulatorpin'], repeated: ['vcpupin'] });
  const seen = new Map<number, string>();
  for (const p of n.children('vcpupin')) {
    p.expect({ attrs: ['vcpu', 'cpuset'] });
    const v = p.requireIntAttr('vcpu', 0, vcpus - 1);
    if (seen.has(v)) throw fail('invalid_value', p.attrPath('vcpu'), `vCPU ${v} is already pinned by ${seen.get(v)}`);
    seen.set(v, p.path);
    tune.vcpupin.push({ vcpu: v, cpus: cpusetAttr(p, 'cpuset') });
  }
  const e = n.child('emulatorpin');
  if (e) {
    e.expect({ attrs: ['cpuset'] });
    tune.emulatorpin = cpusetAttr(e, 'cpuset');
  }
  return tune;
}

/** `<hugepages/>` only: the host's default page size, from its hugetlbfs mount (checked at start). */
function parseMemoryBacking(n: Node | undefined): boolean | undefined {
  if (!n) return undefined;
  n.expect({ children: ['hugepages'] });
  const h = n.child('hugepages');
  if (!h) return undefined;
  // <page size nodeset> picks a page size per NUMA node: not supported, the default size is used.
  h.expect({});
  return true;
}

/**
 * `type='none'` only. SELinux, AppArmor and DAC labels are libvirt's confinement of qemu: this
 * agent confines each qemu by running it as a user id of its own (--qemu-user), and applies no
 * label; accepting one would pretend it does.
 */
function parseSeclabels(list: Node[]): void {
  for (const n of list) {
    const type = n.requireAttr('type');
    if (type !== 'none') {
      throw fail('unsupported_value', n.attrPath('type'), `seclabel type='${type}' is not applied: this agent labels nothing and runs each qemu as a user id of its own instead (--qemu-user); use <seclabel type='none'/> or remove it`);
    }
    n.expect({ attrs: ['type', 'model', 'relabel'] });
    n.enumAttr('model', ['none', 'selinux', 'apparmor', 'dac'] as const);
    n.enumAttr('relabel', ['no'] as const);
  }
}

function parsePm(n: Node | undefined): PmDef | undefined {
  if (!n) return undefined;
  n.expect({ children: ['suspend-to-mem', 'suspend-to-disk'] });
  const pm: PmDef = {};
  for (const [el, key] of [['suspend-to-mem', 's3'], ['suspend-to-disk', 's4']] as const) {
    const c = n.child(el);
    if (!c) continue;
    c.expect({ attrs: ['enabled'] });
    c.requireAttr('enabled');
    pm[key] = c.boolAttr('enabled', 'yes', 'no')!;
  }
  return pm;
}

/** The qemu key of each sysinfo entry, in the order libvirt writes them on -smbios. */
const SMBIOS_TABLES = {
  bios: { type: 0, keys: ['vendor', 'version', 'date', 'release'] },
  system: { type: 1, keys: ['manufacturer', 'product', 'version', 'serial', 'uuid', 'sku', 'family'] },
  baseBoard: { type: 2, keys: ['manufacturer', 'product', 'version', 'serial', 'asset', 'location'] },
  chassis: { type: 3, keys: ['manufacturer', 'version', 'serial', 'asset', 'sku'] },
} as const;

/** `<sysinfo type='smbios'>`: the tables (used when <os><smbios mode='sysinfo'/>) and the system uuid. */
function parseSysinfo(n: Node | undefined, domainUuid: string | undefined): { def?: SysinfoDef; uuid?: string } {
  if (!n) return {};
  // fwcfg entries are files or strings handed to the firmware: not supported.
  n.requireEnumAttr('type', ['smbios'] as const);
  // processor (type 4) and memory (type 17) are passed by libvirt only in mode='host'.
  n.expect({ attrs: ['type'], children: ['bios', 'system', 'baseBoard', 'chassis', 'oemStrings'] });
  const def: SysinfoDef = {};
  let uuid: string | undefined;
  for (const table of ['bios', 'system', 'baseBoard', 'chassis'] as const) {
    const t = n.child(table);
    if (!t) continue;
    t.expect({ children: ['entry'], repeated: ['entry'] });
    const values = new Map<string, string>();
    for (const e of t.children('entry')) {
      e.expect({ attrs: ['name'], text: true });
      const key = e.requireEnumAttr('name', SMBIOS_TABLES[table].keys as readonly string[]);
      if (values.has(key)) throw fail('invalid_value', e.attrPath('name'), `entry '${key}' is listed twice`);
      const value = e.requireText();
      if (/[\u0000-\u001f\u007f]/.test(value)) throw fail('invalid_value', e.path, 'an SMBIOS string must not contain control characters');
      if (table === 'bios' && key === 'date' && !/^(0[1-9]|1[0-2])\/(0[1-9]|[12][0-9]|3[01])\/([0-9]{2}|[0-9]{4})$/.test(value)) {
        throw fail('invalid_value', e.path, `BIOS date '${value}' must be mm/dd/yy or mm/dd/yyyy`);
      }
      if (table === 'bios' && key === 'release' && !/^[0-9]{1,3}\.[0-9]{1,3}$/.test(value)) {
        throw fail('invalid_value', e.path, `BIOS release '${value}' must be major.minor`);
      }
      if (table === 'system' && key === 'uuid') {
        const u = canonicalUuid(value);
        if (!u) throw fail('invalid_value', e.path, `'${value}' is not a valid UUID`);
        // The guest reads the type 1 UUID as its machine's: it is the domain's, or the guest
        // would see another identity than the one every API names.
        if (domainUuid && u !== domainUuid) {
          throw fail('invalid_value', e.path, `the SMBIOS system uuid ${u} differs from the domain uuid ${domainUuid}`);
        }
        uuid = u;
      }
      values.set(key, value);
    }
    if (values.size === 0) continue;
    def[table] = SMBIOS_TABLES[table].keys.flatMap((k): [string, string][] => (values.has(k) ? [[k, values.get(k)!]] : []));
  }
  const oem = n.child('oemStrings');
  if (oem) {
    oem.expect({ children: ['entry'], repeated: ['entry'] });
    const strings = oem.children('entry').map((e) => {
      e.expect({ text: true });
      const value = e.requireText();
      if (/[\u0000-\u001f\u007f]/.test(value)) throw fail('invalid_value', e.path, 'an SMBIOS string must not contain control characters');
      return value;
    });
    if (strings.length > 0) def.oemStrings = strings;
  }
  return { def, ...(uuid ? { uuid } : {}) };
}

function parseOs(n: Node): { os: OsDef; machine: string; smbiosMode?: 'sysinfo' | 'emulate' } {
  n.expect({ attrs: ['firmware'], children: ['type', 'firmware', 'loader', 'nvram', 'boot', 'bootmenu', 'kernel', 'initrd', 'cmdline', 'smbios'], repeated: ['boot'] });
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
  parseFirmware(n, os);
  if (!os.kernel && (os.initrd !== undefined || os.cmdline !== undefined)) {
    throw fail('missing_element', `${n.path}/kernel`, 'initrd and cmdline need a <kernel>');
  }
  const smbios = n.child('smbios');
  if (!smbios) return { os, machine };
  smbios.expect({ attrs: ['mode'] });
  const mode = smbios.requireAttr('mode');
  if (mode === 'host') {
    // libvirt copies this host's own SMBIOS tables into the guest: a migration destination
    // (another machine) would give it different ones, so the guest's identity would change.
    throw fail('unsupported_value', smbios.attrPath('mode'), "smbios mode='host' copies the host's own tables, which differ on every host the guest migrates to; put the values in <sysinfo> with mode='sysinfo'");
  }
  return { os, machine, smbiosMode: smbios.requireEnumAttr('mode', ['sysinfo', 'emulate'] as const) };
}

/**
 * `<os firmware>`, `<firmware>`, `<loader>`, `<nvram>`. A pflash loader that is read-only has a
 * variable store (libvirt makes one when no `<nvram>` is given); which firmware `firmware='efi'`
 * means is chosen from the host's descriptors at define (normalize), not here.
 */
function parseFirmware(n: Node, os: OsDef): void {
  const firmware = n.enumAttr('firmware', ['efi', 'bios'] as const);
  if (firmware) os.firmware = firmware;
  const featuresNode = n.child('firmware');
  if (featuresNode) {
    featuresNode.expect({ children: ['feature'], repeated: ['feature'] });
    if (firmware !== 'efi') throw fail('invalid_value', featuresNode.path, "<firmware> features choose a firmware for <os firmware='efi'>");
    const features: NonNullable<OsDef['firmwareFeatures']> = {};
    for (const f of featuresNode.children('feature')) {
      f.expect({ attrs: ['enabled', 'name'] });
      const name = f.requireEnumAttr('name', FIRMWARE_FEATURES);
      if (features[name] !== undefined) throw fail('invalid_value', f.attrPath('name'), `firmware feature '${name}' is listed twice`);
      features[name] = f.requireEnumAttr('enabled', ['yes', 'no'] as const) === 'yes';
    }
    if (features['enrolled-keys'] === true && features['secure-boot'] === false) {
      throw fail('invalid_value', featuresNode.path, 'enrolled keys without secure boot: no firmware is both');
    }
    os.firmwareFeatures = features;
  }
  const loaderNode = n.child('loader');
  if (loaderNode) {
    // stateless: no variable store at all; format qcow2: a store qemu would write through a format layer. Neither is offered.
    loaderNode.expect({ attrs: ['readonly', 'secure', 'type', 'format'], text: true });
    loaderNode.enumAttr('format', ['raw'] as const);
    const type = loaderNode.enumAttr('type', ['pflash', 'rom'] as const) ?? (firmware === 'efi' ? 'pflash' : 'rom');
    const secure = loaderNode.boolAttr('secure', 'yes', 'no') ?? false;
    const readonly = loaderNode.boolAttr('readonly', 'yes', 'no') ?? (type === 'rom' || firmware === 'efi');
    if (type === 'rom' && !readonly) throw fail('invalid_value', loaderNode.attrPath('readonly'), 'a rom loader is read-only');
    if (secure && type !== 'pflash') throw fail('invalid_value', loaderNode.attrPath('secure'), 'secure applies to a pflash loader');
    const text = loaderNode.text().trim();
    os.loader = { type, readonly, secure, ...(text !== '' ? { path: hostPath(text, loaderNode.path) } : {}) };
    if (text === '' && firmware !== 'efi') throw fail('missing_element', loaderNode.path, "a <loader> needs its path, unless <os firmware='efi'> lets the host choose it");
  } else if (firmware === 'efi') {
    os.loader = { type: 'pflash', readonly: true, secure: false };
  }
  const nvramNode = n.child('nvram');
  const hasStore = os.loader?.type === 'pflash' && os.loader.readonly;
  if (nvramNode) {
    // type='file'/'block'/'network' with a <source>: libvirt 9.2's variant; the path form is what dumpxml writes.
    nvramNode.expect({ attrs: ['template', 'format', 'templateFormat'], text: true });
    nvramNode.enumAttr('format', ['raw'] as const);
    nvramNode.enumAttr('templateFormat', ['raw'] as const);
    if (!hasStore) throw fail('invalid_value', nvramNode.path, 'an <nvram> belongs to a read-only pflash <loader> (the UEFI code; the store holds its variables)');
    const text = nvramNode.text().trim();
    const template = nvramNode.attr('template');
    os.nvram = {
      ...(text !== '' ? { path: hostPath(text, nvramNode.path) } : {}),
      ...(template !== undefined ? { template: hostPath(template, nvramNode.attrPath('template')) } : {}),
    };
  } else if (hasStore) {
    os.nvram = {};
  }
}

function parseCpu(n: Node, vcpus: number): CpuDef {
  n.expect({ attrs: ['mode', 'match', 'check', 'migratable'], children: ['model', 'vendor', 'topology', 'feature', 'numa'], repeated: ['feature'] });
  const mode = n.enumAttr('mode', ['custom', 'host-model', 'host-passthrough', 'maximum'] as const) ?? 'custom';
  const cpu: CpuDef = { mode, features: [] };
  // Nova writes it with a named model: the host's CPU vendor must match (checked at start, with KVM).
  const vendorNode = n.child('vendor')?.expect({ text: true });
  if (vendorNode) {
    if (mode !== 'custom') throw fail('unsupported_element', vendorNode.path, `<vendor> applies to mode='custom', not '${mode}'`);
    const vendor = vendorNode.text();
    if (vendor !== 'Intel' && vendor !== 'AMD') throw fail('unsupported_value', vendorNode.path, `vendor '${vendor}' is not supported (Intel, AMD)`);
    cpu.vendor = vendor;
  }
  const modelNode = n.child('model');
  // check: what libvirt verifies after start; 'full' on a named model is qemu's enforce.
  const check = n.enumAttr('check', ['none', 'partial', 'full'] as const);
  if (check) cpu.check = check;
  if (mode === 'custom') {
    // 'minimum' would let the host add features: the guest CPU would differ between hosts.
    const match = n.enumAttr('match', ['exact', 'strict'] as const);
    if (match) cpu.match = match;
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
    if (n.attr('match') !== undefined) throw fail('unsupported_attribute', n.attrPath('match'), "match only applies to mode='custom'");
    if (modelNode) throw fail('unsupported_element', modelNode.path, `<model> only applies to mode='custom'`);
  }
  const migratable = n.boolAttr('migratable', 'on', 'off');
  if (cpu.mode === 'host-passthrough' || cpu.mode === 'maximum') {
    // libvirt's default for both (dumpxml shows migratable='on'): no host-only features.
    cpu.migratable = migratable ?? true;
  } else if (migratable !== undefined) {
    throw fail('unsupported_attribute', n.attrPath('migratable'), "migratable only applies to mode='host-passthrough' and 'maximum'");
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
    topo.expect({ attrs: ['sockets', 'dies', 'clusters', 'cores', 'threads'] });
    for (const a of ['sockets', 'cores', 'threads']) topo.requireAttr(a);
    const t = {
      sockets: topo.intAttr('sockets', 1, MAX_VCPUS)!,
      dies: topo.intAttr('dies', 1, MAX_VCPUS) ?? 1,
      cores: topo.intAttr('cores', 1, MAX_VCPUS)!,
      threads: topo.intAttr('threads', 1, MAX_VCPUS)!,
    };
    // qemu 7.2 has clusters only on ARM ("clusters not supported by this machine's CPU
    // topology" on x86); one cluster per die is what every x86 guest has, so 1 needs nothing.
    const clusters = topo.intAttr('clusters', 1, MAX_VCPUS);
    if (clusters !== undefined && clusters > 1) {
      throw fail('unsupported_value', topo.attrPath('clusters'), 'qemu 7.2 has no CPU clusters on x86: clusters must be 1');
    }
    if (t.sockets * t.dies * t.cores * t.threads !== vcpus) {
      throw fail('invalid_value', topo.path, `sockets*dies*cores*threads must equal the vcpu count ${vcpus}`);
    }
    cpu.topology = t;
  }
  const numa = n.child('numa');
  if (numa) cpu.numa = parseNuma(numa, vcpus);
  return cpu;
}

/** `<numa><cell>`: one memory-backend-ram and one -numa node per cell; the cells hold every vCPU once. */
function parseNuma(n: Node, vcpus: number): NumaCell[] {
  n.expect({ children: ['cell'], repeated: ['cell'] });
  const cells: NumaCell[] = [];
  const owner = new Map<number, string>();
  for (const [i, c] of n.children('cell').entries()) {
    c.expect({ attrs: ['id', 'cpus', 'memory', 'unit', 'memAccess', 'discard'] });
    // memAccess makes libvirt back the cell with a file under its memory_backing_dir (shared
    // for vhost-user/virtiofs), discard adds discard-data to such a file: neither is done here.
    if (c.attr('memAccess') !== undefined) {
      throw fail('unsupported_attribute', c.attrPath('memAccess'), 'memAccess needs a file-backed guest memory (for vhost-user or virtiofs), which this agent does not provide');
    }
    if (c.attr('discard') !== undefined) {
      throw fail('unsupported_attribute', c.attrPath('discard'), 'discard applies to file-backed guest memory, which this agent does not provide for NUMA cells');
    }
    const id = c.intAttr('id', 0, 255) ?? i;
    if (id !== i) throw fail('invalid_value', c.attrPath('id'), `NUMA cell ids must be 0, 1, ... in order (expected ${i})`);
    const cpus = parseCpuset(c.requireAttr('cpus'), vcpus - 1);
    if (!cpus) throw fail('invalid_value', c.attrPath('cpus'), `cpus must list vCPUs in 0..${vcpus - 1}`);
    for (const v of cpus) {
      if (owner.has(v)) throw fail('invalid_value', c.attrPath('cpus'), `vCPU ${v} is already in ${owner.get(v)}`);
      owner.set(v, c.path);
    }
    c.requireAttr('memory');
    let kib: bigint;
    try {
      kib = bytesToKiBCeil(scaledToBytes(c.attr('memory')!, c.attr('unit')));
    } catch (e) {
      if (e instanceof RangeError) throw fail('invalid_value', c.attrPath('memory'), e.message);
      throw e;
    }
    if (kib === 0n || kib % 1024n !== 0n || kib > BigInt(MAX_MEMORY_KIB)) {
      throw fail('invalid_value', c.attrPath('memory'), 'a NUMA cell holds a whole number of MiB (at least one)');
    }
    cells.push({ id, cpus, memoryKiB: Number(kib) });
  }
  if (cells.length === 0) throw fail('missing_element', `${n.path}/cell`, '<numa> needs at least one <cell>');
  const missing = Array.from({ length: vcpus }, (_, k) => k).filter((v) => !owner.has(v));
  if (missing.length > 0) throw fail('invalid_value', n.path, `vCPUs ${missing.join(',')} are in no NUMA cell`);
  return cells;
}

function parseFeatures(n: Node | undefined): FeaturesDef {
  const f: FeaturesDef = { acpi: false, apic: false, pae: false };
  if (!n) return f;
  n.expect({ children: ['acpi', 'apic', 'pae', 'vmport', 'smm', 'hyperv'] });
  for (const key of ['acpi', 'apic', 'pae'] as const) {
    const c = n.child(key);
    if (c) {
      c.expect({});
      f[key] = true;
    }
  }
  const vmport = n.child('vmport');
  if (vmport) f.vmport = vmport.expect({ attrs: ['state'] }).requireEnumAttr('state', ['on', 'off'] as const) === 'on';
  const smm = n.child('smm');
  if (smm) {
    smm.expect({ attrs: ['state'], children: ['tseg'] });
    const on = (smm.enumAttr('state', ['on', 'off'] as const) ?? 'on') === 'on';
    const tseg = smm.child('tseg');
    if (tseg && !on) throw fail('invalid_value', tseg.path, 'a TSEG size needs SMM on');
    // libvirt's unit for it is MiB; qemu takes whole MiB (mch.extended-tseg-mbytes).
    let tsegMiB: number | undefined;
    if (tseg) {
      tseg.expect({ attrs: ['unit'], text: true });
      let bytes: bigint;
      try {
        bytes = scaledToBytes(tseg.requireText(), tseg.attr('unit') ?? 'MiB');
      } catch (e) {
        if (e instanceof RangeError) throw fail('invalid_value', tseg.path, e.message);
        throw e;
      }
      if (bytes % (1n << 20n) !== 0n || bytes >> 20n > 0xfffen) throw fail('invalid_value', tseg.path, 'the TSEG size must be whole MiB, below 65535 MiB');
      tsegMiB = Number(bytes >> 20n);
    }
    f.smm = { on, ...(tsegMiB !== undefined ? { tsegMiB } : {}) };
  }
  const hyperv = n.child('hyperv');
  if (hyperv) f.hyperv = parseHyperv(hyperv);
  return f;
}

/**
 * `<hyperv>` as virt-manager writes it for Windows. mode='passthrough' is refused: it gives the
 * guest whatever this host's KVM offers, which another host may not (a migration would change it).
 */
function parseHyperv(n: Node): HypervDef {
  n.expect({ attrs: ['mode'], children: [...HYPERV_FEATURES] });
  n.enumAttr('mode', ['custom'] as const);
  const def: HypervDef = { features: {} };
  for (const name of HYPERV_FEATURES) {
    const c = n.child(name);
    if (!c) continue;
    const attrs = name === 'spinlocks' ? ['state', 'retries'] : name === 'vendor_id' ? ['state', 'value'] : ['state'];
    c.expect({ attrs, children: name === 'stimer' ? ['direct'] : [] });
    const on = c.requireEnumAttr('state', ['on', 'off'] as const) === 'on';
    def.features[name] = on;
    if (name === 'spinlocks' && on) def.spinlockRetries = c.requireIntAttr('retries', 4095, 0xffffffff);
    if (name === 'vendor_id' && on) {
      const v = c.requireAttr('value');
      if (!/^[A-Za-z0-9 _.-]{1,12}$/.test(v)) throw fail('invalid_value', c.attrPath('value'), `vendor_id '${v}' must be 1-12 characters of [A-Za-z0-9 _.-]`);
      def.vendorId = v;
    }
    const direct = name === 'stimer' ? c.child('direct') : undefined;
    if (direct) def.stimerDirect = direct.expect({ attrs: ['state'] }).requireEnumAttr('state', ['on', 'off'] as const) === 'on';
  }
  return def;
}

function parseClock(n: Node | undefined): ClockDef {
  if (!n) return { offset: 'utc' };
  n.expect({ attrs: ['offset'], children: ['timer'], repeated: ['timer'] });
  const clock: ClockDef = { offset: n.enumAttr('offset', ['utc', 'localtime'] as const) ?? 'utc' };
  const seen = new Set<string>();
  for (const t of n.children('timer')) {
    // platform and armvtimer do not exist on x86 qemu.
    const name = t.requireEnumAttr('name', ['rtc', 'pit', 'hpet', 'kvmclock', 'hypervclock', 'tsc'] as const);
    if (seen.has(name)) throw fail('invalid_value', t.attrPath('name'), `timer '${name}' is listed twice`);
    seen.add(name);
    // <catchup threshold slew limit> has no qemu counterpart: catch-up is driftfix=slew's own pace.
    const children = t.child('catchup');
    if (children) throw fail('unsupported_element', children.path, 'qemu has no catch-up threshold, slew or limit: remove <catchup> (tickpolicy=catchup alone is honoured)');
    switch (name) {
      case 'hpet': {
        t.expect({ attrs: ['name', 'present'] });
        const present = t.boolAttr('present', 'yes', 'no');
        if (present !== undefined) clock.hpet = present;
        break;
      }
      case 'kvmclock':
      case 'hypervclock': {
        t.expect({ attrs: ['name', 'present'] });
        const present = t.boolAttr('present', 'yes', 'no');
        if (present !== undefined) clock[name] = present;
        break;
      }
      case 'tsc': {
        // mode (native, emulate, paravirt, smpsafe) has no qemu setting; qemu always runs the TSC natively.
        t.expect({ attrs: ['name', 'frequency'] });
        const f = t.intAttr('frequency', 1, 1e12);
        if (f !== undefined) clock.tscFrequency = f;
        break;
      }
      case 'rtc': {
        t.expect({ attrs: ['name', 'tickpolicy', 'present', 'track'] });
        // Removing the RTC is not supported.
        t.enumAttr('present', ['yes'] as const);
        const p = t.enumAttr('tickpolicy', ['catchup', 'delay'] as const);
        if (p) clock.rtcTickPolicy = p;
        // track='boot' (time since the guest booted) has no qemu clock.
        const track = t.enumAttr('track', ['guest', 'wall', 'realtime'] as const);
        if (track) clock.rtcTrack = track;
        break;
      }
      case 'pit': {
        t.expect({ attrs: ['name', 'tickpolicy', 'present'] });
        t.enumAttr('present', ['yes'] as const);
        // KVM's in-kernel PIT knows delay and discard only (libvirt refuses catchup and merge too).
        const p = t.enumAttr('tickpolicy', ['delay', 'discard'] as const);
        clock.pit = true;
        if (p) clock.pitTickPolicy = p;
        break;
      }
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
  const poweroff = d.child('on_poweroff');
  if (poweroff?.text() === 'restart') {
    // libvirt turns the guest's poweroff into a reset of the same qemu; here a poweroff ends it.
    throw fail('unsupported_value', poweroff.path, "on_poweroff 'restart' is not done: a guest that powers off is stopped here (supported: destroy, preserve)");
  }
  const onPoweroff = action('on_poweroff', ['destroy', 'preserve'] as const, 'destroy');
  const onReboot = action('on_reboot', ['restart', 'destroy'] as const, 'restart');
  const crash = d.child('on_crash');
  if (crash && /^coredump-/.test(crash.text())) {
    // libvirt writes the guest's memory to its auto_dump_path: a file of guest RAM size with
    // the guest's secrets in it. This agent writes no guest memory to the host's disk.
    throw fail('unsupported_value', crash.path, `on_crash '${crash.text()}' would dump the guest's memory to the host's disk, which this agent never does (supported: destroy, preserve, restart)`);
  }
  const onCrash = action('on_crash', ['destroy', 'preserve', 'restart'] as const, 'destroy');
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
  'video', 'input', 'redirdev', 'memballoon', 'rng', 'watchdog', 'audio', 'panic', 'sound', 'tpm'];

type DeviceLists = Pick<RawDomain, 'disks' | 'controllers' | 'interfaces' | 'serials' | 'consoles' | 'channels' | 'graphics' | 'videos' | 'inputs' | 'redirdevs' | 'rngs' | 'watchdogs' | 'audios' | 'sounds'>;

/** Each device on its own (see parseDomain); the devices that occur once are answered apart. */
function parseDevices(n: Node, raw: DeviceLists, family: MachineFamily, nodes: Map<string, XElement>, opts: ParseOptions): Pick<RawDomain, 'emulator' | 'memballoon' | 'panic' | 'tpm'> {
  // Unknown device kinds are refused in the loop, so the blockers keep document order.
  const present = [...new Set(n.elements().map((dev) => dev.name))];
  n.expect({ children: present, indexAll: { except: ['emulator'] } });
  const once: Pick<RawDomain, 'emulator' | 'memballoon' | 'panic' | 'tpm'> = {};
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
        case 'video': raw.videos.push(parseVideo(dev, raw.videos.length)); break;
        case 'input': raw.inputs.push(parseInput(dev)); break;
        case 'redirdev': raw.redirdevs.push(parseRedirdev(dev)); break;
        case 'memballoon': {
          if (once.memballoon) throw fail('duplicate_element', dev.path, 'only one <memballoon> is allowed');
          once.memballoon = parseMemballoon(dev);
          break;
        }
        case 'rng': raw.rngs.push(parseRng(dev)); break;
        case 'panic': {
          if (once.panic) throw fail('duplicate_element', dev.path, 'only one <panic> is supported');
          once.panic = parsePanic(dev);
          break;
        }
        case 'watchdog': {
          const w = parseWatchdog(dev, family);
          const first = raw.watchdogs[0];
          // qemu has one watchdog action for all of them (as libvirt requires too).
          if (first && first.action !== w.action) {
            throw fail('unsupported_value', dev.attrPath('action'), `every watchdog must have the same action ('${first.action}' at ${first.element})`);
          }
          const same = raw.watchdogs.find((x) => x.model === w.model && w.model !== 'i6300esb');
          if (same) throw fail('duplicate_element', dev.path, `there is only one ${w.model} watchdog (${same.element})`);
          raw.watchdogs.push(w);
          break;
        }
        case 'sound': raw.sounds.push(parseSound(dev, raw.sounds.length)); break;
        case 'tpm': {
          if (once.tpm) throw fail('duplicate_element', dev.path, `only one <tpm> is supported (${once.tpm.element})`);
          once.tpm = parseTpm(dev);
          break;
        }
        case 'audio': {
          const a = parseAudio(dev, raw.audios.length + 1);
          const same = raw.audios.find((x) => x.id === a.id);
          if (same) throw fail('invalid_value', dev.attrPath('id'), `audio id ${a.id} is already used by ${same.element}`);
          raw.audios.push(a);
          break;
        }
      }
    });
  }
  if (raw.graphics.length > 1) n.blockers!.add(fail('duplicate_element', `${n.path}/graphics[2]`, 'only one <graphics> is supported'));
  if (raw.videos[0]?.model === 'none' && raw.videos.length > 1) {
    n.blockers!.add(fail('invalid_value', `${raw.videos[0].element}/model/@type`, "a video of type 'none' must be the only <video> (as in libvirt)"));
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
      addr = {
        type: 'pci',
        domain: a.intAttr('domain', 0, 0) ?? 0,
        bus: a.intAttr('bus', 0, 255) ?? 0,
        slot: a.requireIntAttr('slot', 0, 31),
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
      addr = { type: 'usb', bus: a.intAttr('bus', 0, 0) ?? 0, port: a.requireIntAttr('port', 1, 15) };
      break;
    case 'virtio-serial':
      a.expect({ attrs: ['type', 'controller', 'bus', 'port'] });
      addr = {
        type: 'virtio-serial',
        controller: a.intAttr('controller', 0, 31) ?? 0,
        bus: a.intAttr('bus', 0, 0) ?? 0,
        port: a.requireIntAttr('port', 0, 30),
      };
      break;
  }
  return addr as AddressOf<K>;
}

function parseBootOrder(dev: Node): number | undefined {
  const b = dev.child('boot');
  if (!b) return undefined;
  b.expect({ attrs: ['order'] });
  return b.requireIntAttr('order', 1, 999);
}

const DISK_PREFIX: Record<string, DiskBus> = { vd: 'virtio', hd: 'ide', sd: 'scsi' };

function parseDisk(dev: Node): RawDisk {
  // The discriminating attributes first: what else is allowed depends on them.
  const type = dev.requireEnumAttr('type', ['file', 'block'] as const);
  const device = dev.enumAttr('device', ['disk', 'cdrom'] as const) ?? 'disk';
  dev.expect({ attrs: ['type', 'device'], children: ['driver', 'source', 'target', 'readonly', 'shareable', 'serial', 'wwn', 'boot', 'address'] });

  const driver = dev.child('driver');
  driver?.expect({ attrs: ['name', 'type', 'cache', 'io', 'discard', 'iothread'] });
  driver?.enumAttr('name', ['qemu'] as const);
  const format = driver?.enumAttr('type', ['raw', 'qcow2'] as const) ?? 'raw';
  const cache = driver?.enumAttr('cache', ['none', 'writethrough', 'writeback', 'directsync', 'unsafe'] as const);
  const io = driver?.enumAttr('io', ['threads', 'native'] as const);
  const discard = driver?.enumAttr('discard', ['ignore', 'unmap'] as const);
  const iothread = driver?.intAttr('iothread', 1, MAX_IOTHREADS);
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
  // libvirt's character set and no length of its own (Nova writes a volume's 36-character UUID);
  // qemu passes it as given, and the guest sees what its bus holds (20 bytes on virtio and IDE).
  if (serial !== undefined && !/^[A-Za-z0-9_.+ -]{1,255}$/.test(serial)) {
    throw fail('invalid_value', serialNode!.path, 'a disk serial is 1-255 characters of [A-Za-z0-9_.+ -]');
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
  if (iothread !== undefined) {
    if (bus !== 'virtio') throw fail('unsupported_attribute', driver!.attrPath('iothread'), 'only a virtio disk runs in an iothread');
    disk.iothread = iothread;
  }
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
        const startport = master.requireIntAttr('startport', 0, 5);
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
        driver.expect({ attrs: scsiModel === 'lsilogic' ? [] : ['queues', 'iothread'] });
        const queues = driver.intAttr('queues', 1, 1024);
        if (queues !== undefined) c.queues = queues;
        const iothread = driver.intAttr('iothread', 1, MAX_IOTHREADS);
        if (iothread !== undefined) c.iothread = iothread;
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
  i440fx: ['pci-root', 'pci-bridge', 'pci-expander-bus'],
  q35: ['pcie-root', 'pcie-root-port', 'pcie-to-pci-bridge', 'dmi-to-pci-bridge', 'pci-bridge', 'pcie-switch-upstream-port', 'pcie-switch-downstream-port', 'pcie-expander-bus'],
};
/** `<controller type='pci'>` in the forms virt-install writes (bare) and libvirt normalizes to (model name, target). */
function parsePciController(dev: Node, family: MachineFamily): Pick<RawController, 'model' | 'chassis' | 'port' | 'chassisNr' | 'busNr'> {
  const model = dev.requireEnumAttr('model', PCI_MODELS[family]);
  const out: Pick<RawController, 'model' | 'chassis' | 'port' | 'chassisNr' | 'busNr'> = { model };
  const name = dev.child('model')?.expect({ attrs: ['name'] }).requireAttr('name');
  if (name !== undefined && name !== PCI_DRIVERS[model]) {
    throw fail('unsupported_value', `${dev.path}/model/@name`, `a ${model} is qemu's ${PCI_DRIVERS[model] ?? 'builtin root'} here, not ${name}`);
  }
  const target = dev.child('target');
  if (target) {
    if (model === 'pcie-root-port' || model === 'pcie-switch-downstream-port') {
      target.expect({ attrs: ['chassis', 'port'] });
      const chassis = target.intAttr('chassis', 0, 255);
      const port = target.intAttr('port', 0, 255);
      if (chassis !== undefined) out.chassis = chassis;
      if (port !== undefined) out.port = port;
    } else if (model === 'pci-bridge') {
      target.expect({ attrs: ['chassisNr'] });
      const chassisNr = target.intAttr('chassisNr', 1, 255);
      if (chassisNr !== undefined) out.chassisNr = chassisNr;
    } else if (model === 'pci-expander-bus' || model === 'pcie-expander-bus') {
      // <node> (the NUMA node of the bus) is not taken: the guest's NUMA cells are the CPU's.
      target.expect({ attrs: ['busNr'] });
      const busNr = target.intAttr('busNr', 3, 254);
      if (busNr !== undefined) out.busNr = busNr;
    } else {
      target.expect({});
    }
  }
  return out;
}

/**
 * `<panic model='isa'>`: qemu's pvpanic ISA device (ACPI QEMU0001), through which a guest says
 * it panicked, so that on_crash applies; libvirt passes its port only when the XML gives one.
 */
function parsePanic(dev: Node): PanicDef {
  dev.expect({ attrs: ['model'], children: ['address'] });
  dev.requireEnumAttr('model', ['isa'] as const);
  const a = dev.child('address');
  if (!a) return { element: dev.path };
  a.expect({ attrs: ['type', 'iobase'] });
  a.requireEnumAttr('type', ['isa'] as const);
  const ioport = a.intAttr('iobase', 0x100, 0xffff);
  return { element: dev.path, ...(ioport !== undefined ? { ioport } : {}) };
}

/**
 * `<tpm>` emulated by swtpm, with libvirt's defaults for x86: model tpm-tis; version 2.0, but
 * 1.2 for a tpm-tis (its historical default); CRB is a TPM 2.0 interface only.
 */
function parseTpm(dev: Node): TpmDef {
  dev.expect({ attrs: ['model'], children: ['backend'] });
  const model = dev.enumAttr('model', ['tpm-tis', 'tpm-crb'] as const) ?? 'tpm-tis';
  const backend = dev.requireChild('backend');
  const type = backend.requireEnumAttr('type', ['emulator', 'passthrough'] as const);
  if (type === 'passthrough') {
    throw fail('unsupported_value', backend.attrPath('type'), "a passthrough TPM is the host's own device: its state cannot go with the guest to another host (use type='emulator')");
  }
  backend.expect({ attrs: ['type', 'version', 'persistent_state'], children: ['active_pcr_banks', 'encryption'] });
  const version = backend.enumAttr('version', ['1.2', '2.0'] as const) ?? (model === 'tpm-tis' ? '1.2' : '2.0');
  if (version === '1.2' && model === 'tpm-crb') throw fail('unsupported_value', backend.attrPath('version'), 'a tpm-crb is a TPM 2.0 interface: TPM 1.2 needs model tpm-tis');
  // A transient domain's TPM state goes with it; keeping it would leave state no definition owns.
  if (backend.boolAttr('persistent_state', 'yes', 'no')) {
    throw fail('unsupported_value', backend.attrPath('persistent_state'), "persistent_state='yes' is not supported: the TPM state of a domain this agent forgets (a transient one that stopped) is removed with it");
  }
  const encryption = backend.child('encryption');
  if (encryption) {
    throw fail('unsupported_element', encryption.path, 'an encrypted TPM state needs a libvirt secret, and this agent keeps no secrets');
  }
  const tpm: TpmDef = { element: dev.path, model, version };
  const banks = backend.child('active_pcr_banks');
  if (banks) {
    if (version === '1.2') throw fail('unsupported_element', banks.path, 'PCR banks are a TPM 2.0 setting');
    banks.expect({ children: TPM_PCR_BANKS });
    tpm.activePcrBanks = TPM_PCR_BANKS.filter((b) => banks.child(b)?.expect({}));
    if (tpm.activePcrBanks.length === 0) throw fail('missing_element', banks.path, '<active_pcr_banks> needs at least one bank (sha1, sha256, sha384, sha512)');
  }
  return tpm;
}

function parseInterface(dev: Node, allowMissingIds: boolean): RawInterface {
  const type = dev.requireEnumAttr('type', ['user', 'bridge', 'network', 'ethernet'] as const);
  dev.expect({ attrs: ['type'], children: ['mac', 'model', 'source', 'target', 'boot', 'address', 'mtu'] });
  const iface: RawInterface = { element: dev.path, type, mac: '', model: 'rtl8139' };
  // Nova writes it: the tap's MTU, and for virtio the one the guest is told (host_mtu), as libvirt.
  const mtuNode = dev.child('mtu')?.expect({ attrs: ['size'] });
  if (mtuNode) {
    if (type === 'user' || type === 'ethernet') throw fail('unsupported_element', mtuNode.path, `<mtu> is for a tap the agent makes (type bridge or network), not type '${type}'`);
    iface.mtu = mtuNode.requireIntAttr('size', 68, 65535);
  }

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
function parseCharSource(dev: Node, type: (typeof CHAR_TYPES)[number] | 'spicevmc', hostPlacedSocket = false): { source: CharSource; log?: CharLog } {
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
    case 'spicevmc':
      if (src) throw fail('unsupported_element', src.path, `type '${type}' takes no <source>`);
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

/** The virtio port of the SPICE agent (vdagent): libvirt's name for a spicevmc channel when none is given. */
export const SPICE_AGENT_CHANNEL = 'com.redhat.spice.0';

function parseChannel(dev: Node): RawChannel {
  const type = dev.requireEnumAttr('type', [...CHAR_TYPES, 'spicevmc'] as const);
  dev.expect({ attrs: ['type'], children: [...CHAR_CHILDREN, 'address'] });
  const t = dev.requireChild('target');
  t.requireEnumAttr('type', ['virtio'] as const);
  t.expect({ attrs: ['type', 'name'] });
  const name = type === 'spicevmc' ? t.attr('name') ?? SPICE_AGENT_CHANNEL : t.requireAttr('name');
  if (!/^[A-Za-z0-9_.:-]{1,128}$/.test(name)) throw fail('invalid_value', t.attrPath('name'), `'${name}' is not a valid channel name`);
  // qemu's spicevmc chardev here is the SPICE agent's (name=vdagent): the guest's agent looks for it on this port.
  if (type === 'spicevmc' && name !== SPICE_AGENT_CHANNEL) {
    throw fail('unsupported_value', t.attrPath('name'), `a spicevmc channel is the SPICE agent's, named '${SPICE_AGENT_CHANNEL}' (not '${name}')`);
  }
  const ch: RawChannel = { element: dev.path, name, ...parseCharSource(dev, type, true) };
  const address = parseAddress(dev, ['virtio-serial'] as const);
  if (address) ch.address = address;
  return ch;
}

const IPV4_RE = /^(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}$/;
const IPV6_RE = /^[0-9a-fA-F:.]*:[0-9a-fA-F:.]*$/;

/**
 * Where a display listens: the listen attribute or `<listen type='address'>`, loopback when
 * neither names an address (libvirt's default vnc_listen/spice_listen); `<listen type='none'/>`
 * (SPICE only): undefined, no socket at all.
 */
function parseListen(dev: Node, allowNone: boolean): string | undefined {
  let listen = dev.attr('listen');
  let listenPath = dev.attrPath('listen');
  const l = dev.child('listen');
  if (l) {
    const type = l.requireEnumAttr('type', allowNone ? ['address', 'none'] as const : ['address'] as const);
    if (type === 'none') {
      l.expect({ attrs: ['type'] });
      if (listen !== undefined) throw fail('invalid_value', dev.attrPath('listen'), "a listen address contradicts <listen type='none'/>");
      return undefined;
    }
    l.expect({ attrs: ['type', 'address'] });
    const addr = l.attr('address');
    if (addr !== undefined) {
      if (listen !== undefined && listen !== addr) throw fail('invalid_value', l.attrPath('address'), 'the <listen> address differs from the listen attribute');
      listen = addr;
      listenPath = l.attrPath('address');
    }
  }
  listen ??= '127.0.0.1';
  if (!IPV4_RE.test(listen) && !IPV6_RE.test(listen)) throw fail('invalid_value', listenPath, `'${listen}' is not an IP address`);
  return listen;
}

function parseGraphics(dev: Node): GraphicsDef {
  const type = dev.requireEnumAttr('type', ['vnc', 'spice'] as const);
  if (type === 'spice') return parseSpice(dev);
  dev.expect({ attrs: ['type', 'port', 'autoport', 'listen'], children: ['listen'] });
  const portAttr = dev.attr('port');
  const port = portAttr === '-1' ? undefined : dev.intAttr('port', 5900, 65535);
  const autoport = dev.boolAttr('autoport', 'yes', 'no') ?? port === undefined;
  if (!autoport && port === undefined) throw fail('missing_attribute', dev.attrPath('port'), "autoport='no' needs a port");
  const g: GraphicsDef = { element: dev.path, type: 'vnc', listen: parseListen(dev, false)!, autoport };
  if (!autoport) g.port = port!;
  return g;
}

/** The SPICE server's compression and streaming elements: [element, attribute, qemu key, values], in libvirt's order on -spice. */
const SPICE_COMPRESSION = [
  ['image', 'compression', 'image-compression', ['auto_glz', 'auto_lz', 'quic', 'glz', 'lz', 'off']],
  ['jpeg', 'compression', 'jpeg-wan-compression', ['auto', 'never', 'always']],
  ['zlib', 'compression', 'zlib-glz-wan-compression', ['auto', 'never', 'always']],
  ['playback', 'compression', 'playback-compression', ['on', 'off']],
  ['streaming', 'mode', 'streaming-video', ['filter', 'all', 'off']],
] as const;

/**
 * `<graphics type='spice'>` as virt-manager and virsh dumpxml write it. No TLS (this agent sets
 * up no certificates for displays) and no password, as for VNC: the listen address is confined
 * by the host (--graphics-listen). No OpenGL: qemu here has no GPU to render with.
 */
function parseSpice(dev: Node): SpiceGraphicsDef {
  dev.expect({
    attrs: ['type', 'port', 'tlsPort', 'autoport', 'listen', 'defaultMode'],
    children: ['listen', ...SPICE_COMPRESSION.map(([el]) => el), 'mouse', 'clipboard', 'filetransfer', 'gl'],
  });
  // tlsPort='-1' (virt-manager writes it with autoport) asks for a TLS port only where the host
  // has SPICE TLS set up; libvirt without spice_tls gives none, and so does this agent.
  if (dev.attr('tlsPort') !== undefined && !(dev.attr('tlsPort') === '-1' && dev.attr('autoport') === 'yes')) {
    throw fail('unsupported_attribute', dev.attrPath('tlsPort'), 'a SPICE TLS port needs certificates for the display, which this agent does not set up: remove tlsPort (the display is plain text, on loopback unless --graphics-listen allows more)');
  }
  const mode = dev.enumAttr('defaultMode', ['any', 'secure', 'insecure'] as const);
  if (mode === 'secure') throw fail('unsupported_value', dev.attrPath('defaultMode'), "defaultMode='secure' needs a SPICE TLS port, which this agent does not set up (supported: any, insecure)");
  const gl = dev.child('gl');
  if (gl) {
    gl.expect({ attrs: ['enable'] });
    if (gl.requireEnumAttr('enable', ['yes', 'no'] as const) === 'yes') {
      throw fail('unsupported_value', gl.attrPath('enable'), "gl enable='yes' renders with a host GPU, which qemu is not given here (use enable='no')");
    }
  }
  const listen = parseListen(dev, true);
  const g: SpiceGraphicsDef = { element: dev.path, type: 'spice', autoport: false, plaintextDefault: mode === 'insecure', compression: [], copyPaste: true, fileTransfer: true };
  if (listen !== undefined) {
    g.listen = listen;
    // qemu runs as an unprivileged user: it cannot bind a port below 1024.
    const port = dev.attr('port') === '-1' ? undefined : dev.intAttr('port', 1024, 65535);
    g.autoport = dev.boolAttr('autoport', 'yes', 'no') ?? port === undefined;
    if (!g.autoport && port === undefined) throw fail('missing_attribute', dev.attrPath('port'), "autoport='no' needs a port");
    if (!g.autoport) g.port = port!;
  }
  for (const [el, attr, key, values] of SPICE_COMPRESSION) {
    const c = dev.child(el)?.expect({ attrs: [attr] });
    if (c) g.compression.push([key, c.requireEnumAttr(attr, values)]);
  }
  const mouse = dev.child('mouse')?.expect({ attrs: ['mode'] }).requireEnumAttr('mode', ['server', 'client'] as const);
  if (mouse) g.mouseMode = mouse;
  g.copyPaste = dev.child('clipboard')?.expect({ attrs: ['copypaste'] }).boolAttr('copypaste', 'yes', 'no') ?? true;
  g.fileTransfer = dev.child('filetransfer')?.expect({ attrs: ['enable'] }).boolAttr('enable', 'yes', 'no') ?? true;
  return g;
}

/** A size in KiB that must be a power of two MiB within [minMiB, maxMiB] (what qemu takes as is). */
function powerOfTwoMiB(m: Node, name: string, minMiB: number, maxMiB: number, defaultKiB: number): number {
  const kib = m.intAttr(name, 0, 2 ** 32) ?? defaultKiB;
  const mib = kib / 1024;
  if (!Number.isInteger(mib) || mib < minMiB || mib > maxMiB || (mib & (mib - 1)) !== 0) {
    throw fail('invalid_value', m.attrPath(name), `${name} must be a power of two MiB from ${minMiB * 1024} to ${maxMiB * 1024} KiB`);
  }
  return kib;
}

/** libvirt's qxl sizes when the XML gives none, in KiB. */
const QXL_DEFAULT_KIB = { ram: 65536, vram: 65536, vgamem: 16384 };

function parseVideo(dev: Node, position: number): Omit<VideoDef, 'id'> {
  dev.expect({ children: ['model', 'address'] });
  const m = dev.requireChild('model');
  const model = m.requireEnumAttr('type', ['vga', 'cirrus', 'qxl', 'virtio', 'bochs', 'none'] as const);
  const multihead = model === 'qxl' || model === 'virtio';
  m.expect({ attrs: ['type', 'vram', 'heads', 'primary', ...(model === 'qxl' ? ['ram', 'vram64', 'vgamem'] : [])], children: model === 'virtio' ? ['acceleration'] : [] });
  // As libvirt: the first video is the primary one (qemu's VGA-compatible device); only qxl and virtio come as further displays.
  if (m.enumAttr('primary', ['yes'] as const) && position > 0) throw fail('unsupported_value', m.attrPath('primary'), 'put the primary video first');
  if (position > 0 && !multihead) throw fail('unsupported_value', m.attrPath('type'), `a ${model} can only be the primary video (further ones: qxl, virtio)`);
  const v: Omit<VideoDef, 'id'> = { element: dev.path, model, primary: position === 0 };
  if (multihead) v.heads = m.intAttr('heads', 1, 16) ?? 1;
  else m.enumAttr('heads', ['1'] as const);
  const accel = m.child('acceleration');
  if (accel) {
    accel.expect({ attrs: ['accel3d'] });
    if (accel.requireEnumAttr('accel3d', ['yes', 'no'] as const) === 'yes') {
      throw fail('unsupported_value', accel.attrPath('accel3d'), "accel3d='yes' (virgl) renders with a host GPU, which qemu is not given here (use accel3d='no')");
    }
  }
  const vram = m.attr('vram');
  if (model === 'cirrus') {
    // libvirt passes cirrus no size (qemu's cirrus-vga has a fixed 4 MiB): vram is only kept.
    if (vram !== undefined) v.vramKiB = m.intAttr('vram', 1, 1048576)!;
  } else if (model === 'vga' || model === 'bochs') {
    // qemu takes whole MiB as a power of two (bochs-display at least 4).
    v.vramKiB = powerOfTwoMiB(m, 'vram', model === 'vga' ? 1 : 4, 256, 16384);
  } else if (model === 'qxl') {
    // ram_size and vram_size are 32-bit byte counts in qemu; the 64-bit BAR (vram64) at least the 32-bit one.
    v.vramKiB = powerOfTwoMiB(m, 'vram', 1, 2048, QXL_DEFAULT_KIB.vram);
    const vram64KiB = m.attr('vram64') === undefined ? 0 : powerOfTwoMiB(m, 'vram64', 1, 65536, 0);
    if (vram64KiB !== 0 && vram64KiB < v.vramKiB) throw fail('invalid_value', m.attrPath('vram64'), 'vram64 must not be smaller than vram');
    v.qxl = { ramKiB: powerOfTwoMiB(m, 'ram', 1, 2048, QXL_DEFAULT_KIB.ram), vram64KiB, vgamemKiB: powerOfTwoMiB(m, 'vgamem', 1, 256, QXL_DEFAULT_KIB.vgamem) };
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

/**
 * `<redirdev bus='usb' type='spicevmc'>` (virt-manager adds two): a USB device the SPICE client
 * offers, plugged into the guest. Over a host socket (type tcp), whoever is at the other end
 * would plug devices into the guest: not supported.
 */
function parseRedirdev(dev: Node): RawRedirdev {
  dev.requireEnumAttr('bus', ['usb'] as const);
  const type = dev.requireAttr('type');
  if (type !== 'spicevmc') {
    throw fail('unsupported_value', dev.attrPath('type'), `redirdev type '${type}' would plug whatever USB device a host socket offers into the guest (supported: spicevmc, the SPICE client's devices)`);
  }
  dev.expect({ attrs: ['bus', 'type'], children: ['address'] });
  const r: RawRedirdev = { element: dev.path };
  const address = parseAddress(dev, ['usb'] as const);
  if (address) r.address = address;
  return r;
}

function parseMemballoon(dev: Node): Omit<MemballoonDef, 'id'> {
  const model = dev.requireEnumAttr('model', ['virtio', 'none'] as const);
  dev.expect({ attrs: ['model'], children: model === 'virtio' ? ['address', 'stats'] : ['address'] });
  const b: Omit<MemballoonDef, 'id'> = { element: dev.path, model };
  const stats = dev.child('stats');
  if (stats) {
    stats.expect({ attrs: ['period'] });
    b.statsPeriod = stats.requireIntAttr('period', 0, 2 ** 31 - 1);
  }
  const address = parseAddress(dev, model === 'none' ? [] : ['pci'] as const);
  if (address) b.address = address;
  return b;
}

const WATCHDOG_ACTIONS = ['reset', 'shutdown', 'poweroff', 'pause', 'none', 'inject-nmi'] as const;

function parseWatchdog(dev: Node, family: MachineFamily): RawWatchdog {
  const model = dev.requireEnumAttr('model', ['itco', 'i6300esb', 'ib700'] as const);
  dev.expect({ attrs: ['model', 'action'], children: ['address'] });
  if (model === 'itco' && family !== 'q35') throw fail('unsupported_value', dev.attrPath('model'), "the itco watchdog is part of q35's ICH9 chipset");
  const action = dev.attr('action') ?? 'reset';
  if (action === 'dump') {
    // libvirt pauses the guest and writes its memory to auto_dump_path itself.
    throw fail('unsupported_value', dev.attrPath('action'), "watchdog action 'dump' would write the guest's memory to the host's disk, which this agent never does (use pause to keep the guest for inspection)");
  }
  const w: RawWatchdog = { element: dev.path, model, action: dev.enumAttr('action', WATCHDOG_ACTIONS) ?? 'reset' };
  const address = parseAddress(dev, model === 'i6300esb' ? ['pci'] as const : []);
  if (address) w.address = address;
  return w;
}

/**
 * A host audio backend: 'none' (qemu's null backend) or 'spice' (the SPICE client plays it).
 * Every other type plays through a host sound server or device (pulseaudio, alsa, oss, jack,
 * pipewire, sdl, coreaudio) or a display (dbus) that this agent does not provide, or writes a
 * host file (file).
 */
function parseAudio(dev: Node, position: number): AudioDef {
  const type = dev.requireAttr('type');
  if (type !== 'none' && type !== 'spice') {
    throw fail('unsupported_value', dev.attrPath('type'), `audio type '${type}' needs a host sound server, device or display this agent does not provide (supported: none, spice)`);
  }
  dev.expect({ attrs: ['id', 'type'] });
  return { element: dev.path, id: dev.intAttr('id', 1, 255) ?? position, type };
}

function parseSound(dev: Node, position: number): SoundDef {
  const model = dev.requireEnumAttr('model', ['ich9', 'ich6', 'ac97'] as const);
  dev.expect({ attrs: ['model'], children: ['codec', 'audio', 'address'], repeated: ['codec'] });
  const codecs = dev.children('codec').map((c) => c.expect({ attrs: ['type'] }).requireEnumAttr('type', ['duplex', 'micro', 'output'] as const));
  if (model === 'ac97' && codecs.length > 0) throw fail('unsupported_element', `${dev.path}/codec[1]`, 'an AC97 has no HDA codecs');
  const sound: SoundDef = { element: dev.path, model, codecs: model === 'ac97' || codecs.length > 0 ? codecs : ['duplex'], id: `sound${position}` };
  const audio = dev.child('audio')?.expect({ attrs: ['id'] });
  if (audio) sound.audioId = audio.requireIntAttr('id', 1, 255);
  const address = parseAddress(dev, ['pci'] as const);
  if (address) sound.address = address;
  return sound;
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
