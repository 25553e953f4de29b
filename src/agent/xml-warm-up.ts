/**
 * The domain XML parser's code, compiled before the first request needs it: in a fresh thread a
 * common guest's parse + normalize takes several times what it takes warm (bench/xml-parse.ts
 * prints both). XmlPool's thread parses a guest as virt-install writes it WARM_UP_PARSES times
 * as it starts, one parse per turn of its event loop, so that a document arriving meanwhile
 * waits for one parse at most.
 */
import { randomBytes } from 'node:crypto';
import { normalizeDomainXml } from '../domain/index.js';

const WARM_UP_PARSES = 60;

export const WARM_UP_XML = `<domain type="kvm">
  <name>warm-up</name>
  <memory unit="MiB">1024</memory>
  <vcpu>2</vcpu>
  <os><type arch="x86_64" machine="q35">hvm</type><boot dev="hd"/></os>
  <features><acpi/><apic/></features>
  <cpu mode="host-model"/>
  <clock offset="utc"><timer name="rtc" tickpolicy="catchup"/><timer name="hpet" present="no"/></clock>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" discard="unmap"/>
      <source file="/var/lib/libvirt/images/warm-up.qcow2"/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <disk type="file" device="cdrom">
      <driver name="qemu" type="raw"/>
      <target dev="sda" bus="sata"/>
      <readonly/>
    </disk>
    <controller type="usb" model="qemu-xhci"/>
    <controller type="pci" model="pcie-root"/>
    <controller type="pci" model="pcie-root-port"/>
    <controller type="pci" model="pcie-root-port"/>
    <interface type="user"><model type="virtio"/></interface>
    <serial type="pty"/>
    <console type="pty"/>
    <input type="tablet" bus="usb"/>
    <graphics type="vnc" port="-1"/>
    <video><model type="virtio"/></video>
    <memballoon model="virtio"/>
    <rng model="virtio"><backend model="random">/dev/urandom</backend></rng>
  </devices>
</domain>`;

export const WARM_UP_HOST = { machineAliases: { q35: 'pc-q35-7.2' }, knownMachines: ['pc-q35-7.2'], firmwares: [], randomBytes };

/** Runs in the background of the calling thread; never throws (the warm-up only speeds, a refusal still compiles most of the code). */
export function warmUpParser(parses = WARM_UP_PARSES): void {
  if (parses <= 0) return;
  try {
    normalizeDomainXml(WARM_UP_XML, WARM_UP_HOST);
  } catch {
    // A test asserts the sample is accepted; here a refusal must not end the thread.
  }
  setImmediate(warmUpParser, parses - 1).unref();
}
