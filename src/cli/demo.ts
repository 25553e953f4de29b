import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { AgentClient } from '../client.js';
import { followJob, summarize } from './progress.js';
import { freePort } from '../migration/ports.js';
import { writeGuestImage, parseSerialLog, guestMemoryMiB, type GuestParams } from '../guest/image.js';
import { testGuestXml } from '../guest/domain-xml.js';
import { chooseHostAccel } from '../qemu/accel-probe.js';
import { defaultQemuCredentials, mkdtempForAgents } from '../agent/qemu-user.js';
import type { Accel } from '../domain/index.js';
import { killQemu, processMatches } from '../qemu/process.js';
import { readQemuRecords } from '../store/state-store.js';

const GUEST: GuestParams = { fillMiB: 64, hotMiB: 4, reportEvery: 64 };
const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'kvm-migrate.js');
const AGENT_UP_MS = 20_000;
const AGENT_STOP_MS = 10_000;

interface DemoAgent {
  name: string;
  url: string;
  stateDir: string;
  client: AgentClient;
  child: ChildProcess;
}

/** The demo's agents take their settings from the demo alone, none from the caller's KVM_MIGRATE_* variables. */
function agentEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('KVM_MIGRATE_')));
}

async function startAgent(name: string, host: string, dir: string, token: string, ports: string, accel: Accel, signal: AbortSignal): Promise<DemoAgent> {
  const port = await freePort(host);
  const stateDir = path.join(dir, name);
  // Detached: a Ctrl-C on the terminal reaches the demo only, which then ends its agents in order.
  const child = spawn(
    process.execPath,
    [CLI, 'agent', '--listen', `${host}:${port}`, '--state-dir', stateDir, '--allow-path', dir, '--migration-ports', ports, '--accel', accel, '--log-level', 'warn'],
    { env: { ...agentEnv(), KVM_MIGRATE_TOKEN: token }, stdio: ['ignore', 'inherit', 'inherit'], detached: true },
  );
  const agent = { name, url: `http://${host}:${port}`, stateDir, client: new AgentClient(`http://${host}:${port}`, token), child };
  const deadline = Date.now() + AGENT_UP_MS;
  for (;;) {
    signal.throwIfAborted();
    if (child.exitCode !== null) throw new Error(`agent ${name} exited with ${child.exitCode}`);
    try {
      await agent.client.call('GET', '/health');
      return agent;
    } catch {
      if (Date.now() > deadline) throw new Error(`agent ${name} did not come up at ${agent.url}`);
      await sleep(100, undefined, { signal });
    }
  }
}

async function waitForPasses(serialLog: string, above: number, timeoutMs: number, signal: AbortSignal): Promise<{ boots: string[]; lastPass: number }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const parsed = parseSerialLog(await fs.readFile(serialLog, 'utf8').catch(() => ''));
    if (parsed.lastPass !== null && parsed.lastPass > above) return { boots: parsed.boots, lastPass: parsed.lastPass };
    if (Date.now() > deadline) throw new Error(`guest made no progress past pass ${above} within ${timeoutMs} ms`);
    await sleep(100, undefined, { signal });
  }
}

/** KVM_MIGRATE_ACCEL (or the tests' KVM_MIGRATE_TEST_ACCEL) forces one; otherwise measured. */
async function demoAccel(say: (line: string) => void, signal: AbortSignal): Promise<Accel> {
  const forced = process.env.KVM_MIGRATE_ACCEL ?? process.env.KVM_MIGRATE_TEST_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') {
    say(`accelerator ${forced} (set by the environment)`);
    return forced;
  }
  const choice = await chooseHostAccel({ signal, credentials: await defaultQemuCredentials() });
  signal.throwIfAborted();
  say(`accelerator ${choice.reason}`);
  return choice.accel;
}

/**
 * Ends everything the demo started, whatever state it is in: migrations cancelled and guests
 * destroyed through the agents, the agents stopped, then any qemu still recorded in their state
 * directories ended by pid, and the directory removed.
 */
