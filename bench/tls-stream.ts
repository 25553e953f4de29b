/**
 * Benchmark (not a test): the same guest migrated by a pair of plain agents and by a pair of
 * agents with TLS (mutual TLS between them, qemu's stream over TLS), alternated in one run.
 *
 *   node dist/bench/tls-stream.js [--rounds N] [--fill-mib M] [--accel auto|kvm|tcg]
 *
 * Each pair migrates its own guest back and forth; while one guest is measured the other is
 * paused. Reported per side: end-to-end time, qemu's own stream time, and the stream's
 * throughput (bytes qemu sent over its stream time), medians, and TLS against plain.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import path from 'node:path';
import type { AgentConfig } from '../src/config.js';
import { benchOptions, benchRun, median } from './harness.js';
import { packageRoot } from '../src/agent/package-root.js';
import { GUEST_STATE_RUNNING, guestMemoryMiB, readGuestStatus } from '../src/guest/image.js';
import { startAgent, testGuest, type TestAgent } from '../test/helpers/agents.js';

const { rounds, params, accel } = benchOptions();
const MiB = 1024 * 1024;


interface Side {
  name: 'plain' | 'tls';
  agents: [TestAgent, TestAgent];
  guest: string;
  round: number;
  endToEndMs: number[];
  streamMs: number[];
  mibPerSec: number[];
}

async function main(): Promise<void> {
  await benchRun(async (run) => {
    const { dir } = run;
    const certs = path.join(dir, 'certs');
    await promisify(execFile)('bash', [path.join(packageRoot, 'scripts', 'make-certs.sh'), certs, 'tlsa=127.0.0.4', 'tlsb=127.0.0.5']);
        const memoryMiB = guestMemoryMiB(params) + 16;
    const pair = async (names: [string, string], hosts: [string, string], low: number, tls: boolean): Promise<[TestAgent, TestAgent]> => {
      const made: TestAgent[] = [];
      for (const i of [0, 1] as const) {
        const name = names[i];
        const overrides: Partial<AgentConfig> = {
          listenHost: hosts[i],
          migrationAddress: hosts[i],
          migrationPorts: { low: low + i * 8, high: low + i * 8 + 7 },
          accel,
          incomingTimeoutSeconds: 120,
          ...(tls ? { token: `${name}-token`, tls: { certFile: path.join(certs, `${name}.pem`), keyFile: path.join(certs, `${name}-key.pem`), caFile: path.join(certs, 'ca.pem') } } : {}),
        };
        made.push(await startAgent(run, dir, name, overrides));
      }
      return made as [TestAgent, TestAgent];
    };
    const sides: Side[] = [
      { name: 'plain', agents: await pair(['plaina', 'plainb'], ['127.0.0.2', '127.0.0.3'], 49152, false), guest: 'bench-plain', round: 0, endToEndMs: [], streamMs: [], mibPerSec: [] },
      { name: 'tls', agents: await pair(['tlsa', 'tlsb'], ['127.0.0.4', '127.0.0.5'], 49170, true), guest: 'bench-tls', round: 0, endToEndMs: [], streamMs: [], mibPerSec: [] },
    ];
    for (const side of sides) {
      const [a] = side.agents;
      await a.client.define((await testGuest(dir, side.guest, params, { memoryMiB })).xml);
      await a.client.lifecycle(side.guest, 'start');
      const qmp = a.app.agent.domains.get(side.guest).run!.qmp;
      for (let i = 0; i < 6000 && (await readGuestStatus(qmp)).state !== GUEST_STATE_RUNNING; i++) await new Promise((r) => setTimeout(r, 100));
      await a.client.lifecycle(side.guest, 'suspend');
    }
    process.stdout.write(`guest ${memoryMiB} MiB (${params.fillMiB} MiB filled), accel ${(await sides[0]!.agents[0].client.host()).accelerator}, ${rounds} rounds each (+2 warm-ups)\n`);

    const measure = async (side: Side, counted: boolean): Promise<string> => {
      const [from, to] = side.round % 2 === 0 ? side.agents : [side.agents[1], side.agents[0]];
      side.round++;
      await from.client.lifecycle(side.guest, 'resume');
      const t0 = performance.now();
      const { job } = await from.client.perform({ domain: side.guest, destination: to.url }, true);
      const ms = performance.now() - t0;
      if (job.status !== 'completed') throw new Error(`${side.name} migration ${job.status}: ${job.error?.message}`);
      await to.client.lifecycle(side.guest, 'suspend');
      // qemu's stream time when it reported one (see issue 13: sometimes 0), else end-to-end.
      const stream = job.timings.qemuTotalMs || ms;
      const rate = (job.stats?.transferredBytes ?? 0) / MiB / (stream / 1000);
      if (counted) {
        side.endToEndMs.push(ms);
        side.streamMs.push(stream);
        side.mibPerSec.push(rate);
      }
      return `${side.name} ${ms.toFixed(0)} ms (stream ${stream.toFixed(0)} ms, ${rate.toFixed(0)} MiB/s)`;
    };
    const warmUp = 2;
    for (let round = 0; round < rounds + warmUp; round++) {
      const order = round % 2 === 0 ? sides : [...sides].reverse();
      const lines = [];
      for (const side of order) lines.push(await measure(side, round >= warmUp));
      process.stdout.write(`${round < warmUp ? 'warm-up' : `round ${round - warmUp + 1}`}: ${lines.join('  ')}\n`);
    }
    for (const side of sides) {
      process.stdout.write(
        `${side.name}: median end-to-end ${median(side.endToEndMs).toFixed(0)} ms, stream ${median(side.streamMs).toFixed(0)} ms, ${median(side.mibPerSec).toFixed(0)} MiB/s\n`,
      );
    }
    const [plain, tls] = sides as [Side, Side];
    process.stdout.write(`tls/plain: stream time ${(median(tls.streamMs) / median(plain.streamMs)).toFixed(2)}x, throughput ${(median(tls.mibPerSec) / median(plain.mibPerSec)).toFixed(2)}x\n`);
  });
}

await main();
