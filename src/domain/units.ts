/**
 * libvirt's scaled integers (`<memory unit='MiB'>64</memory>`). Spellings follow libvirt's
 * virScaleInteger: case-insensitive; `b`/`byte`/`bytes`; `k`, `m`, `g`, `t`, `p`, `e` alone or
 * with `iB` are powers of 1024, with `B` powers of 1000. Arithmetic is BigInt so that EiB
 * values cannot lose precision before the bounds checks.
 */

const POWERS = ['k', 'm', 'g', 't', 'p', 'e'];

/** Bytes per unit; throws RangeError for an unknown unit. */
export function unitToBytes(unit: string): bigint {
  const u = unit.toLowerCase();
  if (u === 'b' || u === 'byte' || u === 'bytes') return 1n;
  const power = POWERS.indexOf(u.charAt(0)) + 1;
  if (power === 0) throw new RangeError(`unknown unit '${unit}'`);
  const suffix = u.slice(1);
  if (suffix === '' || suffix === 'ib') return 1024n ** BigInt(power);
  if (suffix === 'b') return 1000n ** BigInt(power);
  throw new RangeError(`unknown unit '${unit}'`);
}

/** `value` (a non-negative decimal integer) in `unit` (libvirt's default: KiB) as bytes. */
export function scaledToBytes(value: string, unit: string | undefined): bigint {
  if (!/^[0-9]+$/.test(value)) throw new RangeError(`'${value}' is not a non-negative integer`);
  return BigInt(value) * unitToBytes(unit ?? 'KiB');
}

/** Bytes to KiB, rounding up to a whole KiB as libvirt does. */
export function bytesToKiBCeil(bytes: bigint): bigint {
  return (bytes + 1023n) / 1024n;
}

/** KiB rounded up to a whole MiB, still in KiB (what `-m size=...k` receives). */
export function kibRoundUpToMiB(kib: number): number {
  return Math.ceil(kib / 1024) * 1024;
}
