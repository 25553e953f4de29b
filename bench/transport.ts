/**
 * Benchmark (not a test): the agent's default transport against raw QEMU's configurations, and
 * the agent's transport options, on one guest each, every configuration once per round in one
 * run (the order rotates each round).
 *
 *   node dist/bench/transport.js [--rounds N] [--fill-mib M] [--hot-mib H] [--bandwidth MiB/s]
 *                                [--accel auto|kvm|tcg] [--only NAME,NAME...]
 *
 * Raw: a destination qemu (-incoming defer) set up by hand over QMP (multifd and its channel
 * count on both ends before migrate-incoming), migrate, wait for both ends, `cont` there, end
 * the source qemu: qemu's own defaults (`raw-qemu-defaults`, max-bandwidth 128 MiB/s on 7.2) and
 * hand-tuned ones, unthrottled, on one plain stream and on 2, 4 and 8 multifd channels. Agent: POST
 * /perform?wait=true with the options of each configuration. Same argv builder, same guest
 * program, same loopback addresses; the guest not being measured is paused, so the two never
 * compete for the machine's cores. --bandwidth caps every configuration's stream (max-bandwidth);
 * --hot-mib makes the guests rewrite that much memory without pause (4 words of each page).
 */
import { parseArgs } from 'node:util';
import { benchRun, median } from './harness.js';
import { benchSides, migrateRaw, waitGuestFilled } from './raw-qemu.js';
import type { GuestParams } from '../src/guest/image.js';
import type { MigrationOptions } from '../src/migration/params.js';
import type { JobRecord } from '../src/migration/jobs.js';
import type { AgentConfig } from '../src/config.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '5' },
    'fill-mib': { type: 'string', default: '1024' },
    'hot-mib': { type: 'string', default: '1' },
    bandwidth: { type: 'string' },
    accel: { type: 'string', default: 'auto' },
    only: { type: 'string' },
  },
});
const rounds = Number(values.rounds);
const params: GuestParams = { fillMiB: Number(values['fill-mib']), hotMiB: Number(values['hot-mib']), reportEvery: 0 };
const accelMode = values.accel as AgentConfig['accel'];
const bandwidthMiBps = values.bandwidth ? Number(values.bandwidth) : undefined;

/** A raw QEMU set-up: multifd channels (0: one plain stream), and whether max-bandwidth is left at qemu's default. */
interface RawSetup {
  kind: 'raw';
  name: string;
  channels: number;
  qemuDefaults?: boolean;
}
interface AgentSetup {
  kind: 'agent';
  name: string;
  options: Partial<MigrationOptions>;
}
type Setup = RawSetup | AgentSetup;

const ALL: Setup[] = [
  { kind: 'raw', name: 'raw-qemu-defaults', channels: 0, qemuDefaults: true },
  { kind: 'raw', name: 'raw-plain', channels: 0 },
  { kind: 'raw', name: 'raw-multifd-2', channels: 2 },
  { kind: 'raw', name: 'raw-multifd-4', channels: 4 },
  { kind: 'raw', name: 'raw-multifd-8', channels: 8 },
  { kind: 'agent', name: 'agent-default', options: {} },
  { kind: 'agent', name: 'agent-1-channel', options: { multifdChannels: 1 } },
  // One plain stream is set up for postcopy by default: what that costs a stream that never switches.
  { kind: 'agent', name: 'agent-1-channel-no-postcopy', options: { multifdChannels: 1, allowPostcopy: false } },
  { kind: 'agent', name: 'agent-2-channels', options: { multifdChannels: 2 } },
  { kind: 'agent', name: 'agent-zstd', options: { compression: 'zstd' } },
  { kind: 'agent', name: 'agent-xbzrle', options: { xbzrle: true } },
];
const only = values.only?.split(',');
const setups = only ? ALL.filter((s) => only.includes(s.name)) : ALL;
if (only && setups.length !== only.length) throw new Error(`--only names one of ${ALL.map((s) => s.name).join(', ')}`);

interface Sample {
  ms: number;
  streamMs?: number;
  transferredMiB?: number;
  downtimeMs?: number;
  transport?: string;
}

