/**
 * libvirt's cpuset syntax (`0-3,^2,8`): comma-separated CPU numbers and ranges, `^N` taking one
 * out again. Parsed to a sorted list; written back in the shortest range form (`0-1,3`), which
 * is what `-numa node,cpus=` (one key per range) and `taskset -c` take.
 */

export const MAX_CPUSET_CPU = 4095;

/** The CPUs of a cpuset string, ascending; undefined when it is not valid or names none. */
export function parseCpuset(value: string, max = MAX_CPUSET_CPU): number[] | undefined {
  const set = new Set<number>();
  const excluded = new Set<number>();
  const items = value.split(',').map((s) => s.trim());
  for (const item of items) {
    let m: RegExpExecArray | null;
    if ((m = /^\^([0-9]{1,5})$/.exec(item))) {
      excluded.add(Number(m[1]));
    } else if ((m = /^([0-9]{1,5})(?:-([0-9]{1,5}))?$/.exec(item))) {
      const lo = Number(m[1]);
      const hi = m[2] === undefined ? lo : Number(m[2]);
      if (hi < lo || hi > max) return undefined;
      for (let c = lo; c <= hi; c++) set.add(c);
    } else {
      return undefined;
    }
  }
  for (const c of excluded) set.delete(c);
  if (set.size === 0) return undefined;
  return [...set].sort((a, b) => a - b);
}

/** Contiguous runs of ascending CPUs: `[[0, 3], [5, 5]]`. */
export function cpuRanges(cpus: readonly number[]): [number, number][] {
  const ranges: [number, number][] = [];
  for (const c of cpus) {
    const last = ranges[ranges.length - 1];
    if (last && c === last[1] + 1) last[1] = c;
    else ranges.push([c, c]);
  }
  return ranges;
}

/** `0-3,5`: each run as `lo-hi` (or one number), comma-separated. */
export function formatCpuset(cpus: readonly number[]): string {
  return cpuRanges(cpus).map(([lo, hi]) => (lo === hi ? String(lo) : `${lo}-${hi}`)).join(',');
}
