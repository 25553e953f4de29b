/** What the benchmarks share: a scratch directory, clean-up also when interrupted, medians. */
import { promises as fs } from 'node:fs';
import { parseArgs } from 'node:util';
import { mkdtempForAgents } from '../src/agent/qemu-user.js';
import type { AgentConfig } from '../src/config.js';
import type { GuestParams } from '../src/guest/image.js';
import type { TestContext } from '../test/helpers/agents.js';

export interface BenchRun extends TestContext {
  dir: string;
  /** Registers a clean-up; they run last-first when the run ends, however it ends. */
  onEnd(fn: () => Promise<unknown>): void;
}

/** Runs `body` in a fresh scratch directory; Ctrl-C or a timeout ends its qemus and removes its files all the same. */
export async function benchRun(body: (run: BenchRun) => Promise<void>): Promise<void> {
  const dir = await mkdtempForAgents('kvm-migrate-bench-');
  const cleanups: Array<() => Promise<unknown>> = [];
  const cleanUp = async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
  };
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.once(signal, () => void cleanUp().finally(() => process.exit(130)));
  }
  const onEnd = (fn: () => Promise<unknown>) => void cleanups.push(fn);
  try {
    // The tests' agent factory registers its teardowns here.
    await body({ dir, onEnd, teardown: (fn) => onEnd(async () => fn()) });
  } finally {
    await cleanUp();
  }
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** --rounds N --fill-mib M --accel auto|kvm|tcg: the guest filled, a small hot set, no serial chatter. */
export function benchOptions(): { rounds: number; params: GuestParams; accel: AgentConfig['accel'] } {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '5' },
      'fill-mib': { type: 'string', default: '1024' },
      accel: { type: 'string', default: 'auto' },
    },
  });
  return {
    rounds: Number(values.rounds),
    params: { fillMiB: Number(values['fill-mib']), hotMiB: 1, reportEvery: 0 },
    accel: values.accel as AgentConfig['accel'],
  };
}
