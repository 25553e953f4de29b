import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildAgent } from '../../src/agent/app.js';
import { DEFAULTS, type AgentConfig } from '../../src/config.js';
import { AgentClient } from '../../src/client.js';
import type { JobRecord } from '../../src/migration/jobs.js';
import { killQemu, processMatches, type QemuProcessRecord } from '../../src/qemu/process.js';
import { packageRoot } from '../../src/agent/package-root.js';
import { readQemuRecords, readSwtpmRecords } from '../../src/store/state-store.js';
import { killSwtpm, type SwtpmRecord } from '../../src/qemu/swtpm.js';
import { chooseHostAccel } from '../../src/qemu/accel-probe.js';
import { defaultQemuCredentials, mkdtempForAgents } from '../../src/agent/qemu-user.js';
import { freePort } from '../../src/migration/ports.js';
export { freePort, readQemuRecords as qemuRecords };
import { writeGuestImage, guestMemoryMiB, type GuestParams } from '../../src/guest/image.js';
import { testGuestXml } from '../../src/guest/domain-xml.js';

/**
 * The accelerator the suite's guests run on: KVM_MIGRATE_TEST_ACCEL (scripts/test.sh sets it
 * from one measurement for the whole suite), else measured here, once per test process.
 */
export const TEST_ACCEL: 'kvm' | 'tcg' = await (async () => {
  const forced = process.env.KVM_MIGRATE_TEST_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return forced;
  if (forced) throw new Error(`KVM_MIGRATE_TEST_ACCEL must be kvm or tcg, got ${forced}`);
  return (await chooseHostAccel({ credentials: await defaultQemuCredentials() })).accel;
})();

/** Every temp dir of the suite starts with this, so the leftover check can find strays. */
export const TMP_PREFIX = 'kvm-migrate-test-';

export interface TestContext {
  teardown(fn: () => void | Promise<void>): void;
}

export async function tmpDir(t: TestContext): Promise<string> {
  // Short: unix socket paths below it must fit in 108 bytes.
  const dir = await mkdtempForAgents(TMP_PREFIX);
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined | null | false> | T | undefined | null | false,
  { timeoutMs = 30_000, intervalMs = 100 } = {},
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v) return v;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastError ? `: ${(lastError as Error).message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** A migration job as one agent records it, once it has ended (status not running). */
export function waitForJobEnd(client: AgentClient, id: string, what: string, timeoutMs = 60_000): Promise<JobRecord> {
  return waitFor(what, async () => {
    const j = await client.job(id);
    return j.status !== 'running' ? j : null;
  }, { timeoutMs, intervalMs: 200 });
}

/** The operator token of the suite's agents unless a test gives its own: every agent needs one. */
export const TEST_TOKEN = 'kvm-migrate-test-token';

export function agentConfig(dir: string, name: string, overrides: Partial<AgentConfig> = {}): AgentConfig {
  return {
    token: TEST_TOKEN,
    listenHost: '127.0.0.1',
    listenPort: 0,
    stateDir: path.join(dir, name),
    migrationAddress: overrides.listenHost ?? '127.0.0.1',
    migrationPorts: { low: 49152, high: 49215 },
    allowPaths: [dir],
    accel: TEST_ACCEL,
    incomingTimeoutSeconds: 30,
    bodyLimitBytes: DEFAULTS.bodyLimitBytes,
    requestTimeoutMs: DEFAULTS.requestTimeoutMs,
    allowedHosts: [],
    peers: [],
    maxDomains: DEFAULTS.maxDomains,
    maxLogBytes: DEFAULTS.maxLogBytes,
    maxIncoming: DEFAULTS.maxIncoming,
    jobHistory: DEFAULTS.jobHistory,
    maxOutgoing: DEFAULTS.maxOutgoing,
    qemuUser: DEFAULTS.qemuUser,
    qemuUids: DEFAULTS.qemuUids,
    ...overrides,
  };
}

export interface TestAgent {
  app: FastifyInstance;
  url: string;
  client: AgentClient;
  config: AgentConfig;
}

/** End, by pid, every qemu an agent started; used by teardown also when a test failed. */
export async function killAgentQemus(app: FastifyInstance | undefined, stateDir: string): Promise<void> {
  const records = new Map<number, QemuProcessRecord>();
  for (const rec of await readQemuRecords(stateDir)) records.set(rec.pid, rec);
  for (const entry of app?.agent.domains.list() ?? []) if (entry.run) records.set(entry.run.record.pid, entry.run.record);
  await Promise.all([...records.values()].filter(processMatches).map((rec) => killQemu(rec, { graceMs: 500 })));
  // A swtpm ends with its qemu; one whose qemu never started does not.
  const swtpms = new Map<number, SwtpmRecord>();
  for (const rec of await readSwtpmRecords(stateDir)) swtpms.set(rec.pid, rec);
  for (const entry of app?.agent.domains.list() ?? []) if (entry.run?.swtpm) swtpms.set(entry.run.swtpm.pid, entry.run.swtpm);
  await Promise.all([...swtpms.values()].map(killSwtpm));
}

/** An agent in this process, listening on port 0; its qemus are ended at teardown. */
export async function startAgent(t: TestContext, dir: string, name: string, overrides: Partial<AgentConfig> = {}): Promise<TestAgent> {
  const config = agentConfig(dir, name, overrides);
  // KM_TEST_LOG=warn (or info, debug) shows an in-process agent's log on stderr, for debugging a test.
  const level = process.env.KM_TEST_LOG;
  const app = await buildAgent(config, level ? { logger: { level, base: { agent: name } } } : {});
  t.teardown(async () => {
    await killAgentQemus(app, config.stateDir);
    await app.close();
  });
  await app.listen({ host: config.listenHost, port: 0 });
  const { port } = app.server.address() as net.AddressInfo;
  const url = `${config.tls ? 'https' : 'http'}://${config.listenHost}:${port}`;
  const ca = config.tls ? await fs.readFile(config.tls.caFile) : undefined;
  return { app, url, client: new AgentClient(url, config.token, { ca }), config };
}

