/**
 * Benchmark (not a test): one durable record write, the way the job registry makes it, with the
 * record pool (one slot overwritten, one fdatasync) against the temp file + fsync + rename +
 * directory fsync it replaced, alternated in one run on the same file system.
 *
 *   node dist/bench/record-store.js [--rounds N]
 *
 * Each round creates a record, rewrites it three times (as a job moves through its phases) and
 * removes it, once per method; a job record of a completed migration is the payload.
 */
import path from 'node:path';
import { promises as fs } from 'node:fs';
import { parseArgs } from 'node:util';
import { benchRun, median } from './harness.js';
import { removeDurably, writeFileAtomic } from '../src/store/atomic.js';
import { RecordPool } from '../src/store/record-pool.js';

const { values } = parseArgs({ options: { rounds: { type: 'string', default: '200' } } });
const rounds = Number(values.rounds);

/** The shape and size of a source job record at its end. */
function jobRecord(round: number, phase: string): Record<string, unknown> {
  const at = new Date().toISOString();
  const phases = ['preparing', 'prepared', 'streaming', 'stream-completed', 'asking-outcome', 'confirmed', 'done'];
  return {
    id: `bench-${round}`, role: 'source', domain: 'vm1', uuid: '6d2c5f3e-2a1b-4c3d-9e8f-0a1b2c3d4e5f', status: 'running', phase,
    options: { live: true, bandwidthMiBps: 0, downtimeLimitMs: 300, multifdChannels: 8, persistDestination: true, undefineSource: false },
    peer: { url: 'http://127.0.0.2:8080', hostUuid: '0b7d4c1e-3f5a-4b6c-8d9e-1f2a3b4c5d6e', hostname: 'host-b' },
    uri: 'tcp:127.0.0.2:49152', createdAt: at, updatedAt: at,
    phaseHistory: phases.map((p) => ({ phase: p, at })),
    timings: { prepare2Ms: 118, firstByteMs: 139, setupMs: 21, qemuTotalMs: 231, qemuDowntimeMs: 80, switchoverMs: 95, streamEndToRunningMs: 20 },
    stats: { qemuStatus: 'completed', transferredBytes: 280_000_000, remainingBytes: 0, totalBytes: 1_074_000_000, throughputBytesPerSec: 1.2e9, dirtyPagesRate: 0, iterations: 2, percent: 100 },
    transport: { multifdChannels: 8, compression: 'none', xbzrle: false },
    finishToken: 'f'.repeat(43),
  };
}

async function main(): Promise<void> {
  await benchRun(async (run) => {
    const renameDir = path.join(run.dir, 'rename');
    const poolDir = path.join(run.dir, 'pool');
    await fs.mkdir(renameDir);
    await fs.mkdir(poolDir);
    const pool = new RecordPool(poolDir);
    await pool.load();
    run.onEnd(() => pool.close());
    // Let the pool make its spares, as a running agent has them.
    await new Promise((r) => setTimeout(r, 1500));

    const renameMs: number[] = [];
    const poolMs: number[] = [];
    const timed = async (into: number[], write: () => Promise<void>) => {
      const t0 = performance.now();
      await write();
      into.push(performance.now() - t0);
    };
    const steps = ['preparing', 'streaming', 'asking-outcome', 'done'];
    for (let round = 0; round < rounds; round++) {
      const id = `bench-${round}`;
      const file = path.join(renameDir, `${id}.json`);
      const viaRename = async () => {
        for (const phase of steps) await timed(renameMs, () => writeFileAtomic(file, JSON.stringify(jobRecord(round, phase), null, 2) + '\n'));
        await removeDurably(file);
      };
      const viaPool = async () => {
        for (const phase of steps) await timed(poolMs, () => pool.save(id, jobRecord(round, phase)));
        await pool.remove(id);
      };
      // Which goes first alternates.
      if (round % 2 === 0) {
        await viaRename();
        await viaPool();
      } else {
        await viaPool();
        await viaRename();
      }
    }
    const p90 = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * 0.9)]!;
    process.stdout.write(`${rounds} rounds, ${steps.length} writes each (a create and three rewrites of a job record)\n`);
    process.stdout.write(`temp file + rename: median ${median(renameMs).toFixed(2)} ms, p90 ${p90(renameMs).toFixed(2)} ms\n`);
    process.stdout.write(`record pool:        median ${median(poolMs).toFixed(2)} ms, p90 ${p90(poolMs).toFixed(2)} ms\n`);
    process.stdout.write(`ratio (rename / pool, medians): ${(median(renameMs) / median(poolMs)).toFixed(2)}\n`);
  });
}

await main();
