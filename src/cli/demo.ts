import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { AgentClient } from '../client.js';
import { followJob, summarize } from './progress.js';
import { freePort } from '../migration/ports.js';
import { writeGuestImage, parseSerialLog, guestMemoryMiB, type GuestParams } from '../../test/guest/image.js';
import { testGuestXml } from '../../test/guest/domain-xml.js';

const GUEST: GuestParams = { fillMiB: 64, hotMiB: 4, reportEvery: 64 };
const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'bin', 'kvm-migrate.js');

interface DemoAgent {
  name: string;
  url: string;
  client: AgentClient;
  child: ChildProcess;
}

async function startAgent(name: string, host: string, dir: string, token: string, ports: string): Promise<DemoAgent> {
  const port = await freePort(host);
  const stateDir = path.join(dir, name);
  const child = spawn(
    process.execPath,
    [CLI, 'agent', '--listen', `${host}:${port}`, '--state-dir', stateDir, '--allow-path', dir, '--migration-ports', ports, '--log-level', 'warn'],
    { env: { ...process.env, KVM_MIGRATE_TOKEN: token }, stdio: ['ignore', 'inherit', 'inherit'] },
  );
  const url = `http://${host}:${port}`;
  const client = new AgentClient(url, token);
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) throw new Error(`agent ${name} exited with ${child.exitCode}`);
    try {
      await client.call('GET', '/health');
      return { name, url, client, child };
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  child.kill('SIGKILL');
  throw new Error(`agent ${name} did not come up at ${url}`);
}

async function waitForPasses(serialLog: string, above: number, timeoutMs: number): Promise<{ boots: string[]; lastPass: number }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const parsed = parseSerialLog(await fs.readFile(serialLog, 'utf8').catch(() => ''));
    if (parsed.lastPass !== null && parsed.lastPass > above) return { boots: parsed.boots, lastPass: parsed.lastPass };
    if (Date.now() > deadline) throw new Error(`guest made no progress past pass ${above} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Two agents on this machine (127.0.0.2 and 127.0.0.3, own state dirs), the test guest defined
 * and started on the first, migrated there and back with a live progress bar; the guest's own
 * serial log proves it kept running and never rebooted. Everything started is ended.
 */
export async function runDemo(out: NodeJS.WriteStream): Promise<number> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'kvm-migrate-demo-'));
  const token = randomBytes(16).toString('hex');
  const agents: DemoAgent[] = [];
  const say = (line: string) => out.write(line + '\n');
  try {
    const image = path.join(dir, 'guest.img');
    const serialLog = path.join(dir, 'serial.log');
    await writeGuestImage(image, GUEST);
    agents.push(await startAgent('hostA', '127.0.0.2', dir, token, '49152-49183'));
    agents.push(await startAgent('hostB', '127.0.0.3', dir, token, '49184-49215'));
    const [a, b] = agents as [DemoAgent, DemoAgent];
    const host = await a.client.host();
    say(`agents: hostA ${a.url}, hostB ${b.url} (qemu ${host.qemuVersion}, ${host.accelerator})`);

    const xml = testGuestXml({ name: 'demo-vm', image, serialLog, memoryMiB: guestMemoryMiB(GUEST) + 16 });
    await a.client.define(xml);
    await a.client.lifecycle('demo-vm', 'start');
    let progress = await waitForPasses(serialLog, 0, 120_000);
    const bootId = progress.boots[0];
    say(`demo-vm runs on hostA: boot ${bootId}, pass ${progress.lastPass}`);

    for (const [from, to] of [
      [a, b],
      [b, a],
    ] as const) {
      say(`migrating demo-vm ${from.name} -> ${to.name}`);
      const { job } = await from.client.perform({ domain: 'demo-vm', destination: to.url });
      const final = await followJob(from.client, job.id, out);
      say(`  ${summarize(final)}`);
      if (final.status !== 'completed') throw new Error(`migration ${from.name} -> ${to.name} ${final.status}`);
      const info = await to.client.domain('demo-vm');
      const before = progress.lastPass;
      progress = await waitForPasses(serialLog, before, 60_000);
      const rebooted = progress.boots.length !== 1 || progress.boots[0] !== bootId;
      say(`  demo-vm on ${to.name}: ${info.state}, pass ${before} -> ${progress.lastPass}, ${rebooted ? 'REBOOTED' : 'same boot ' + bootId}`);
      if (info.state !== 'running' || rebooted) throw new Error('the guest did not arrive intact');
      const left = await from.client.domain('demo-vm').catch(() => null);
      say(`  on ${from.name}: ${left ? `${left.state} (${left.reason ?? ''})` : 'gone'}`);
    }
    say('demo passed: the guest moved there and back, kept running, never rebooted');
    return 0;
  } catch (err) {
    say(`demo failed: ${(err as Error).message}`);
    return 1;
  } finally {
    for (const agent of agents) {
      for (const d of await agent.client.domains().catch(() => [])) {
        if (d.state !== 'shutoff') await agent.client.lifecycle(d.name, 'destroy').catch(() => undefined);
        await agent.client.undefine(d.name).catch(() => undefined);
      }
      agent.child.kill('SIGTERM');
      await new Promise((r) => (agent.child.exitCode !== null ? r(null) : agent.child.once('exit', r)));
    }
    await fs.rm(dir, { recursive: true, force: true });
  }
}
