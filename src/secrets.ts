import { timingSafeEqual } from 'node:crypto';

/** A presented secret against the expected one, in time that does not tell how much matched. */
export function secretsMatch(presented: string | undefined, expected: string): boolean {
  if (!presented) return false;
  const a = Buffer.from(presented);
  const b = Buffer.from(expected);
  return a.length === b.length && timingSafeEqual(a, b);
}
