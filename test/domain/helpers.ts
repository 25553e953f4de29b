/** Shared fixtures for the domain tests: a deterministic host and a refusal matcher. */
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DomainXmlError } from '../../src/errors.js';
import type { FirmwareDescriptor, HostSettings, NormalizeHost } from '../../src/domain/index.js';

/** The XML sources stay in test/; the compiled tests run from dist/test/domain. */
export const FIXTURES = fileURLToPath(new URL('../../../test/domain/fixtures/', import.meta.url));

export const fixtureNames = (): string[] =>
  readdirSync(FIXTURES).filter((f) => f.endsWith('.xml') && !f.endsWith('.normalized.xml')).map((f) => f.slice(0, -4)).sort();

export const readFixture = (file: string): string => readFileSync(FIXTURES + file, 'utf8');

/** The firmware descriptors of Debian bookworm's ovmf package, in their priority order. */
export const DEBIAN_OVMF: FirmwareDescriptor[] = [
  {
    file: '/usr/share/qemu/firmware/40-edk2-x86_64-secure-enrolled.json', interfaceTypes: ['uefi'], device: 'flash',
    executable: '/usr/share/OVMF/OVMF_CODE_4M.ms.fd', nvramTemplate: '/usr/share/OVMF/OVMF_VARS_4M.ms.fd', machines: ['pc-q35-*'],
    features: ['acpi-s3', 'amd-sev', 'enrolled-keys', 'requires-smm', 'secure-boot', 'verbose-dynamic'],
  },
  {
    file: '/usr/share/qemu/firmware/50-edk2-x86_64-secure.json', interfaceTypes: ['uefi'], device: 'flash',
    executable: '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd', nvramTemplate: '/usr/share/OVMF/OVMF_VARS_4M.fd', machines: ['pc-q35-*'],
    features: ['acpi-s3', 'amd-sev', 'requires-smm', 'secure-boot', 'verbose-dynamic'],
  },
  {
    file: '/usr/share/qemu/firmware/60-edk2-x86_64.json', interfaceTypes: ['uefi'], device: 'flash',
    executable: '/usr/share/OVMF/OVMF_CODE_4M.fd', nvramTemplate: '/usr/share/OVMF/OVMF_VARS_4M.fd', machines: ['pc-i440fx-*', 'pc-q35-*'],
    features: ['acpi-s3', 'amd-sev', 'verbose-dynamic'],
  },
];

/** randomBytes that fills call N with the byte N: stable ids, different per call. */
export function countingHost(): NormalizeHost {
  let calls = 0;
  return {
    machineAliases: { pc: 'pc-i440fx-7.2', q35: 'pc-q35-7.2' },
    knownMachines: ['pc-i440fx-7.2', 'pc-q35-7.2', 'pc-i440fx-6.2'],
    firmwares: DEBIAN_OVMF,
    randomBytes: (n: number) => Buffer.alloc(n, ++calls),
  };
}

export const KVM_HOST: HostSettings = {
  qemuBinary: '/usr/bin/qemu-system-x86_64',
  accel: 'kvm',
  qmpSocketPath: '/run/kvm-migrate/qmp.sock',
  pidfilePath: '/run/kvm-migrate/qemu.pid',
  channelSocketPath: (id) => `/run/kvm-migrate/${id}.sock`,
  tapName: (id) => `kmtap-${id}`,
  hugepagesPath: '/dev/hugepages/kvm-migrate/guest',
  nvramPath: '/var/lib/kvm-migrate/nvram/guest.fd',
  tpmSocketPath: '/run/kvm-migrate/swtpm.sock',
  spicePort: 5900,
};
export const TCG_HOST: HostSettings = { ...KVM_HOST, accel: 'tcg' };

/** Runs fn and returns the DomainXmlError it throws (anything else fails the test). */
export function refusal(fn: () => unknown): DomainXmlError {
  try {
    fn();
  } catch (e) {
    if (e instanceof DomainXmlError) return e;
    throw e;
  }
  throw new Error('expected a DomainXmlError, but nothing was thrown');
}

export const UUID = '8f0e4d2c-6b1a-4c3e-9d5f-7a8b9c0d1e2f';
const HEAD = `<name>t1</name><uuid>${UUID}</uuid><memory unit='MiB'>64</memory><vcpu>1</vcpu>`;
const OS = `<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>`;

/** A valid small domain with parts replaced: the base for refusal and unit tests. */
export function domainXml(o: { attrs?: string; head?: string; os?: string; body?: string; devices?: string } = {}): string {
  return `<domain ${o.attrs ?? "type='kvm'"}>${o.head ?? HEAD}${o.os ?? OS}${o.body ?? ''}<devices>${o.devices ?? ''}</devices></domain>`;
}

export const VDA = `<disk type='file' device='disk'><source file='/v/a.img'/><target dev='vda' bus='virtio'/></disk>`;
export const NIC = (mac: string, extra = '') => `<interface type='user'><mac address='${mac}'/><model type='virtio'/>${extra}</interface>`;
