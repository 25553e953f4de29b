/** What GET /host answers, and what each side of a migration says of its own host. */
import type { AccelChoice } from './qemu/accel-probe.js';
import type { StateStore } from './store/state-store.js';

export interface HostInfo {
  uuid: string;
  hostname: string;
  qemuVersion: string;
  qemuBinary: string;
  accelerator: 'kvm' | 'tcg';
  kvmUsable: boolean;
  /** Whom guests' qemu runs as. */
  qemuUser: string;
  /** The UEFI firmware images of qemu's descriptors, in the order `<os firmware='efi'>` tries them. */
  firmwares: string[];
  /** A guest may have an emulated `<tpm>` (swtpm is installed). */
  tpmEmulator: boolean;
  protocolVersions: number[];
  machineAliases: Record<string, string>;
  migrationAddress: string;
  migrationPorts: string;
  /** The most multifd channels one migration uses here, either way (see params.ts channelLimit). */
  migrationChannels: number;
  /** Whether this host's qemus can receive a postcopy stream, and how (see src/qemu/userfaultfd.ts). */
  postcopy: { receives: boolean; how: string };
  quarantined: StateStore['quarantined'];
  accelProbe: AccelProbeReport;
}

/** The start-time measurement behind --accel auto (see src/qemu/accel-probe.ts). */
export type AccelProbeReport =
  | { state: 'not-measured'; reason: string }
  | { state: 'measuring' }
  | ({ state: 'measured'; kvmSlow: boolean } & AccelChoice);
