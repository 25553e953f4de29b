import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Test } from 'tap';
import type { AgentConfig } from '../../src/config.js';
import type { AgentClient } from '../../src/client.js';
import type { Prepare2Request, Prepare2Response } from '../../src/migration/protocol.js';
import { processMatches } from '../../src/qemu/process.js';
import { readGuestCounters, type GuestCounters } from '../../src/guest/image.js';
import { qemuRecords, startAgent, testGuest, tmpDir, waitFor, type TestAgent, type TestContext } from './agents.js';
import type { GuestParams } from '../../src/guest/image.js';

/** Two in-process agents on their own loopback addresses, state dirs and port ranges. */
export async function twoAgents(
  t: TestContext,
  overrides: { a?: Partial<AgentConfig>; b?: Partial<AgentConfig> } = {},
): Promise<{ dir: string; a: TestAgent; b: TestAgent }> {
  const dir = await tmpDir(t);
  const a = await startAgent(t, dir, 'a', {
    listenHost: '127.0.0.2',
    migrationAddress: '127.0.0.2',
    migrationPorts: { low: 49152, high: 49183 },
    ...overrides.a,
  });
  const b = await startAgent(t, dir, 'b', {
    listenHost: '127.0.0.3',
    migrationAddress: '127.0.0.3',
    migrationPorts: { low: 49184, high: 49215 },
    ...overrides.b,
  });
  return { dir, a, b };
}

export function guestQmp(agent: TestAgent, name: string) {
  const run = agent.app.agent.domains.find(name)?.run;
  if (!run) throw new Error(`${name} does not run on ${agent.url}`);
  return run.qmp;
}

/** Guest counters read over the owning agent's QMP connection. */
export function counters(agent: TestAgent, name: string): Promise<GuestCounters> {
  return readGuestCounters(guestQmp(agent, name));
}

export async function waitForPasses(agent: TestAgent, name: string, above: number, timeoutMs = 60_000): Promise<GuestCounters> {
  return waitFor(`${name} past pass ${above}`, async () => {
    const c = await counters(agent, name);
    return c.passes > above ? c : null;
  }, { timeoutMs });
}

/**
 * The ownership invariant: exactly one qemu runs the guest, on `owner`; `other` has no qemu,
 * socket or runtime record of it, and no running job.
 */
export async function assertOwnedBy(
  t: Test,
  owner: TestAgent,
  other: TestAgent,
  name: string,
  expectState: 'running' | 'paused' = 'running',
): Promise<void> {
  const info = await owner.client.domain(name);
  t.equal(info.state, expectState, `${name} ${expectState} on its owner`);
  const otherEntry = other.app.agent.domains.find(name);
  t.notOk(otherEntry?.run, `${name} has no qemu on the other agent`);
  const otherRecords = await qemuRecords(other.config.stateDir);
  t.same(otherRecords.filter(processMatches), [], 'no live qemu recorded on the other agent');
  const sockets = (await fs.readdir(path.join(other.config.stateDir, 'run'))).filter((f) => f.startsWith(info.uuid));
  t.same(sockets, [], 'no socket or pidfile left on the other agent');
  t.same(other.app.agent.migrations.jobs.running('source').concat(other.app.agent.migrations.jobs.running('destination')).map((j) => j.id), [], 'no running job on the other agent');
}

/** Define and start the test guest on `agent`, and wait until it runs its passes (RAM filled). */
export async function startGuest(agent: TestAgent, dir: string, name: string, params?: GuestParams) {
  const guest = await testGuest(dir, name, params);
  await agent.client.define(guest.xml);
  await agent.client.lifecycle(name, 'start');
  const boot = await waitForPasses(agent, name, 0);
  return { guest, boot };
}

/** A Prepare2 sent by hand, as a source agent would send it (the tests play that source). */
export function sendPrepare2(
  agent: { client: AgentClient },
  migrationId: string,
  xml: string,
  source: Prepare2Request['source'] | { hostUuid: string },
): Promise<Prepare2Response> {
  return agent.client.call<Prepare2Response>('POST', '/prepare2', { protocolVersion: 2, migrationId, xml, source });
}
