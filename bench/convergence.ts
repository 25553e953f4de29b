/**
 * Benchmark (not a test): a guest that rewrites all of its memory faster than the link carries
 * it, migrated in one run under qemu's own defaults (bounded, since it never completes), under
 * the agent's defaults (on a link this slow the stream is set up for postcopy, and the policy
 * switches to it), under the policy without postcopy, and with deadline action pause.
 *
 *   node dist/bench/convergence.js [--rounds N] [--mib M] [--bandwidth MiB/s] [--bound SECONDS]
 *       [--pause-per-gib SECONDS] [--accel auto|kvm|tcg]
 *
 * One guest (M MiB filled, all of it rewritten continuously), one pair of agents, the stream
 * limited to --bandwidth. Per round and side: whether it completed and in how long, qemu's
 * downtime, the pause the guest saw (timings.switchoverMs: from its vCPUs stopping to running
 * on the destination), and the policy's last step. "qemu defaults" is the agent with every
 * convergence step off: qemu's downtime-limit 300 ms, no auto-converge, no deadline; it is
 * cancelled after --bound seconds. "pre-copy only" is the default policy with allowPostcopy
 * false. "pause" sets completionTimeoutPerGiBSeconds to --pause-per-gib and deadlineAction pause,
 * without postcopy, to show what pause and finish costs the guest. A migration that switched to
 * postcopy paused its guest for qemu's downtime at the source plus the destination agent's time
 * from its qemu switching to the guest running (the switch's transit between the hosts is in
 * neither). The agents run qemu as by default, each as a user of its own.
 */
import { parseArgs } from 'node:util';
import type { AgentConfig } from '../src/config.js';
import type { MigrationOptions } from '../src/migration/params.js';
import type { JobRecord } from '../src/migration/jobs.js';
import { benchRun, median } from './harness.js';
import { GUEST_STATE_RUNNING, guestMemoryMiB, readGuestCounters, readGuestStatus } from '../src/guest/image.js';
import { startAgent, testGuest, type TestAgent } from '../test/helpers/agents.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '1' },
    mib: { type: 'string', default: '512' },
    bandwidth: { type: 'string', default: '32' },
    bound: { type: 'string', default: '90' },
    'pause-per-gib': { type: 'string', default: '40' },
    accel: { type: 'string', default: 'auto' },
  },
});
const rounds = Number(values.rounds);
const mib = Number(values.mib);
const bandwidthMiBps = Number(values.bandwidth);
const boundMs = Number(values.bound) * 1000;
const GUEST = 'bench-busy';
const MiB = 1024 * 1024;

interface Side {
  name: 'qemu defaults' | 'default' | 'pre-copy only' | 'pause';
  options: Partial<MigrationOptions>;
  /** Cancelled after --bound (it is not expected to complete). */
  bounded: boolean;
  completedMs: number[];
  downtimeMs: number[];
  pauseMs: number[];
}

const sides: Side[] = [
  {
    name: 'qemu defaults',
    options: { bandwidthMiBps, autoConverge: false, maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 0, progressTimeoutSeconds: 0, allowPostcopy: false },
    bounded: true,
    completedMs: [],
    downtimeMs: [],
    pauseMs: [],
  },
  { name: 'default', options: { bandwidthMiBps }, bounded: false, completedMs: [], downtimeMs: [], pauseMs: [] },
  { name: 'pre-copy only', options: { bandwidthMiBps, allowPostcopy: false }, bounded: false, completedMs: [], downtimeMs: [], pauseMs: [] },
  {
    name: 'pause',
    options: { bandwidthMiBps, allowPostcopy: false, deadlineAction: 'pause', completionTimeoutPerGiBSeconds: Number(values['pause-per-gib']) },
    bounded: false,
    completedMs: [],
    downtimeMs: [],
    pauseMs: [],
  },
];