async function cleanUp(agents: DemoAgent[], dir: string): Promise<void> {
  for (const agent of agents) {
    const bounded = { signal: AbortSignal.timeout(AGENT_STOP_MS) };
    for (const job of await agent.client.jobs().catch(() => [])) {
      if (job.status === 'running' && job.role === 'source') await agent.client.cancel(job.id).catch(() => undefined);
    }
    for (let i = 0; i < 50 && !bounded.signal.aborted; i++) {
      const domains = await agent.client.domains().catch(() => []);
      const live = domains.filter((d) => d.state !== 'shutoff');
      if (live.length === 0) break;
      for (const d of live) await agent.client.lifecycle(d.name, 'destroy').catch(() => undefined);
      await sleep(100);
    }
  }
  for (const agent of agents) {
    if (agent.child.exitCode === null && agent.child.signalCode === null) {
      const exited = new Promise((r) => agent.child.once('exit', r));
      agent.child.kill('SIGTERM');
      const timer = setTimeout(() => agent.child.kill('SIGKILL'), AGENT_STOP_MS);
      await exited;
      clearTimeout(timer);
    }
    for (const rec of await readQemuRecords(agent.stateDir)) if (processMatches(rec)) await killQemu(rec, { graceMs: 1000 });
  }
  await fs.rm(dir, { recursive: true, force: true });
}

/**
 * Two agents on this machine (127.0.0.2 and 127.0.0.3, own state dirs), the test guest defined
 * and started on the first, migrated there and back with a live progress bar; the guest's own
 * serial log proves it kept running and never rebooted. Everything started is ended, also when
 * `signal` aborts (SIGINT/SIGTERM).
 */
export async function runDemo(out: NodeJS.WriteStream, signal: AbortSignal): Promise<number> {
  const dir = await mkdtempForAgents('kvm-migrate-demo-');
  const token = randomBytes(16).toString('hex');
  const agents: DemoAgent[] = [];
  const say = (line: string) => out.write(line + '\n');
  try {
    const accel = await demoAccel(say, signal);
    const image = path.join(dir, 'guest.img');
    const serialLog = path.join(dir, 'serial.log');
    await writeGuestImage(image, GUEST);
    agents.push(await startAgent('hostA', '127.0.0.2', dir, token, '49152-49183', accel, signal));
    agents.push(await startAgent('hostB', '127.0.0.3', dir, token, '49184-49215', accel, signal));
    const [a, b] = agents as [DemoAgent, DemoAgent];
    const host = await a.client.host();
    say(`agents: hostA ${a.url}, hostB ${b.url} (qemu ${host.qemuVersion}, ${host.accelerator})`);

    const xml = testGuestXml({ name: 'demo-vm', image, serialLog, memoryMiB: guestMemoryMiB(GUEST) + 16 });
    await a.client.define(xml);
    await a.client.lifecycle('demo-vm', 'start');
    let progress = await waitForPasses(serialLog, 0, 120_000, signal);
    const bootId = progress.boots[0];
    say(`demo-vm runs on hostA: boot ${bootId}, pass ${progress.lastPass}`);

    for (const [from, to] of [
      [a, b],
      [b, a],
    ] as const) {
      say(`migrating demo-vm ${from.name} -> ${to.name}`);
      const { job } = await from.client.perform({ domain: 'demo-vm', destination: to.url });
      const final = await followJob(from.client, job.id, out, { signal });
      say(`  ${summarize(final)}`);
      if (final.status !== 'completed') throw new Error(`migration ${from.name} -> ${to.name} ${final.status}`);
      const info = await to.client.domain('demo-vm');
      const before = progress.lastPass;
      progress = await waitForPasses(serialLog, before, 60_000, signal);
      const rebooted = progress.boots.length !== 1 || progress.boots[0] !== bootId;
      say(`  demo-vm on ${to.name}: ${info.state}, pass ${before} -> ${progress.lastPass}, ${rebooted ? 'REBOOTED' : 'same boot ' + bootId}`);
      if (info.state !== 'running' || rebooted) throw new Error('the guest did not arrive intact');
      const left = await from.client.domain('demo-vm').catch(() => null);
      say(`  on ${from.name}: ${left ? `${left.state} (${left.reason ?? ''})` : 'gone'}`);
    }
    say('demo passed: the guest moved there and back, kept running, never rebooted');
    return 0;
  } catch (err) {
    if (signal.aborted) {
      say(`\ndemo interrupted (${String(signal.reason)}); ending what it started`);
      return 1;
    }
    say(`demo failed: ${(err as Error).message}`);
    return 1;
  } finally {
    await cleanUp(agents, dir);
  }
}
