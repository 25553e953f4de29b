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
import { benchOptions, benchRun, median } from './harness.js';
import { benchSides, migrateRaw, waitGuestFilled } from './raw-qemu.js';
import { channelLimit, destinationCapabilities, destinationParameters, offerTransport, sourceCapabilities, sourceParameters, DEFAULT_OPTIONS } from '../src/migration/params.js';

const { rounds, params, accel: accelMode } = benchOptions();
// The stream the agents' defaults agree on between two agents of this host: raw streams the same.
const transport = offerTransport(DEFAULT_OPTIONS, channelLimit(os.availableParallelism(), false));


async function main(): Promise<void> {
  await benchRun(async (run) => {
    const { qemu, accel, memoryMiB, agents, rawLaunch, agentGuestOn } = await benchSides(run, params, accelMode);
    process.stdout.write(`qemu ${qemu.version}, accel ${accel}, guest ${memoryMiB} MiB (${params.fillMiB} MiB filled), ${rounds} rounds each, both with ${JSON.stringify(transport)}\n`);

    let raw = await rawLaunch(false);
    await raw.qmp.execute('cont');

    // Both guests fill their RAM before any round, so every round moves the same data.
    await waitGuestFilled(raw.qmp);
    await waitGuestFilled(agents[0]!.app.agent.domains.get('bench-agent').run!.qmp);

    const agentMs: number[] = [];
    const rawMs: number[] = [];
    // End-to-end minus qemu's own stream time (when qemu reports one): the cost around the stream.
    const agentAroundMs: number[] = [];
    const rawAroundMs: number[] = [];
    // Per round: to the destination listening, to the first byte, stream end to running, and
    // (agent only) the caller's own trip outside the job's totalMs.
    const agentSteps: number[][] = [];
    const rawSteps: number[][] = [];
    // The first two rounds (one each way) are warm-ups, not counted: the run's first migration
    // is 3-4x slower inside qemu's own stream time, whichever side goes first (a host effect).
    const warmUp = 2;
    const rawHosts = ['127.0.0.3', '127.0.0.2'];

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
      const { prepare2Ms, firstByteMs, streamEndToRunningMs } = job.timings;
      if (round >= warmUp) agentSteps.push([prepare2Ms ?? NaN, firstByteMs ?? NaN, streamEndToRunningMs ?? NaN, ms - (job.timings.totalMs ?? NaN)]);
      return (
        `agent ${ms.toFixed(0)} ms (qemu stream ${job.timings.qemuTotalMs} ms, downtime ${job.timings.qemuDowntimeMs} ms, ` +
        `switch-over ${job.timings.switchoverMs} ms; listening ${prepare2Ms}, first byte ${firstByteMs}, stream end to running ${streamEndToRunningMs}; phases ms: ${phases})`
      );
    };
    const measureRaw = async (round: number) => {
      await raw.qmp.execute('cont');
      const t0 = performance.now();
      const dest = await rawLaunch(true);
      const uri = `tcp:${rawHosts[round % 2]}:${49180 + (round % 2)}`;
      const info = await migrateRaw(raw, dest, uri, {
        sourceCapabilities: sourceCapabilities(DEFAULT_OPTIONS, transport),
        sourceParameters: sourceParameters(DEFAULT_OPTIONS, transport),
        destinationCapabilities: destinationCapabilities(transport),
        destinationParameters: destinationParameters(transport),
      });
      const ms = performance.now() - t0;
      const { steps } = info;
      if (round >= warmUp) rawSteps.push([steps.listeningAt - t0, steps.streamingAt - t0, steps.runningAt - steps.streamEndAt, NaN]);
      raw = dest;
      await raw.qmp.execute('stop');
      if (round >= warmUp) rawMs.push(ms);
      if (round >= warmUp && info['total-time']) rawAroundMs.push(ms - info['total-time']);
      return (
        `raw ${ms.toFixed(0)} ms (qemu stream ${info['total-time']} ms, downtime ${info.downtime} ms; listening ${(steps.listeningAt - t0).toFixed(0)}, ` +
        `first byte ${(steps.streamingAt - t0).toFixed(0)}, stream end to running ${(steps.runningAt - steps.streamEndAt).toFixed(0)})`
      );
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
    const stepMedians = (steps: number[][]) => [0, 1, 2, 3].map((i) => median(steps.map((s) => s[i]!)).toFixed(0));
    const [a, r] = [stepMedians(agentSteps), stepMedians(rawSteps)];
    process.stdout.write(
      `steps, medians (agent / raw, ms): destination listening ${a[0]} / ${r[0]}, first byte ${a[1]} / ${r[1]}, ` +
        `stream end to running ${a[2]} / ${r[2]}; the caller's trip outside the job ${a[3]}\n`,
    );
  });
}

await main();