async function main(): Promise<void> {
  await benchRun(async (run) => {
    const { dir } = run;
    const agents: TestAgent[] = [];
    for (const [name, host, low] of [['a', '127.0.0.2', 49152], ['b', '127.0.0.3', 49170]] as const) {
      const overrides: Partial<AgentConfig> = {
        listenHost: host, migrationAddress: host, migrationPorts: { low, high: low + 8 }, accel: values.accel as AgentConfig['accel'], incomingTimeoutSeconds: 120,
      };
      agents.push(await startAgent(run, dir, name, overrides));
    }
    const params = { fillMiB: mib, hotMiB: mib, reportEvery: 0 };
    const memoryMiB = guestMemoryMiB(params) + 16;
    await agents[0]!.client.define((await testGuest(dir, GUEST, params, { memoryMiB })).xml);
    await agents[0]!.client.lifecycle(GUEST, 'start');
    const owner = () => agents.find((a) => a.app.agent.domains.find(GUEST)?.run)!;
    const qmp = () => owner().app.agent.domains.get(GUEST).run!.qmp;
    for (let i = 0; i < 6000 && (await readGuestStatus(qmp())).state !== GUEST_STATE_RUNNING; i++) await new Promise((r) => setTimeout(r, 100));
    const bootId = (await readGuestCounters(qmp())).bootId;
    process.stdout.write(
      `guest ${memoryMiB} MiB, all ${mib} MiB rewritten continuously; stream ${bandwidthMiBps} MiB/s; accel ${(await agents[0]!.client.host()).accelerator}; ${rounds} round(s)\n`,
    );
    for (const agent of agents) process.stdout.write(`${agent.url}: ${(await agent.client.host()).qemuUser}; postcopy: ${JSON.stringify((await agent.client.host()).postcopy)}\n`);

    const measure = async (side: Side): Promise<string> => {
      const from = owner();
      const to = agents.find((a) => a !== from)!;
      const t0 = performance.now();
      const { job } = await from.client.perform({ domain: GUEST, destination: to.url, ...side.options });
      let ended: JobRecord;
      if (side.bounded) {
        const jobs = from.app.agent.migrations.jobs;
        ended = await jobs.waitForEnd(jobs.require(job.id), boundMs);
        if (ended.status === 'running') {
          await from.client.cancel(job.id);
          ended = await jobs.waitForEnd(jobs.require(job.id), 60_000);
        }
      } else {
        const jobs = from.app.agent.migrations.jobs;
        ended = await jobs.waitForEnd(jobs.require(job.id), 30 * 60_000);
      }
      const ms = performance.now() - t0;
      const c = ended.stats?.convergence;
      const step = c ? `step ${c.step}, auto-converge ${c.autoConverge}${c.cpuThrottlePercent !== undefined ? ` ${c.cpuThrottlePercent}%` : ''}` : 'no policy state';
      const iterations = ended.stats?.iterations ?? 0;
      if (ended.status !== 'completed') {
        return `${side.name}: ${ended.status} after ${(ms / 1000).toFixed(1)} s (${iterations} iterations, ${((ended.stats?.remainingBytes ?? 0) / MiB).toFixed(0)} MiB still to send, ${step})`;
      }
      side.completedMs.push(ms);
      side.downtimeMs.push(ended.timings.qemuDowntimeMs ?? NaN);
      const arrival = to.app.agent.migrations.jobs.get(job.id)?.record;
      const switched = ended.phaseHistory.some((p) => p.phase === 'postcopy');
      const paused = switched ? (ended.timings.qemuDowntimeMs ?? NaN) + (arrival?.timings.switchoverMs ?? NaN) : ended.timings.switchoverMs;
      side.pauseMs.push(paused ?? NaN);
      if (switched) {
        return (
          `${side.name}: completed in ${(ms / 1000).toFixed(1)} s (${((ended.timings.postcopyMs ?? 0) / 1000).toFixed(1)} s of it in postcopy), qemu downtime ${ended.timings.qemuDowntimeMs} ms, ` +
          `guest paused ${paused} ms, downtime limit ${ended.stats?.downtimeLimitMs} ms, transport ${JSON.stringify(ended.transport)}, ${step}`
        );
      }
      return (
        `${side.name}: completed in ${(ms / 1000).toFixed(1)} s, qemu downtime ${ended.timings.qemuDowntimeMs} ms, ` +
        `guest paused ${ended.timings.switchoverMs} ms, downtime limit ${ended.stats?.downtimeLimitMs} ms, ${iterations} iterations, ${step}`
      );
    };

    for (let round = 1; round <= rounds; round++) {
      for (const side of sides) process.stdout.write(`round ${round}: ${await measure(side)}\n`);
    }
    const after = await readGuestCounters(qmp());
    process.stdout.write(`the guest never rebooted: ${after.bootId === bootId ? 'yes' : 'NO'}\n`);
    for (const side of sides) {
      const n = side.completedMs.length;
      process.stdout.write(
        `${side.name}: completed ${n}/${rounds}` +
          (n ? `, median ${(median(side.completedMs) / 1000).toFixed(1)} s, qemu downtime ${median(side.downtimeMs)} ms, guest paused ${median(side.pauseMs)} ms` : '') +
          '\n',
      );
    }
  });
}

await main();
