/**
 * The PCI topology of a guest, placed as libvirt places it. Every PCI controller of index N
 * provides bus N (qemu id `pci.N`); the root bus is pci.0 (i440fx) or pcie.0 (q35). What each
 * bus accepts follows the hardware: a pcie-root-port has one slot, for one device; conventional
 * bridges have slots 1-31 (0 is the bridge's own, on pci-bridge the SHPC); pcie.0 takes root
 * ports and integrated devices. On q35, devices without an address go as libvirt puts them:
 * PCIe endpoints each into a free root port, conventional PCI devices onto a pcie-to-pci-bridge,
 * adding the ports and bridges that are missing (and one spare port for hotplug when the XML had
 * no PCI controllers at all). Addresses chosen here are written back into the stored XML, so a
 * destination rebuilds the same tree.
 */
import type { ControllerDef, DeviceAddress, MachineFamily, PciAddress, PciModel } from './model.js';
import { fail } from './walk.js';

/** The qemu device of each, as `<model name>` says it (libvirt writes it into the normalized XML). */
export const PCI_DRIVERS: Partial<Record<PciModel, string>> = {
  'pcie-root-port': 'pcie-root-port',
  'pcie-to-pci-bridge': 'pcie-pci-bridge',
  'dmi-to-pci-bridge': 'i82801b11-bridge',
  'pci-bridge': 'pci-bridge',
  'pcie-switch-upstream-port': 'x3130-upstream',
  'pcie-switch-downstream-port': 'xio3130-downstream',
  'pci-expander-bus': 'pxb',
  'pcie-expander-bus': 'pxb-pcie',
};

/** How a device attaches: a PCIe endpoint, or a conventional PCI device (legacy). */
export type PciConnect = 'pcie' | 'pci';

export interface PciUser {
  element?: string;
  address?: DeviceAddress;
}

export interface PciPlacement {
  user: PciUser;
  connect: PciConnect;
}

const DEVICES = '/domain/devices';

/** What plugs into a bus of each kind, and in which slots. */
const BUS_RULES: Record<PciModel, { minSlot: number; maxSlot: number; takes: ReadonlyArray<PciConnect | PciModel> }> = {
  'pci-root': { minSlot: 1, maxSlot: 31, takes: ['pci', 'pcie', 'pci-bridge', 'pci-expander-bus'] },
  'pcie-root': { minSlot: 1, maxSlot: 31, takes: ['pci', 'pcie', 'pcie-root-port', 'dmi-to-pci-bridge', 'pcie-expander-bus'] },
  'pcie-root-port': { minSlot: 0, maxSlot: 0, takes: ['pci', 'pcie', 'pcie-to-pci-bridge', 'pcie-switch-upstream-port'] },
  'pcie-switch-upstream-port': { minSlot: 0, maxSlot: 31, takes: ['pcie-switch-downstream-port'] },
  'pcie-switch-downstream-port': { minSlot: 0, maxSlot: 0, takes: ['pci', 'pcie', 'pcie-to-pci-bridge', 'pcie-switch-upstream-port'] },
  // An expander bus is a root bus of its own, in the guest's NUMA topology; qemu gives it no hotplug.
  'pci-expander-bus': { minSlot: 0, maxSlot: 31, takes: ['pci', 'pcie', 'pci-bridge'] },
  'pcie-expander-bus': { minSlot: 0, maxSlot: 31, takes: ['pcie-root-port', 'dmi-to-pci-bridge'] },
  'pcie-to-pci-bridge': { minSlot: 1, maxSlot: 31, takes: ['pci', 'pcie', 'pci-bridge'] },
  'dmi-to-pci-bridge': { minSlot: 0, maxSlot: 31, takes: ['pci', 'pcie', 'pci-bridge'] },
  'pci-bridge': { minSlot: 1, maxSlot: 31, takes: ['pci', 'pcie', 'pci-bridge'] },
};

export const isPciController = (c: ControllerDef): boolean => c.type === 'pci';

export function pciAddr(slot: number, fn = 0, bus = 0): PciAddress {
  return { type: 'pci', domain: 0, bus, slot, function: fn, multifunction: false };
}

/** The qemu id of bus `index`. */
export const pciBusId = (family: MachineFamily, index: number) => (index === 0 ? (family === 'q35' ? 'pcie.0' : 'pci.0') : `pci.${index}`);

/** A PCI controller of the domain (root, port or bridge), or undefined for any other device. */
function pciControllerOf(u: PciUser): ControllerDef | undefined {
  const c = u as ControllerDef;
  return c.builtin !== undefined && c.type === 'pci' ? c : undefined;
}

