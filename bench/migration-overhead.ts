/**
 * Benchmark (not a test): end-to-end agent-driven migration of one guest vs a raw QEMU
 * migration of the same guest, started by hand with the same argv, alternated in one run.
 *
 *   node dist/bench/migration-overhead.js [--rounds N] [--fill-mib M] [--accel auto|kvm|tcg]
 *
 * Agent: POST /perform?wait=true on the source agent -> answer (Prepare2, QMP set-up, stream,
 * Finish2, source qemu ended). Raw: start the destination qemu (-incoming defer), set the same
 * capabilities/parameters over QMP, migrate, wait for both ends, `cont` on the destination, end
 * the source qemu. Same argv builder, same guest, same loopback addresses. While one guest is
 * measured the other is paused, so the two never compete for the machine's cores.
 */
import os from 'node:os';
import path from 'node:path';
import { benchOptions, benchRun, median } from './harness.js';
import { buildArgv, normalizeDomainXml, type DomainDef } from '../src/domain/index.js';
import { launchQemu, killQemu, type QemuProcessRecord } from '../src/qemu/process.js';
import { probeQemu, resolveAccel } from '../src/qemu/host.js';
import type { QmpClient } from '../src/qemu/qmp.js';
import { channelLimit, destinationCapabilities, destinationParameters, offerTransport, sourceCapabilities, sourceParameters, DEFAULT_OPTIONS } from '../src/migration/params.js';
import { GUEST_STATE_RUNNING, guestMemoryMiB, readGuestStatus } from '../src/guest/image.js';
import { startAgent, testGuest, type TestAgent } from '../test/helpers/agents.js';

const { rounds, params, accel: accelMode } = benchOptions();
// The stream the agents' defaults agree on between two agents of this host: raw streams the same.
const transport = offerTransport(DEFAULT_OPTIONS, channelLimit(os.availableParallelism()));


async function waitGuestFilled(qmp: QmpClient): Promise<void> {
  for (let i = 0; i < 6000; i++) {
    if ((await readGuestStatus(qmp)).state === GUEST_STATE_RUNNING) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('guest did not finish filling its RAM');
}

async function waitMigration(qmp: QmpClient, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { status } = await qmp.execute<{ status?: string }>('query-migrate');
    if (status === 'completed') return;
    if (status === 'failed' || status === 'cancelled') throw new Error(`raw migration ${status}`);
    if (Date.now() > deadline) throw new Error('raw migration timed out');
    await qmp.waitForEvent('MIGRATION', { timeoutMs: 250 }).catch(() => undefined);
  }
}

interface RawGuest {
  record: QemuProcessRecord;
  qmp: QmpClient;
}

