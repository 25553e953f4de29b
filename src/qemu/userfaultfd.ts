/**
 * Whether this host's qemus can receive a postcopy stream, and how they are let. A destination's
 * qemu takes the pages it still lacks through a userfaultfd that handles faults in kernel mode
 * too; the kernel gives one to a process with CAP_SYS_PTRACE, to any process while
 * vm.unprivileged_userfaultfd is 1, and (Linux 6.1 and later) through /dev/userfaultfd to whoever
 * holds that device open. The agent's qemus run unprivileged, so where the sysctl is 0 (Debian's
 * default) the agent opens the device and hands the descriptor to the one qemu that receives a
 * postcopy, with a preload for qemu 7.2, which does not know the device (userfaultfd-preload.c).
 * That is the grant libvirt gives qemu 8.1 and later; it covers the qemu's own memory only.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { packageRoot } from '../agent/package-root.js';

export const USERFAULTFD_DEVICE = '/dev/userfaultfd';
const SYSCTL = '/proc/sys/vm/unprivileged_userfaultfd';
/** Built by scripts/build-native.sh (npm run build). */
export const USERFAULTFD_PRELOAD = path.join(packageRoot, 'dist', 'native', 'userfaultfd-preload.so');

export type UserfaultfdAccess =
  /** qemu runs as root: it may use userfaultfd as it is. */
  | { via: 'privileged' }
  /** vm.unprivileged_userfaultfd=1: every process may. */
  | { via: 'sysctl' }
  /** The agent hands a receiving qemu the device, opened, and the preload that uses it. */
  | { via: 'device'; preload: string }
  | { via: 'none'; reason: string };

/** What a qemu needs to be started with to use the device (see launchQemu). */
export interface UserfaultfdGrant {
  deviceFd: number;
  preload: string;
}

export async function userfaultfdAccess(o: { qemuPrivileged: boolean; refused: boolean; preload?: string }): Promise<UserfaultfdAccess> {
  if (o.refused) return { via: 'none', reason: 'this agent runs with --no-postcopy: its qemus receive no postcopy stream' };
  if (o.qemuPrivileged) return { via: 'privileged' };
  if ((await fsp.readFile(SYSCTL, 'utf8').catch(() => '0')).trim() === '1') return { via: 'sysctl' };
  const preload = o.preload ?? USERFAULTFD_PRELOAD;
  let missing: string | undefined;
  try {
    fs.closeSync(openUserfaultfdDevice());
  } catch (err) {
    missing = `${USERFAULTFD_DEVICE} does not open here (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; Linux 6.1 and later have it, and only root opens it)`;
  }
  if (!missing && !fs.existsSync(preload)) missing = `${preload} is not built (npm run build builds it with a C compiler)`;
  if (!missing) return { via: 'device', preload };
  return {
    via: 'none',
    reason:
      `qemu takes a postcopy's missing pages through userfaultfd, which this kernel gives an unprivileged process only with sysctl vm.unprivileged_userfaultfd=1 ` +
      `or through ${USERFAULTFD_DEVICE}, and ${missing}`,
  };
}

export function openUserfaultfdDevice(): number {
  return fs.openSync(USERFAULTFD_DEVICE, fs.constants.O_RDWR);
}

/** One line for GET /host. */
export function describeUserfaultfdAccess(a: UserfaultfdAccess): string {
  switch (a.via) {
    case 'privileged':
      return 'qemu runs as root and may use userfaultfd';
    case 'sysctl':
      return 'vm.unprivileged_userfaultfd=1: every process may use userfaultfd';
    case 'device':
      return `a receiving qemu is handed ${USERFAULTFD_DEVICE}, opened by the agent, for that migration`;
    case 'none':
      return a.reason;
  }
}
