/**
 * Define-time normalization, as libvirt does it: the alias machine type becomes the versioned
 * one, a missing uuid and missing MACs are generated, and every default and address chosen by
 * the layout (implicit controllers, PCI slots, drive units, ports) is written into the XML.
 * The stored XML then pins the machine: a destination with a newer qemu, or a newer version of
 * this code, rebuilds the same guest. Normalizing the result again changes nothing.
 */
import type { DeviceAddress, DomainDef, NormalizeHost, PciModel } from './model.js';
import { selectFirmware, templateOf } from './firmware.js';
import { PCI_DRIVERS } from './pci.js';
import { machineFamily, parseInternal } from './parse.js';
import { fail } from './walk.js';
import { childElements, element, serializeXmlTree, type XElement } from './xml.js';

const childEl = (el: XElement, name: string): XElement | undefined => childElements(el, name)[0];

const hex = (n: number, width: number) => `0x${n.toString(16).padStart(width, '0')}`;

function addressElement(a: DeviceAddress): XElement {
  switch (a.type) {
    case 'pci':
      return element('address', [['type', 'pci'], ['domain', hex(a.domain, 4)], ['bus', hex(a.bus, 2)], ['slot', hex(a.slot, 2)],
        ['function', hex(a.function, 1)], ...(a.multifunction ? [['multifunction', 'on'] as [string, string]] : [])]);
    case 'drive':
      return element('address', [['type', 'drive'], ['controller', String(a.controller)], ['bus', String(a.bus)],
        ['target', String(a.target)], ['unit', String(a.unit)]]);
    case 'usb':
      return element('address', [['type', 'usb'], ['bus', String(a.bus)], ['port', String(a.port)]]);
    case 'virtio-serial':
      return element('address', [['type', 'virtio-serial'], ['controller', String(a.controller)], ['bus', String(a.bus)],
        ['port', String(a.port)]]);
  }
}

/** Puts `el` into `parent` after the last child named in `after` (else first), or replaces the child of its name. */
function place(parent: XElement, el: XElement, after: string[]): void {
  const existing = childEl(parent, el.name);
  if (existing) {
    parent.children[parent.children.indexOf(existing)] = el;
    return;
  }
  let at = 0;
  parent.children.forEach((c, i) => {
    if (c.kind === 'element' && after.includes(c.name)) at = i + 1;
  });
  parent.children.splice(at, 0, el);
}

/**
 * `<os firmware='efi'>` without a loader path becomes the firmware this host chose, written out
 * as libvirt writes it (its features, the loader, the store's template, SMM on where the flash
 * needs it), so the stored XML names the very files a destination must have too.
 */
function normalizeFirmware(root: XElement, def: DomainDef, machine: string, firmwares: NormalizeHost['firmwares']): void {
  const loader = def.os.loader;
  if (!loader) return;
  const osEl = childEl(root, 'os')!;
  const loaderEl = childEl(osEl, 'loader');
  const nvramEl = childEl(osEl, 'nvram');
  let path = loader.path;
  let template = def.os.nvram?.template;
  let secure = loader.secure;
  let type = loader.type;
  let needsSmm = loader.secure;
  if (path === undefined) {
    // Only what the XML says narrows the choice (parse fills in defaults for the rest).
    const chosen = selectFirmware({
      machine,
      ...(loaderEl?.attrs.has('type') ? { loaderType: loader.type } : {}),
      ...(loaderEl?.attrs.has('secure') ? { secure: loader.secure } : {}),
      ...(template !== undefined ? { template } : {}),
      features: def.os.firmwareFeatures ?? {},
      ...(def.features.smm ? { smm: def.features.smm.on } : {}),
    }, firmwares, '/domain/os/@firmware');
    ({ path, type, secure } = chosen.loader);
    template = chosen.template;
    needsSmm = chosen.requiresSmm;
    const features = Object.entries(chosen.features).sort(([a], [b]) => a.localeCompare(b))
      .map(([name, on]) => element('feature', [['enabled', on ? 'yes' : 'no'], ['name', name]]));
    place(osEl, element('firmware', [], features), ['type']);
  } else if (template === undefined && type === 'pflash' && loader.readonly) {
    template = templateOf(path, firmwares);
  }
  const attrs: [string, string][] = [['readonly', loader.readonly ? 'yes' : 'no'], ...(secure || loaderEl?.attrs.has('secure') ? [['secure', secure ? 'yes' : 'no'] as [string, string]] : []), ['type', type]];
  place(osEl, element('loader', attrs, [{ kind: 'text', text: path }]), ['type', 'firmware']);
  if (def.os.nvram && type === 'pflash') {
    const storePath = def.os.nvram.path;
    place(osEl, element('nvram', template !== undefined ? [['template', template]] : [], storePath !== undefined ? [{ kind: 'text', text: storePath }] : []), ['type', 'firmware', 'loader']);
  } else if (nvramEl) {
    // The chosen firmware is a ROM image: it has no variable store.
    osEl.children.splice(osEl.children.indexOf(nvramEl), 1);
  }
  if (needsSmm && !def.features.smm) {
    let featuresEl = childEl(root, 'features');
    if (!featuresEl) {
      featuresEl = element('features');
      place(root, featuresEl, ['os']);
    }
    featuresEl.children.push(element('smm', [['state', 'on']]));
  }
}