async function main(): Promise<void> {
  await benchRun(async (run) => {
    const { dir } = run;
    // One image each: a running qemu holds its disk's write lock.
    const memoryMiB = guestMemoryMiB(params) + 16;
    const agentGuest = await testGuest(dir, 'bench-agent', params, { memoryMiB });
    const rawGuest = await testGuest(dir, 'bench-raw', params, { memoryMiB });
    const qemu = await probeQemu();
    const accel = resolveAccel(accelMode, qemu.kvmUsable);
    process.stdout.write(`qemu ${qemu.version}, accel ${accel}, guest ${memoryMiB} MiB (${params.fillMiB} MiB filled), ${rounds} rounds each, both with ${JSON.stringify(transport)}\n`);

    // --- agent-driven ---
    // The tests' agent factory; what it arranges to end at teardown is ended by this run's clean-up.
        const agents: TestAgent[] = [];
    for (const [name, host, ports] of [
      ['a', '127.0.0.2', { low: 49152, high: 49160 }],
      ['b', '127.0.0.3', { low: 49161, high: 49170 }],
    ] as const) {
      const overrides = { listenHost: host, migrationAddress: host, migrationPorts: ports, accel: accelMode, incomingTimeoutSeconds: 120, maxIncoming: 1, maxOutgoing: 1 };
      agents.push(await startAgent(run, dir, name, overrides));
    }
    await agents[0]!.client.define(agentGuest.xml);
    await agents[0]!.client.lifecycle('bench-agent', 'start');

    // --- raw: the same domain model, argv from the same builder ---
    const { def } = normalizeDomainXml(rawGuest.xml, {
      machineAliases: qemu.machineAliases,
      knownMachines: qemu.knownMachines,
      firmwares: qemu.firmwares,
      randomBytes: (n) => Buffer.alloc(n, 7),
    });
    const rawLaunch = async (tag: string, incoming: boolean): Promise<RawGuest> => {
      const host = {
        qemuBinary: qemu.binary,
        accel,
        qmpSocketPath: path.join(dir, `raw-${tag}.qmp`),
        pidfilePath: path.join(dir, `raw-${tag}.pid`),
      };
      const g = await launchQemu({
        binary: qemu.binary,
        argv: buildArgv(def as DomainDef, host, { incoming }),
        logPath: path.join(dir, `raw-${tag}.log`),
        pidfilePath: host.pidfilePath,
        qmpSocketPath: host.qmpSocketPath,
      });
      run.onEnd(() => killQemu(g.record, { graceMs: 500 }));
      return g;
    };
    let raw = await rawLaunch('0', false);
    await raw.qmp.execute('cont');

    // Both guests fill their RAM before any round, so every round moves the same data.
    await waitGuestFilled(raw.qmp);
    await waitGuestFilled(agents[0]!.app.agent.domains.get('bench-agent').run!.qmp);

    const agentMs: number[] = [];
    const rawMs: number[] = [];
    // End-to-end minus qemu's own stream time (when qemu reports one): the cost around the stream.
    const agentAroundMs: number[] = [];
    const rawAroundMs: number[] = [];
    // The first two rounds (one each way) are warm-ups, not counted: the run's first migration
    // is 3-4x slower inside qemu's own stream time, whichever side goes first (a host effect).
    const warmUp = 2;
    const rawHosts = ['127.0.0.3', '127.0.0.2'];
    const agentGuestOn = () => agents.find((a) => a.app.agent.domains.find('bench-agent')?.run)!;

    // Only the guest being measured runs: the other one's busy vCPU would compete for the cores.
    const measureAgent = async (round: number) => {
      const [from, to] = round % 2 === 0 ? [agents[0]!, agents[1]!] : [agents[1]!, agents[0]!];
      await from.client.lifecycle('bench-agent', 'resume');
      const t0 = performance.now();
      const { job } = await from.client.perform({ domain: 'bench-agent', destination: to.url }, true);
      const ms = performance.now() - t0;
      if (job.status !== 'completed') throw new Error(`agent migration ${job.status}: ${job.error?.message}`);
      await to.client.lifecycle('bench-agent', 'suspend');
      if (round >= warmUp) agentMs.push(ms);
      if (round >= warmUp && job.timings.qemuTotalMs) agentAroundMs.push(ms - job.timings.qemuTotalMs);
      // Where the agent's time went: from each phase to the next (the request's own trip before).
      const at = job.phaseHistory.map((p) => Date.parse(p.at));
      const phases = job.phaseHistory
        .slice(0, -1)
        .map((p, i) => `${p.phase} ${at[i + 1]! - at[i]!}`)
        .join(', ');
      return (
        `agent ${ms.toFixed(0)} ms (qemu stream ${job.timings.qemuTotalMs} ms, downtime ${job.timings.qemuDowntimeMs} ms, ` +
        `switch-over ${job.timings.switchoverMs} ms; phases ms: ${phases})`
      );
    };
    const measureRaw = async (round: number) => {
      await raw.qmp.execute('cont');
      const t0 = performance.now();
      const dest = await rawLaunch(String(round + 1), true);
      await dest.qmp.execute('migrate-set-capabilities', { capabilities: destinationCapabilities(transport) });
      await dest.qmp.execute('migrate-set-parameters', destinationParameters(transport));
      const uri = `tcp:${rawHosts[round % 2]}:${49180 + (round % 2)}`;
      await dest.qmp.execute('migrate-incoming', { uri });
      await raw.qmp.execute('migrate-set-capabilities', { capabilities: sourceCapabilities(DEFAULT_OPTIONS, transport) });
      await raw.qmp.execute('migrate-set-parameters', sourceParameters(DEFAULT_OPTIONS, transport));
      await raw.qmp.execute('migrate', { uri });
      await waitMigration(raw.qmp, 600_000);
      const info = await raw.qmp.execute<{ 'total-time'?: number; downtime?: number }>('query-migrate');
      await waitMigration(dest.qmp, 600_000);
      await dest.qmp.execute('cont');
      await killQemu(raw.record, { qmp: raw.qmp, graceMs: 3000 });
      const ms = performance.now() - t0;
      raw = dest;
      await raw.qmp.execute('stop');
      if (round >= warmUp) rawMs.push(ms);
      if (round >= warmUp && info['total-time']) rawAroundMs.push(ms - info['total-time']);
      return `raw ${ms.toFixed(0)} ms (qemu stream ${info['total-time']} ms, downtime ${info.downtime} ms)`;
    };

    await raw.qmp.execute('stop');
    await agentGuestOn().client.lifecycle('bench-agent', 'suspend');
    for (let round = 0; round < rounds + warmUp; round++) {
      // Which one goes first alternates, so neither gains from what the other left behind.
      const agentFirst = round % 2 === 0;
      const first = agentFirst ? await measureAgent(round) : await measureRaw(round);
      const second = agentFirst ? await measureRaw(round) : await measureAgent(round);
      process.stdout.write(`${round < warmUp ? 'warm-up' : `round ${round - warmUp + 1}`}: ${first}  ${second}\n`);
    }
    const ratio = median(agentMs) / median(rawMs);
    process.stdout.write(`median agent ${median(agentMs).toFixed(0)} ms, median raw ${median(rawMs).toFixed(0)} ms, ratio ${ratio.toFixed(3)}\n`);
    process.stdout.write(
      `around the stream (end-to-end minus qemu's total-time; rounds where qemu reported one): ` +
        `agent median ${median(agentAroundMs).toFixed(0)} ms (n=${agentAroundMs.length}), raw median ${median(rawAroundMs).toFixed(0)} ms (n=${rawAroundMs.length})\n`,
    );
  });
}

await main();