class Buses {
  /** bus index -> slot -> function -> holder */
  private readonly used = new Map<number, Map<number, Map<number, string>>>();

  /** `controllers` is the domain's own list: controllers added to it provide their buses at once. */
  constructor(private readonly controllers: ControllerDef[]) {}

  /** The PCI controllers, in index order: bus N is the one of index N. */
  pciControllers(): ControllerDef[] {
    return this.controllers.filter(isPciController).sort((a, b) => a.index - b.index);
  }

  bus(index: number): ControllerDef | undefined {
    return this.controllers.find((c) => isPciController(c) && c.index === index);
  }

  holder(a: PciAddress): string | undefined {
    return this.used.get(a.bus)?.get(a.slot)?.get(a.function);
  }

  take(a: PciAddress, by: string): void {
    let slots = this.used.get(a.bus);
    if (!slots) this.used.set(a.bus, (slots = new Map()));
    let fns = slots.get(a.slot);
    if (!fns) slots.set(a.slot, (fns = new Map()));
    fns.set(a.function, by);
  }

  slotFree(bus: number, slot: number): boolean {
    return !this.used.get(bus)?.has(slot);
  }

  functionsUsed(bus: number, slot: number): number[] {
    return [...(this.used.get(bus)?.get(slot)?.keys() ?? [])];
  }

  /** The first free slot (function 0) of a bus that takes `what`, lowest bus first. */
  firstFree(what: PciConnect | PciModel, busFilter: (model: PciModel) => boolean = () => true, belowIndex = Infinity): PciAddress | undefined {
    for (const c of this.pciControllers()) {
      if (c.index >= belowIndex) break;
      const model = c.model as PciModel;
      const rules = BUS_RULES[model];
      if (!rules.takes.includes(what) || !busFilter(model)) continue;
      for (let slot = rules.minSlot; slot <= rules.maxSlot; slot++) {
        if (this.slotFree(c.index, slot)) return pciAddr(slot, 0, c.index);
      }
    }
    return undefined;
  }
}

/**
 * Checks the PCI controllers of a domain and completes them: the root (index 0) is implicit,
 * every other index names a bus that must exist below it, with a lower index.
 */
export function checkPciControllers(controllers: ControllerDef[], family: MachineFamily): void {
  for (const c of controllers.filter(isPciController)) {
    const at = c.element ?? DEVICES;
    const root = family === 'q35' ? 'pcie-root' : 'pci-root';
    if ((c.index === 0) !== (c.model === root)) {
      throw fail('invalid_value', `${at}/@index`, c.index === 0 ? `PCI controller index 0 is the ${root}` : `a ${c.model} cannot have index ${c.index}: only index 0 is the root`);
    }
  }
}

/**
 * Places every device and PCI controller on a bus, adding controllers where libvirt would, and
 * fills in root ports' chassis/port and bridges' chassis_nr. `order` is libvirt's order of
 * assignment (network, other controllers, disks, balloon, rng, ...); the PCI controllers come
 * first. The primary video gets slot 2 (i440fx) or 1 (q35) when free, as libvirt reserves it.
 */