function generateUuid(randomBytes: NormalizeHost['randomBytes']): string {
  const b = Buffer.from(randomBytes(16));
  b[6] = (b[6]! & 0x0f) | 0x40; // version 4
  b[8] = (b[8]! & 0x3f) | 0x80; // RFC 4122 variant
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

function generateMac(randomBytes: NormalizeHost['randomBytes'], used: Set<string>): string {
  for (let attempt = 0; attempt < 64; attempt++) {
    const mac = `52:54:00:${[...Buffer.from(randomBytes(3)).subarray(0, 3)].map((x) => x.toString(16).padStart(2, '0')).join(':')}`;
    if (!used.has(mac)) return mac;
  }
  throw new Error('randomBytes keeps returning MAC addresses that are already in use');
}

/** libvirt's order of the `<video><model>` attributes. */
const VIDEO_MODEL_ATTRS = ['type', 'ram', 'vram', 'vram64', 'vgamem', 'heads', 'primary'];

/** libvirt's defaults of a qxl (ram, vram, vgamem, heads) and a virtio (heads), written where the XML has none. */
function completeVideoModel(model: XElement, v: DomainDef['videos'][number]): void {
  const defaults: [string, number | undefined][] = [['ram', v.qxl?.ramKiB], ['vram', v.qxl && v.vramKiB], ['vgamem', v.qxl?.vgamemKiB], ['heads', v.heads]];
  const missing = defaults.filter(([name, value]) => value !== undefined && !model.attrs.has(name));
  if (missing.length === 0) return;
  const attrs = new Map([...model.attrs, ...missing.map(([name, value]): [string, string] => [name, String(value)])]);
  const rank = (name: string) => (VIDEO_MODEL_ATTRS.includes(name) ? VIDEO_MODEL_ATTRS.indexOf(name) : VIDEO_MODEL_ATTRS.length);
  model.attrs.clear();
  for (const [name, value] of [...attrs].sort(([a], [b]) => rank(a) - rank(b))) model.attrs.set(name, value);
}

export function normalizeDomainXml(xml: string, host: NormalizeHost): { xml: string; def: DomainDef } {
  const { def, root, nodes } = parseInternal(xml, { allowMissingIds: true });
  const node = (path: string) => nodes.get(path)!;

  const typeEl = childEl(childEl(root, 'os')!, 'type')!;
  const given = def.machine;
  const machine = host.machineAliases[given] ?? given;
  const machinePath = '/domain/os/type/@machine';
  if (!host.knownMachines.includes(machine)) {
    throw fail('unsupported_value', machinePath, `machine type '${machine}' is not provided by this host's qemu`);
  }
  if (machineFamily(machine, machinePath) !== def.machineFamily) {
    throw fail('unsupported_value', machinePath, `alias '${given}' resolves to '${machine}', a different chipset`);
  }
  typeEl.attrs.set('machine', machine);
  normalizeFirmware(root, def, machine, host.firmwares);

  if (!childEl(root, 'uuid')) {
    const at = root.children.indexOf(childEl(root, 'name')!) + 1;
    // A <sysinfo> system uuid, when there is one, is the domain's (as libvirt takes it).
    root.children.splice(at, 0, element('uuid', [], [{ kind: 'text', text: def.uuid || generateUuid(host.randomBytes) }]));
  }
  // libvirt's defaults, as its dumpxml shows them: migratable='on' for host-passthrough, dies='1'.
  const cpuEl = childEl(root, 'cpu');
  if (cpuEl && def.cpu?.migratable !== undefined && !cpuEl.attrs.has('migratable')) cpuEl.attrs.set('migratable', def.cpu.migratable ? 'on' : 'off');
  const topologyEl = cpuEl && childEl(cpuEl, 'topology');
  if (topologyEl && !topologyEl.attrs.has('dies')) {
    // dies goes after sockets, where libvirt writes it.
    const attrs = [...topologyEl.attrs.entries()];
    const at = attrs.findIndex(([k]) => k === 'sockets') + 1;
    attrs.splice(at, 0, ['dies', String(def.cpu!.topology!.dies)]);
    topologyEl.attrs.clear();
    for (const [k, v] of attrs) topologyEl.attrs.set(k, v);
  }

  const addAddress = (path: string | undefined, a: DeviceAddress | undefined) => {
    if (path === undefined || a === undefined) return;
    const el = node(path);
    if (!childEl(el, 'address')) el.children.push(addressElement(a));
  };

  const macs = new Set(def.interfaces.map((n) => n.mac).filter((m) => m !== ''));
  for (const n of def.interfaces) {
    const el = node(n.element);
    if (!childEl(el, 'mac')) {
      const mac = generateMac(host.randomBytes, macs);
      macs.add(mac);
      el.children.unshift(element('mac', [['address', mac]]));
    }
    if (!childEl(el, 'model')) el.children.push(element('model', [['type', n.model]]));
    addAddress(n.element, n.address);
  }
  for (const d of def.disks) {
    const target = childEl(node(d.element), 'target')!;
    if (!target.attrs.has('bus')) target.attrs.set('bus', d.bus);
    addAddress(d.element, d.address);
  }
  let devices = childEl(root, 'devices');
  if (!devices) {
    devices = element('devices');
    root.children.push(devices);
  }
  for (const c of def.controllers) {
    let el: XElement;
    if (c.element === undefined) {
      const attrs: [string, string][] = [['type', c.type], ['index', String(c.index)]];
      if (c.model) attrs.push(['model', c.model]);
      el = element('controller', attrs);
      devices.children.push(el);
    } else {
      el = node(c.element);
      if (!el.attrs.has('index')) el.attrs.set('index', String(c.index));
      if (c.model && !el.attrs.has('model')) el.attrs.set('model', c.model);
    }
    // libvirt's normalized form of a root port or bridge: the qemu model and its numbers.
    const driver = c.type === 'pci' ? PCI_DRIVERS[c.model as PciModel] : undefined;
    if (driver && !childEl(el, 'model')) el.children.push(element('model', [['name', driver]]));
    const target: [string, string][] = c.model === 'pcie-root-port' || c.model === 'pcie-switch-downstream-port' ? [['chassis', String(c.chassis)], ['port', hex(c.port!, 1)]]
      : c.model === 'pci-bridge' ? [['chassisNr', String(c.chassisNr)]]
      : c.busNr !== undefined ? [['busNr', String(c.busNr)]] : [];
    if (target.length > 0 && !childEl(el, 'target')) el.children.push(element('target', target));
    if (c.address && !childEl(el, 'address')) el.children.push(addressElement(c.address));
  }
  for (const s of def.serials) {
    if (s.origin !== 'serial') continue;
    const el = node(s.element);
    let target = childEl(el, 'target');
    if (!target) {
      target = element('target');
      el.children.push(target);
    }
    if (!target.attrs.has('port')) target.attrs.set('port', String(s.port));
  }
  for (const c of [...def.consoles, ...def.channels]) addAddress(c.element, c.address);
  // libvirt names a spicevmc channel's port when the XML does not.
  for (const c of def.channels) {
    const target = childEl(node(c.element), 'target')!;
    if (!target.attrs.has('name')) target.attrs.set('name', c.name);
  }
  for (const v of def.videos) {
    if (v.element !== undefined) {
      completeVideoModel(childEl(node(v.element), 'model')!, v);
      addAddress(v.element, v.address);
      continue;
    }
    const model = element('model', [['type', v.model], ['vram', String(v.vramKiB)], ['heads', '1'], ['primary', 'yes']]);
    devices.children.push(element('video', [], [model, addressElement(v.address!)]));
  }
  for (const i of def.inputs) addAddress(i.element, i.address);
  for (const r of def.redirdevs) addAddress(r.element, r.address);
  addAddress(def.memballoon?.element, def.memballoon?.address);
  for (const r of def.rngs) addAddress(r.element, r.address);
  for (const snd of def.sounds) addAddress(snd.element, snd.address);
  for (const w of def.watchdogs) addAddress(w.element, w.address);
  if (def.tpm) {
    // libvirt writes its defaults back: TPM 1.2 and 2.0 states are not interchangeable.
    const el = node(def.tpm.element);
    if (!el.attrs.has('model')) el.attrs.set('model', def.tpm.model);
    const backend = childEl(el, 'backend')!;
    if (!backend.attrs.has('version')) backend.attrs.set('version', def.tpm.version);
  }
  for (const a of def.audios) {
    // The backend libvirt adds for a sound that names none is written into the XML, as libvirt does.
    if (a.element === '/domain/devices') {
      devices.children.push(element('audio', [['id', String(a.id)], ['type', a.type]]));
      continue;
    }
    const el = node(a.element);
    if (!el.attrs.has('id')) el.attrs.set('id', String(a.id));
  }

  const out = serializeXmlTree(root);
  return { xml: out, def: parseInternal(out, { allowMissingIds: false }).def };
}
