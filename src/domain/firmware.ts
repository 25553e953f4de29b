/**
 * Which firmware `<os firmware='efi'>` means on this host: the first of qemu's firmware
 * descriptors (in their priority order) that fits the machine type and what the XML asks for,
 * as libvirt chooses. Pure: the descriptors are read by the host (src/qemu/firmware.ts).
 */
import type { FirmwareDescriptor, FirmwareFeature, OsDef } from './model.js';
import { fail } from './walk.js';

/** What the XML asks of the firmware beyond its kind: each only when the XML says it. */
export interface FirmwareRequest {
  machine: string;
  loaderType?: 'pflash' | 'rom';
  /** `<loader secure>`: yes needs a firmware that requires SMM (its flash is SMM-guarded), no one that does not. */
  secure?: boolean;
  template?: string;
  features: Partial<Record<FirmwareFeature, boolean>>;
  /** `<smm state>`: off rules out a firmware that requires SMM. */
  smm?: boolean;
}

export interface ChosenFirmware {
  descriptor: FirmwareDescriptor;
  loader: Required<Pick<NonNullable<OsDef['loader']>, 'path' | 'type' | 'readonly' | 'secure'>>;
  template?: string;
  /** The firmware runs only with SMM on: the domain gets `<smm state='on'/>`. */
  requiresSmm: boolean;
  /** Both named features, as the chosen firmware has them (libvirt writes them back so). */
  features: Record<FirmwareFeature, boolean>;
}

const globToRegExp = (glob: string) => new RegExp(`^${glob.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`);

export function firmwareMatches(d: FirmwareDescriptor, req: FirmwareRequest): boolean {
  if (!d.interfaceTypes.includes('uefi')) return false;
  if (!d.machines.some((m) => globToRegExp(m).test(req.machine))) return false;
  if (req.loaderType !== undefined && (req.loaderType === 'pflash') !== (d.device === 'flash')) return false;
  const requiresSmm = d.features.includes('requires-smm');
  if (req.secure !== undefined && req.secure !== requiresSmm) return false;
  if (req.smm === false && requiresSmm) return false;
  if (req.template !== undefined && req.template !== d.nvramTemplate) return false;
  return Object.entries(req.features).every(([name, wanted]) => d.features.includes(name) === wanted);
}

export function selectFirmware(req: FirmwareRequest, descriptors: FirmwareDescriptor[], element: string): ChosenFirmware {
  const d = descriptors.find((x) => firmwareMatches(x, req));
  if (!d) {
    const asked = [
      `machine ${req.machine}`,
      ...Object.entries(req.features).map(([name, on]) => `${on ? '' : 'no '}${name}`),
      ...(req.secure !== undefined ? [req.secure ? 'secure loader' : 'loader not secure'] : []),
      ...(req.smm === false ? ['SMM off'] : []),
      ...(req.template !== undefined ? [`template ${req.template}`] : []),
    ].join(', ');
    const known = descriptors.length === 0 ? 'this host has no firmware descriptors (Debian: apt-get install ovmf)' : `this host has ${descriptors.map((x) => x.file).join(', ')}`;
    throw fail('firmware_not_found', element, `no UEFI firmware of this host fits (${asked}); ${known}`);
  }
  const requiresSmm = d.features.includes('requires-smm');
  return {
    descriptor: d,
    loader: { path: d.executable, type: d.device === 'flash' ? 'pflash' : 'rom', readonly: true, secure: requiresSmm },
    ...(d.device === 'flash' && d.nvramTemplate !== undefined ? { template: d.nvramTemplate } : {}),
    requiresSmm,
    features: { 'enrolled-keys': d.features.includes('enrolled-keys'), 'secure-boot': d.features.includes('secure-boot') },
  };
}

/** The variable-store template of a loader named by path: that of the descriptor whose code it is. */
export function templateOf(loaderPath: string, descriptors: FirmwareDescriptor[]): string | undefined {
  return descriptors.find((d) => d.device === 'flash' && d.executable === loaderPath && d.nvramTemplate !== undefined)?.nvramTemplate;
}
