/**
 * Benchmark (not a test): a guest that rewrites all of its memory faster than the link carries
 * it, migrated in one run under qemu's own defaults (bounded, since it never completes), under
 * the agent's default convergence policy, under the policy with deadline action pause, and under
 * the policy with postcopy allowed.
 *
 *   node dist/bench/convergence.js [--rounds N] [--mib M] [--bandwidth MiB/s] [--bound SECONDS]
 *       [--pause-per-gib SECONDS] [--accel auto|kvm|tcg]
 *
 * One guest (M MiB filled, all of it rewritten continuously), one pair of agents, the stream
 * limited to --bandwidth. Per round and side: whether it completed and in how long, qemu's
 * downtime, the pause the guest saw (timings.switchoverMs: from its vCPUs stopping to running
 * on the destination), and the policy's last step. "qemu defaults" is the agent with every
 * convergence step off: qemu's downtime-limit 300 ms, no auto-converge, no deadline; it is
 * cancelled after --bound seconds. "pause" sets completionTimeoutPerGiBSeconds to
 * --pause-per-gib and deadlineAction pause, to show what pause and finish costs the guest.
 * "postcopy" is the default policy with allowPostcopy: its guest's pause is qemu's downtime at
 * the source plus the destination agent's time from its qemu switching to the guest running
 * (the switch's transit between the hosts is not in either). Where the kernel refuses
 * userfaultfd to unprivileged processes, both agents run qemu as root so that postcopy can run.
 */
import { promises as fs } from 'node:fs';
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
  name: 'qemu defaults' | 'policy' | 'pause' | 'postcopy';
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
    options: { bandwidthMiBps, autoConverge: false, maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 0, progressTimeoutSeconds: 0 },
    bounded: true,
    completedMs: [],
    downtimeMs: [],
    pauseMs: [],
  },
  { name: 'policy', options: { bandwidthMiBps }, bounded: false, completedMs: [], downtimeMs: [], pauseMs: [] },
  {
    name: 'pause',
    options: { bandwidthMiBps, deadlineAction: 'pause', completionTimeoutPerGiBSeconds: Number(values['pause-per-gib']) },
    bounded: false,
    completedMs: [],
    downtimeMs: [],
    pauseMs: [],
  },
  { name: 'postcopy', options: { bandwidthMiBps, allowPostcopy: true }, bounded: false, completedMs: [], downtimeMs: [], pauseMs: [] },
];

async function main(): Promise<void> {
  await benchRun(async (run) => {
    const { dir } = run;
    const agents: TestAgent[] = [];
    const userfaultfd = (await fs.readFile('/proc/sys/vm/unprivileged_userfaultfd', 'utf8').catch(() => '0')).trim() === '1';
    for (const [name, host, low] of [['a', '127.0.0.2', 49152], ['b', '127.0.0.3', 49170]] as const) {
      const overrides: Partial<AgentConfig> = {
        listenHost: host, migrationAddress: host, migrationPorts: { low, high: low + 8 }, accel: values.accel as AgentConfig['accel'], incomingTimeoutSeconds: 120,
        ...(userfaultfd ? {} : { qemuUser: 'root' }),
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
      const paused = side.name === 'postcopy' && ended.phaseHistory.some((p) => p.phase === 'postcopy')
        ? (ended.timings.qemuDowntimeMs ?? NaN) + (arrival?.timings.switchoverMs ?? NaN)
        : ended.timings.switchoverMs;
      side.pauseMs.push(paused ?? NaN);
      if (side.name === 'postcopy') {
        return (
          `${side.name}: completed in ${(ms / 1000).toFixed(1)} s (${((ended.timings.postcopyMs ?? 0) / 1000).toFixed(1)} s of it in postcopy), qemu downtime ${ended.timings.qemuDowntimeMs} ms, ` +
          `guest paused ${paused} ms, downtime limit ${ended.stats?.downtimeLimitMs} ms, ${step}`
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