async function main(): Promise<void> {
  await benchRun(async (run) => {
    const { qemu, accel, memoryMiB, agents, rawLaunch, agentGuestOn } = await benchSides(run, params, accelMode);
    process.stdout.write(
      `qemu ${qemu.version}, accel ${accel}, guest ${memoryMiB} MiB (${params.fillMiB} MiB filled, ${params.hotMiB} MiB hot), ` +
        `bandwidth ${bandwidthMiBps ? `${bandwidthMiBps} MiB/s` : 'unlimited'}, ${rounds} rounds of ${setups.map((s) => s.name).join(', ')}\n`,
    );

    process.stdout.write(`agents' channel limit (GET /host migrationChannels): ${(await agents[0]!.client.host()).migrationChannels}\n`);
    let raw = await rawLaunch(false);
    await raw.qmp.execute('cont');
    await waitGuestFilled(raw.qmp);
    await waitGuestFilled(agents[0]!.app.agent.domains.get('bench-agent').run!.qmp);
    await raw.qmp.execute('stop');
    await agentGuestOn().client.lifecycle('bench-agent', 'suspend');

    const measureAgent = async (setup: AgentSetup): Promise<Sample> => {
      const from = agentGuestOn();
      const to = agents.find((a) => a !== from)!;
      await from.client.lifecycle('bench-agent', 'resume');
      const t0 = performance.now();
      const { job } = await from.client.perform({ domain: 'bench-agent', destination: to.url, ...setup.options, ...(bandwidthMiBps ? { bandwidthMiBps } : {}) }, true);
      const ms = performance.now() - t0;
      if (job.status !== 'completed') throw new Error(`${setup.name}: agent migration ${job.status}: ${job.error?.message}`);
      await to.client.lifecycle('bench-agent', 'suspend');
      return {
        ms,
        streamMs: job.timings.qemuTotalMs,
        downtimeMs: job.timings.qemuDowntimeMs,
        transferredMiB: job.stats ? job.stats.transferredBytes / 2 ** 20 : undefined,
        transport: describe((job as JobRecord).transport),
      };
    };
    let rawRound = 0;
    const rawHosts = ['127.0.0.3', '127.0.0.2'];
    const measureRaw = async (setup: RawSetup): Promise<Sample> => {
      await raw.qmp.execute('cont');
      const t0 = performance.now();
      const dest = await rawLaunch(true);
      const multifd = setup.channels > 0;
      const capabilities = [{ capability: 'events', state: true }, { capability: 'multifd', state: multifd }];
      const transport: Record<string, number> = multifd ? { 'multifd-channels': setup.channels } : {};
      const uri = `tcp:${rawHosts[rawRound % 2]}:${49180 + (rawRound % 2)}`;
      rawRound++;
      const bandwidth: Record<string, number> = bandwidthMiBps ? { 'max-bandwidth': bandwidthMiBps * 2 ** 20 } : setup.qemuDefaults ? {} : { 'max-bandwidth': 1024 ** 4 };
      const info = await migrateRaw(raw, dest, uri, {
        sourceCapabilities: capabilities,
        sourceParameters: { ...transport, ...bandwidth },
        destinationCapabilities: capabilities,
        destinationParameters: transport,
      });
      const ms = performance.now() - t0;
      raw = dest;
      await raw.qmp.execute('stop');
      return { ms, streamMs: info['total-time'], downtimeMs: info.downtime, transferredMiB: info.ram ? info.ram.transferred / 2 ** 20 : undefined };
    };

    const samples = new Map<string, Sample[]>(setups.map((s) => [s.name, []]));
    // The run's first migration of each kind is slower inside qemu's own stream (a host effect): one warm-up round.
    for (let round = 0; round <= rounds; round++) {
      const order = setups.map((_, i) => setups[(i + round) % setups.length]!);
      const line: string[] = [];
      for (const setup of order) {
        const s = setup.kind === 'raw' ? await measureRaw(setup) : await measureAgent(setup);
        if (round > 0) samples.get(setup.name)!.push(s);
        line.push(`${setup.name} ${s.ms.toFixed(0)} ms (stream ${s.streamMs} ms${s.transport ? `, ${s.transport}` : ''})`);
      }
      process.stdout.write(`${round === 0 ? 'warm-up' : `round ${round}`}: ${line.join('; ')}\n`);
    }
    const medians = new Map([...samples].map(([name, xs]) => [name, median(xs.map((x) => x.ms))]));
    const bestRaw = setups.filter((s) => s.kind === 'raw' && !s.qemuDefaults).map((s) => s.name).sort((x, y) => medians.get(x)! - medians.get(y)!)[0];
    process.stdout.write(`\nmedians over ${rounds} rounds (end-to-end; qemu's stream time; downtime; MiB on the wire):\n`);
    for (const [name, xs] of samples) {
      const m = (f: (x: Sample) => number | undefined) => {
        // qemu 7.2 sometimes reports a completed stream's total-time as 0: not a figure.
        const v = xs.map(f).filter((x): x is number => x !== undefined && x > 0);
        return v.length ? median(v).toFixed(0) : '-';
      };
      const vsBest = bestRaw ? ` (x${(medians.get(name)! / medians.get(bestRaw)!).toFixed(2)} of ${bestRaw})` : '';
      process.stdout.write(`  ${name.padEnd(18)} ${medians.get(name)!.toFixed(0).padStart(6)} ms${vsBest}; stream ${m((x) => x.streamMs)} ms; downtime ${m((x) => x.downtimeMs)} ms; ${m((x) => x.transferredMiB)} MiB${xs[0]?.transport ? `; ${xs[0].transport}` : ''}\n`);
    }
  });
}

function describe(t: JobRecord['transport']): string | undefined {
  if (!t) return undefined;
  return t.multifd ? `multifd ${t.channels}${t.compression !== 'none' ? ` ${t.compression}` : ''}` : 'one plain stream';
}

await main();
