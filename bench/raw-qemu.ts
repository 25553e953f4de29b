/**
 * What both migration benchmarks need of the side they compare the agents against: the same
 * guest started by hand with the agents' own argv builder, raw QEMU over QMP, and two agents on
 * 127.0.0.2 and 127.0.0.3 started by the tests' factory.
 */
import path from 'node:path';
import { buildArgv, normalizeDomainXml, type DomainDef } from '../src/domain/index.js';
import { launchQemu, killQemu, type QemuProcessRecord } from '../src/qemu/process.js';
import { probeQemu, resolveAccel } from '../src/qemu/host.js';
import type { QmpClient } from '../src/qemu/qmp.js';
import { QmpMigrationMonitor } from '../src/qemu/migration-monitor.js';
import { qemuFigures } from '../src/migration/stream-follower.js';
import type { AgentConfig } from '../src/config.js';
import { GUEST_STATE_RUNNING, guestMemoryMiB, readGuestStatus, type GuestParams } from '../src/guest/image.js';
import { startAgent, testGuest, type TestAgent } from '../test/helpers/agents.js';
import type { BenchRun } from './harness.js';

export interface RawGuest {
  record: QemuProcessRecord;
  qmp: QmpClient;
}

/** query-migrate's figures a benchmark reads. */
export interface RawStreamInfo {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred: number };
}

/** When a raw migration reached each step (performance.now()), to set beside a job's timings. */
export interface RawSteps {
  /** The destination qemu listening (migrate-incoming answered): the agent's Prepare2 answer. */
  listeningAt: number;
  /** `migrate` answered on the source: the agent's first byte. */
  streamingAt: number;
  /** The source saw the stream completed. */
  streamEndAt: number;
  /** `cont` answered on the destination. */
  runningAt: number;
}

/** Until the test guest has filled its RAM (every round then moves the same data). */
export async function waitGuestFilled(qmp: QmpClient): Promise<void> {
  for (let i = 0; i < 6000; i++) {
    if ((await readGuestStatus(qmp)).state === GUEST_STATE_RUNNING) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('guest did not finish filling its RAM');
}

/** Until a raw migration completed; its figures. */
export async function waitMigration(qmp: QmpClient, timeoutMs: number): Promise<RawStreamInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<RawStreamInfo>('query-migrate');
    if (info.status === 'completed') return info;
    if (info.status === 'failed' || info.status === 'cancelled') throw new Error(`raw migration ${info.status}`);
    if (Date.now() > deadline) throw new Error('raw migration timed out');
    await qmp.waitForEvent('MIGRATION', { timeoutMs: 250 }).catch(() => undefined);
  }
}

/**
 * One guest image each for the agents and for raw QEMU (a running qemu holds its disk's write
 * lock), two agents with the guest started on the first, and a launcher of raw qemus of the same
 * domain model and argv.
 */
export async function benchSides(run: BenchRun, params: GuestParams, accelMode: AgentConfig['accel']) {
  const { dir } = run;
  const memoryMiB = guestMemoryMiB(params) + 16;
  const agentGuest = await testGuest(dir, 'bench-agent', params, { memoryMiB });
  const rawGuest = await testGuest(dir, 'bench-raw', params, { memoryMiB });
  const qemu = await probeQemu();
  const accel = resolveAccel(accelMode, qemu.kvmUsable);

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

  const { def } = normalizeDomainXml(rawGuest.xml, {
    machineAliases: qemu.machineAliases,
    knownMachines: qemu.knownMachines,
    firmwares: qemu.firmwares,
    randomBytes: (n) => Buffer.alloc(n, 7),
  });
  let launches = 0;
  const rawLaunch = async (incoming: boolean): Promise<RawGuest> => {
    const tag = String(launches++);
    const host = { qemuBinary: qemu.binary, accel, qmpSocketPath: path.join(dir, `raw-${tag}.qmp`), pidfilePath: path.join(dir, `raw-${tag}.pid`) };
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
  /** The agents' copy of the guest runs on whichever agent holds it now. */
  const agentGuestOn = () => agents.find((a) => a.app.agent.domains.find('bench-agent')?.run)!;
  return { qemu, accel, memoryMiB, agents, rawLaunch, agentGuestOn };
}

/** How each end of a raw migration is set up over QMP. */
export interface RawSetup {
  sourceCapabilities: Array<{ capability: string; state: boolean }>;
  sourceParameters: Record<string, number | string>;
  destinationCapabilities: Array<{ capability: string; state: boolean }>;
  destinationParameters: Record<string, number | string>;
}

/**
 * A raw migration by hand, as the agents do it: `dest` (started incoming) listens on `uri`, the
 * source streams to it; once both ends completed the guest runs on `dest` and the source qemu is
 * ended. The source's stream figures.
 */
export async function migrateRaw(source: RawGuest, dest: RawGuest, uri: string, setup: RawSetup): Promise<RawStreamInfo & { steps: RawSteps }> {
  await dest.qmp.execute('migrate-set-capabilities', { capabilities: setup.destinationCapabilities });
  await dest.qmp.execute('migrate-set-parameters', setup.destinationParameters);
  await dest.qmp.execute('migrate-incoming', { uri });
  const listeningAt = performance.now();
  await source.qmp.execute('migrate-set-capabilities', { capabilities: setup.sourceCapabilities });
  await source.qmp.execute('migrate-set-parameters', setup.sourceParameters);
  await source.qmp.execute('migrate', { uri });
  const streamingAt = performance.now();
  const info = await waitMigration(source.qmp, 600_000);
  const streamEndAt = performance.now();
  // qemu's figures as the agent reads them (asked again while they still read 0), and while the
  // destination finishes, as the agent asks them while Finish2 is under way.
  const monitor = new QmpMigrationMonitor(source.qmp);
  const figures = monitor.queryMigrate().then((again) => qemuFigures(monitor, again));
  await waitMigration(dest.qmp, 600_000);
  await dest.qmp.execute('cont');
  const runningAt = performance.now();
  const { qemuTotalMs, qemuDowntimeMs } = await figures;
  await killQemu(source.record, { qmp: source.qmp, graceMs: 3000 });
  return {
    ...info,
    'total-time': qemuTotalMs ?? 0,
    ...(qemuDowntimeMs !== undefined ? { downtime: qemuDowntimeMs } : {}),
    steps: { listeningAt, streamingAt, streamEndAt, runningAt },
  };
}