export function placePci(
  family: MachineFamily,
  controllers: ControllerDef[],
  order: PciPlacement[],
  reserved: Array<{ address: PciAddress; by: string }>,
  primaryVideo?: PciUser,
): void {
  const buses = new Buses(controllers);
  const entries = (): PciPlacement[] => [...buses.pciControllers().filter((c) => c.index > 0).map((c) => ({ user: c, connect: 'pcie' as const })), ...order];
  const hadPciControllers = buses.pciControllers().some((c) => c.index > 0);

  buses.take(pciAddr(0), 'the host bridge');
  for (const r of reserved) buses.take(r.address, r.by);

  // Explicit addresses first: checked against the bus they name.
  const given = entries();
  for (const p of given) {
    const a = p.user.address as PciAddress | undefined;
    if (!a) continue;
    checkExplicit(p, a, buses);
    buses.take(a, p.user.element ?? 'an implicit device');
  }
  checkMultifunction(given, buses);

  if (family === 'q35') addMissingControllers(controllers, given.filter((p) => p.user !== primaryVideo), buses, hadPciControllers);
  if (primaryVideo && !primaryVideo.address) {
    const slot = family === 'i440fx' ? 2 : 1;
    if (buses.slotFree(0, slot)) {
      primaryVideo.address = pciAddr(slot);
      buses.take(primaryVideo.address, primaryVideo.element ?? 'the video card');
    }
  }

  // Then, in libvirt's order: PCI controllers (root ports packed 8 to a slot), then devices.
  const all = entries();
  let packing: PciAddress | undefined;
  for (const p of all) {
    if (p.user.address) continue;
    const c = pciControllerOf(p.user);
    let a: PciAddress | undefined;
    if (c?.model === 'pcie-root-port') {
      // Root ports fill the functions of one slot of pcie.0 before the next slot, as libvirt packs them.
      if (packing && packing.function < 7 && buses.holder({ ...packing, function: packing.function + 1 }) === undefined) {
        a = { ...packing, function: packing.function + 1 };
      } else {
        a = buses.firstFree('pcie-root-port');
      }
      if (a) packing = a;
    } else if (c?.model === 'dmi-to-pci-bridge') {
      a = buses.slotFree(0, 0x1e) ? pciAddr(0x1e) : buses.firstFree('dmi-to-pci-bridge');
    } else if (c) {
      // A controller plugs into a bus of a lower index (libvirt's rule: the stored XML must say so too).
      a = buses.firstFree(c.model as PciModel, () => true, c.index);
      if (!a) throw fail('unsupported_value', c.element ?? DEVICES, `no free slot for this ${c.model} on a bus of a lower index than its own (${c.index}): add the controller it plugs into (a pcie-root-port for a switch or a pcie-to-pci-bridge) with a lower index`);
    } else if (family === 'q35') {
      // Endpoints are never auto-placed on pcie.0 (not hotpluggable): PCIe into root ports, PCI onto bridges.
      a = p.connect === 'pcie'
        ? buses.firstFree('pcie', (m) => m === 'pcie-root-port' || m === 'pcie-switch-downstream-port')
        : buses.firstFree('pci', (m) => m === 'pcie-to-pci-bridge' || m === 'pci-bridge' || m === 'dmi-to-pci-bridge');
    } else {
      a = buses.firstFree(p.connect);
    }
    if (!a) throw fail('unsupported_value', p.user.element ?? DEVICES, 'no free PCI slot is left for this device: add a PCI controller (a pcie-root-port on q35, a pci-bridge on pc)');
    p.user.address = a;
    buses.take(a, p.user.element ?? 'an implicit device');
  }
  // A slot with more than one function is a multifunction device, said on its function 0.
  for (const p of all) {
    const a = p.user.address as PciAddress;
    if (a.function === 0 && !a.multifunction && buses.functionsUsed(a.bus, a.slot).length > 1) a.multifunction = true;
  }
  for (const c of buses.pciControllers()) if (c.index > 0) completeControllerTarget(c);
  completeBusNumbers(controllers);
}

function checkExplicit(p: PciPlacement, a: PciAddress, buses: Buses): void {
  const at = `${p.user.element ?? DEVICES}/address`;
  const bus = buses.bus(a.bus);
  if (!bus) throw fail('invalid_value', `${at}/@bus`, `there is no PCI controller with index ${a.bus} to provide bus ${a.bus}`);
  const self = pciControllerOf(p.user);
  if (self && a.bus >= self.index) {
    throw fail('invalid_value', `${at}/@bus`, `a PCI controller sits on a bus of a lower index than its own (${self.index}), not on bus ${a.bus}`);
  }
  const rules = BUS_RULES[bus.model as PciModel];
  const what = self ? (self.model as PciModel) : p.connect;
  if (!rules.takes.includes(what)) {
    throw fail('invalid_value', at, `a ${self ? self.model : 'device'} cannot be plugged into the ${bus.model} of bus ${a.bus}`);
  }
  if (a.slot < rules.minSlot || a.slot > rules.maxSlot) {
    throw fail('invalid_value', `${at}/@slot`, `slot ${a.slot} does not exist on the ${bus.model} of bus ${a.bus} (slots ${rules.minSlot}-${rules.maxSlot})`);
  }
  const holder = buses.holder(a);
  if (holder !== undefined) {
    throw fail('invalid_value', at, `PCI bus ${a.bus} slot ${a.slot} function ${a.function} is already used by ${holder}`);
  }
}

