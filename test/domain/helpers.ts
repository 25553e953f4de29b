/** Shared fixtures for the domain tests: a deterministic host and a refusal matcher. */
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DomainXmlError } from '../../src/errors.js';
import type { HostSettings, NormalizeHost } from '../../src/domain/index.js';

/** The XML sources stay in test/; the compiled tests run from dist/test/domain. */
export const FIXTURES = fileURLToPath(new URL('../../../test/domain/fixtures/', import.meta.url));

export const fixtureNames = (): string[] =>
  readdirSync(FIXTURES).filter((f) => f.endsWith('.xml') && !f.endsWith('.normalized.xml')).map((f) => f.slice(0, -4)).sort();

export const readFixture = (file: string): string => readFileSync(FIXTURES + file, 'utf8');

/** randomBytes that fills call N with the byte N: stable ids, different per call. */
export function countingHost(): NormalizeHost {
  let calls = 0;
  return {
    machineAliases: { pc: 'pc-i440fx-7.2', q35: 'pc-q35-7.2' },
    knownMachines: ['pc-i440fx-7.2', 'pc-q35-7.2', 'pc-i440fx-6.2'],
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