export interface AgentProcess {
  child: ChildProcess;
  url: string;
  client: AgentClient;
  stateDir: string;
  kill9(): Promise<void>;
}

/** The real CLI agent as a child process (for kill -9 and restart). */
export async function spawnAgent(
  t: TestContext,
  opts: {
    host: string;
    port?: number;
    stateDir: string;
    allowPath: string;
    token?: string;
    extra?: string[];
    netns?: string;
    /** Where the test reaches the agent, when that is not the listen host (0.0.0.0 in a namespace). */
    urlHost?: string;
    /** With netns: a command the agent's node runs under (`sh -c '... exec "$@"' ARG0`), inside the namespace. */
    prefix?: string[];
  },
): Promise<AgentProcess> {
  const port = opts.port ?? (opts.netns ? 7100 : await freePort(opts.host));
  const cli = path.join(packageRoot, 'dist', 'bin', 'kvm-migrate.js');
  const args = [cli, 'agent', '--listen', `${opts.host}:${port}`, '--state-dir', opts.stateDir, '--allow-path', opts.allowPath, '--log-level', 'warn', '--accel', TEST_ACCEL, ...(opts.extra ?? [])];
  const command = opts.netns ? 'ip' : process.execPath;
  const argv = opts.netns ? ['netns', 'exec', opts.netns, ...(opts.prefix ?? []), process.execPath, ...args] : args;
  const child = spawn(command, argv, {
    env: { ...process.env, KVM_MIGRATE_TOKEN: opts.token ?? TEST_TOKEN },
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const kill9 = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
  };
  t.teardown(async () => {
    await kill9();
    await killAgentQemus(undefined, opts.stateDir);
  });
  const url = `http://${opts.urlHost ?? opts.host}:${port}`;
  const client = new AgentClient(url, opts.token ?? TEST_TOKEN);
  await waitFor(`agent at ${url}`, async () => {
    if (child.exitCode !== null) throw new Error(`agent exited with ${child.exitCode}`);
    return (await client.call<{ status: string }>('GET', '/health')).status === 'ok';
  }, { timeoutMs: 20_000 });
  return { child, url, client, stateDir: opts.stateDir, kill9 };
}

/** A test guest image + serial log in `dir`, and its domain XML. */
export async function testGuest(
  dir: string,
  name: string,
  params: GuestParams = { fillMiB: 8, hotMiB: 1, reportEvery: 16 },
  extra: { uuid?: string; memoryMiB?: number; machine?: 'pc' | 'q35' } = {},
): Promise<{ xml: string; image: string; serialLog: string }> {
  const image = path.join(dir, `${name}.img`);
  const serialLog = path.join(dir, `${name}.serial.log`);
  await writeGuestImage(image, params);
  const xml = testGuestXml({ name, image, serialLog, memoryMiB: extra.memoryMiB ?? guestMemoryMiB(params) + 16, ...(extra.uuid ? { uuid: extra.uuid } : {}), ...(extra.machine ? { machine: extra.machine } : {}) });
  return { xml, image, serialLog };
}