/** qemu only shows functions 1-7 of a slot whose function 0 is a multifunction device. */
function checkMultifunction(all: PciPlacement[], buses: Buses): void {
  for (const p of all) {
    const a = p.user.address as PciAddress | undefined;
    if (!a || a.function === 0) continue;
    const f0 = all.find((x) => {
      const b = x.user.address as PciAddress | undefined;
      return b && b.bus === a.bus && b.slot === a.slot && b.function === 0;
    });
    const f0Address = f0?.user.address as PciAddress | undefined;
    // A function 0 the chipset holds (PIIX3 at 00:01.0) is multifunction by itself.
    const chipset = f0 === undefined && buses.holder({ ...a, function: 0 }) !== undefined;
    if (!chipset && (!f0Address || !f0Address.multifunction)) {
      throw fail('invalid_value', `${p.user.element ?? DEVICES}/address`, `bus ${a.bus} slot ${a.slot} needs a device at function 0 with multifunction='on'`);
    }
  }
}

/**
 * q35: the root ports and the pcie-to-pci-bridge that the unplaced devices need, added as
 * libvirt adds them (the bridge needs a root port of its own), plus one spare root port when
 * the XML named no PCI controllers at all.
 */
function addMissingControllers(controllers: ControllerDef[], all: PciPlacement[], buses: Buses, hadPciControllers: boolean): void {
  // (The primary video is not among them: it has a slot of pcie.0 of its own.)
  const unplaced = all.filter((p) => !p.user.address && !pciControllerOf(p.user));
  const legacy = unplaced.filter((p) => p.connect === 'pci').length;
  let pcie = unplaced.filter((p) => p.connect === 'pcie').length;
  const pciCtrls = controllers.filter(isPciController);
  const nextIndex = () => Math.max(...pciCtrls.map((c) => c.index), 0) + 1;
  const add = (model: PciModel) => {
    const c: ControllerDef = { type: 'pci', index: nextIndex(), model, builtin: false, id: '' };
    c.id = `pci.${c.index}`;
    controllers.push(c);
    pciCtrls.push(c);
    return c;
  };
  const freeBridgeSlots = pciCtrls
    .filter((c) => c.model === 'pcie-to-pci-bridge' || c.model === 'pci-bridge' || c.model === 'dmi-to-pci-bridge')
    .reduce((n, c) => n + countFree(c, buses), 0);
  // A bridge takes a root port of its own; it is added after the ports, as it must sit on a lower index.
  const addBridge = legacy > freeBridgeSlots;
  pcie += pciCtrls.filter((c) => !c.address && c.model === 'pcie-to-pci-bridge').length + (addBridge ? 1 : 0);
  const freePorts = pciCtrls.filter((c) => (c.model === 'pcie-root-port' || c.model === 'pcie-switch-downstream-port') && countFree(c, buses) > 0).length;
  const missing = Math.max(pcie - freePorts, 0);
  for (let k = 0; k < missing; k++) add('pcie-root-port');
  if (addBridge) add('pcie-to-pci-bridge');
  if (!hadPciControllers && (missing > 0 || addBridge)) add('pcie-root-port');
}

/** Free slots of a bridge's bus (a root port: 1 or 0). */
function countFree(c: ControllerDef, buses: Buses): number {
  const rules = BUS_RULES[c.model as PciModel];
  let n = 0;
  for (let slot = rules.minSlot; slot <= rules.maxSlot; slot++) if (buses.slotFree(c.index, slot)) n++;
  return n;
}

/**
 * libvirt's defaults: a root port's chassis is its index, its port (slot << 3 | function); a
 * downstream port's chassis its index, its port its slot; a pci-bridge's chassis_nr its index.
 */
function completeControllerTarget(c: ControllerDef): void {
  const a = c.address!;
  if (c.model === 'pcie-root-port') {
    c.chassis ??= c.index;
    c.port ??= (a.slot << 3) | a.function;
  }
  if (c.model === 'pcie-switch-downstream-port') {
    c.chassis ??= c.index;
    c.port ??= a.slot;
  }
  if (c.model === 'pci-bridge') c.chassisNr ??= c.index;
}

/**
 * An expander bus starts its bus numbers at busNr, below those of the buses the firmware numbers
 * from 0 up; libvirt gives them 254, 252, ... (two apart: each has a bus of its own behind it).
 */
function completeBusNumbers(controllers: ControllerDef[]): void {
  const expanders = controllers.filter((c) => c.model === 'pci-expander-bus' || c.model === 'pcie-expander-bus').sort((x, y) => x.index - y.index);
  let lowest = Math.min(256, ...expanders.flatMap((c) => (c.busNr === undefined ? [] : [c.busNr])));
  for (const c of expanders) {
    if (c.busNr !== undefined) continue;
    lowest -= 2;
    if (lowest <= 2) throw fail('unsupported_value', c.element ?? DEVICES, 'no bus number is left below the other expander buses');
    c.busNr = lowest;
  }
}
