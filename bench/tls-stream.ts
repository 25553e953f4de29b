/**
 * Benchmark (not a test): the same guest migrated by a pair of plain agents and by a pair of
 * agents with TLS (mutual TLS between them, qemu's stream over TLS), alternated in one run, each
 * on the agents' default transport (multifd on as many channels as both agents allow: one per
 * core) and on one stream (`multifdChannels: 1`).
 *
 *   node dist/bench/tls-stream.js [--rounds N] [--fill-mib M] [--accel auto|kvm|tcg]
 *
 * Each pair migrates its own guest back and forth; while one guest is measured the other is
 * paused. Every configuration runs once per round, the order rotating each round. Reported per
 * configuration: end-to-end time, qemu's own stream time, and the stream's throughput (bytes
 * qemu sent over its stream time), medians, the transport the agents agreed (the job's record),
 * and TLS against plain on each transport.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import path from 'node:path';
import type { AgentConfig } from '../src/config.js';
import type { JobRecord } from '../src/migration/jobs.js';
import type { MigrationOptions } from '../src/migration/params.js';
import { benchOptions, benchRun, median } from './harness.js';
import { packageRoot } from '../src/agent/package-root.js';
import { GUEST_STATE_RUNNING, guestMemoryMiB, readGuestStatus } from '../src/guest/image.js';
import { startAgent, testGuest, type TestAgent } from '../test/helpers/agents.js';

const { rounds, params, accel } = benchOptions();
const MiB = 1024 * 1024;

/** A pair of agents and the guest it migrates back and forth. */
interface Pair {
  mode: 'plain' | 'tls';
  agents: [TestAgent, TestAgent];
  guest: string;
  migrations: number;
}

/** A pair on one transport: the agents' default, or one stream. */
interface Config {
  name: string;
  pair: Pair;
  options: Partial<MigrationOptions>;
  transport: Set<string>;
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
    const pairs: Pair[] = [
      { mode: 'plain', agents: await pair(['plaina', 'plainb'], ['127.0.0.2', '127.0.0.3'], 49152, false), guest: 'bench-plain', migrations: 0 },
      { mode: 'tls', agents: await pair(['tlsa', 'tlsb'], ['127.0.0.4', '127.0.0.5'], 49170, true), guest: 'bench-tls', migrations: 0 },
    ];
    for (const p of pairs) {
      const [a] = p.agents;
      await a.client.define((await testGuest(dir, p.guest, params, { memoryMiB })).xml);
      await a.client.lifecycle(p.guest, 'start');
      const qmp = a.app.agent.domains.get(p.guest).run!.qmp;
      for (let i = 0; i < 6000 && (await readGuestStatus(qmp)).state !== GUEST_STATE_RUNNING; i++) await new Promise((r) => setTimeout(r, 100));
      await a.client.lifecycle(p.guest, 'suspend');
    }
    const [plainPair, tlsPair] = pairs as [Pair, Pair];
    const config = (name: string, p: Pair, options: Partial<MigrationOptions>): Config => ({ name, pair: p, options, transport: new Set(), endToEndMs: [], streamMs: [], mibPerSec: [] });
    const configs: Config[] = [
      config('plain-default', plainPair, {}),
      config('tls-default', tlsPair, {}),
      config('plain-1-channel', plainPair, { multifdChannels: 1 }),
      config('tls-1-channel', tlsPair, { multifdChannels: 1 }),
    ];
    const host = await plainPair.agents[0].client.host();
    process.stdout.write(
      `guest ${memoryMiB} MiB (${params.fillMiB} MiB filled), accel ${host.accelerator}, agents' channel limit ${host.migrationChannels}, ` +
        `${rounds} rounds (+2 warm-ups) of ${configs.map((c) => c.name).join(', ')}\n`,
    );

    const measure = async (c: Config, counted: boolean): Promise<string> => {
      const p = c.pair;
      const [from, to] = p.migrations % 2 === 0 ? p.agents : [p.agents[1], p.agents[0]];
      p.migrations++;
      await from.client.lifecycle(p.guest, 'resume');
      const t0 = performance.now();
      const { job } = await from.client.perform({ domain: p.guest, destination: to.url, ...c.options }, true);
      const ms = performance.now() - t0;
      if (job.status !== 'completed') throw new Error(`${c.name} migration ${job.status}: ${job.error?.message}`);
      await to.client.lifecycle(p.guest, 'suspend');
      // qemu's stream time when it reported one (see issue 13: sometimes 0), else end-to-end.
      const stream = job.timings.qemuTotalMs || ms;
      const rate = (job.stats?.transferredBytes ?? 0) / MiB / (stream / 1000);
      const t = (job as JobRecord).transport;
      const transport = !t ? 'transport not reported' : t.multifd ? `multifd ${t.channels}` : 'one stream';
      c.transport.add(transport);
      if (counted) {
        c.endToEndMs.push(ms);
        c.streamMs.push(stream);
        c.mibPerSec.push(rate);
      }
      return `${c.name} ${ms.toFixed(0)} ms (stream ${stream.toFixed(0)} ms, ${rate.toFixed(0)} MiB/s, ${transport})`;
    };
    const warmUp = 2;
    for (let round = 0; round < rounds + warmUp; round++) {
      const shift = round % configs.length;
      const order = [...configs.slice(shift), ...configs.slice(0, shift)];
      const lines = [];
      for (const c of order) lines.push(await measure(c, round >= warmUp));
      process.stdout.write(`${round < warmUp ? 'warm-up' : `round ${round - warmUp + 1}`}: ${lines.join('  ')}\n`);
    }
    const range = (xs: number[]) => `${Math.min(...xs).toFixed(0)}-${Math.max(...xs).toFixed(0)}`;
    for (const c of configs) {
      process.stdout.write(
        `${c.name} (${[...c.transport].join(', ')}): median end-to-end ${median(c.endToEndMs).toFixed(0)} ms (${range(c.endToEndMs)}), ` +
          `stream ${median(c.streamMs).toFixed(0)} ms (${range(c.streamMs)}), ${median(c.mibPerSec).toFixed(0)} MiB/s; around the stream ${median(c.endToEndMs.map((ms, i) => ms - c.streamMs[i]!)).toFixed(0)} ms\n`,
      );
    }
    for (const transport of ['default', '1-channel']) {
      const plain = configs.find((c) => c.name === `plain-${transport}`)!;
      const tls = configs.find((c) => c.name === `tls-${transport}`)!;
      process.stdout.write(
        `tls/plain, ${transport}: stream time ${(median(tls.streamMs) / median(plain.streamMs)).toFixed(2)}x, throughput ${(median(tls.mibPerSec) / median(plain.mibPerSec)).toFixed(2)}x, ` +
          `end-to-end ${(median(tls.endToEndMs) / median(plain.endToEndMs)).toFixed(2)}x\n`,
      );
    }
  });
}

await main();
