import t, { type Test } from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { processMatches } from '../../src/qemu/process.js';
import { parseSerialLog } from '../../src/guest/image.js';
import { qemuRecords, spawnAgent, testGuest, tmpDir, waitFor, type AgentProcess, type TestContext } from '../helpers/agents.js';
import { canMakeNamespaces, makeTwoHostRig, type TwoHostRig } from '../helpers/netns.js';
import type { JobRecord } from '../../src/migration/jobs.js';

/**
 * The fault matrix: every fault at every phase of a migration A -> B, on two hosts in network
 * namespaces (agents as real processes, qemu real). After each cell an invariant checker asserts
 * that the guest runs exactly once (or, only where its own running qemu was killed, is reported
 * crashed), that it is the same guest, that both agents agree who owns it, and that nothing is
 * left over.
 */
const FAULTS = ['kill source agent', 'kill destination agent', 'kill source qemu', 'kill destination qemu', 'cut link', 'freeze source host', 'freeze destination host'] as const;
const PHASES = ['during Prepare2', 'early in stream', 'late in stream', 'after stream, before Finish2', 'during Finish2', 'in postcopy'] as const;
type Fault = (typeof FAULTS)[number];
type Phase = (typeof PHASES)[number];

const TOKEN = 'fault-matrix-token';
const GUEST = { fillMiB: 24, hotMiB: 1, reportEvery: 16 };
const STREAM_BANDWIDTH_MIBPS = 4;
const LINK_DOWN_MS = 4000;
/** The agents' --incoming-timeout: the destination's bound on each phase without word from the source. */
const INCOMING_TIMEOUT_S = 20;
/** A frozen host's peer settles its part within this, by itself (the bound the contract states, plus slack). */
const FROZEN_PEER_BOUND_MS = (INCOMING_TIMEOUT_S + 15) * 1000;
/** The source's own bound on a stream that stopped moving (perform's progressTimeoutSeconds) in the freeze cells. */
const FREEZE_PROGRESS_TIMEOUT_S = 10;
/** How long a host stays frozen in postcopy: past the source's stall detection (10 s), so that recovery is tried against it. */
const POSTCOPY_FREEZE_MS = 14_000;
const matrix = new Map<string, string>();

interface Host {
  agent: AgentProcess;
  stateDir: string;
  spawnArgs: Parameters<typeof spawnAgent>[1];
}

function holdFor(phase: Phase): { host: 'A' | 'B'; point: string } | null {
  if (phase === 'during Prepare2') return { host: 'B', point: 'prepare2' };
  if (phase === 'after stream, before Finish2') return { host: 'A', point: 'before-finish2' };
  if (phase === 'during Finish2') return { host: 'B', point: 'finish2' };
  return null;
}

async function startHost(t: TestContext, rig: TwoHostRig, which: 'A' | 'B', dir: string, holds: string[]): Promise<Host> {
  const stateDir = path.join(dir, which);
  const spawnArgs = {
    host: '0.0.0.0',
    urlHost: which === 'A' ? rig.controlA : rig.controlB,
    netns: which === 'A' ? rig.nsA : rig.nsB,
    stateDir,
    allowPath: dir,
    token: TOKEN,
    // Plain HTTP between the hosts: each names the other as its peer.
    extra: ['--migration-address', which === 'A' ? rig.wireA : rig.wireB, '--peer', `http://${which === 'A' ? rig.wireB : rig.wireA}:7100`, '--incoming-timeout', String(INCOMING_TIMEOUT_S), ...holds.flatMap((h) => ['--debug-hold', h])],
  };
  return { agent: await spawnAgent(t, spawnArgs), stateDir, spawnArgs };
}

/** A host frozen: its agent and its qemus stopped, its link to the other host down. Returns the thaw. */
function freeze(rig: TwoHostRig, host: Host, qemus: Array<{ pid: number }>): () => void {
  const pids = [host.agent.child.pid!, ...qemus.map((q) => q.pid)];
  for (const pid of pids) process.kill(pid, 'SIGSTOP');
  rig.cut();
  return () => {
    rig.restore();
    for (const pid of pids) process.kill(pid, 'SIGCONT');
  };
}

async function restart(t: TestContext, host: Host): Promise<void> {
  // The restarted agent holds nowhere: the fault has been injected.
  const extra = host.spawnArgs.extra!.filter((a, i, all) => a !== '--debug-hold' && all[i - 1] !== '--debug-hold');
  host.agent = await spawnAgent(t, { ...host.spawnArgs, extra });
}

async function liveQemus(stateDir: string) {
  return (await qemuRecords(stateDir)).filter(processMatches);
}

async function releaseHold(host: Host, point: string): Promise<void> {
  await fs.rm(path.join(host.stateDir, `hold.${point}`), { force: true });
}

async function jobOf(host: Host, id: string): Promise<JobRecord | null> {
  return host.agent.client.job(id).catch(() => null);
}

async function runCell(t: Test, fault: Fault, phase: Phase): Promise<string> {
  const rig = makeTwoHostRig(t);
  const dir = await tmpDir(t);
  const hold = holdFor(phase);
  const postcopy = phase === 'in postcopy';
  const A = await startHost(t, rig, 'A', dir, hold?.host === 'A' ? [hold.point] : []);
  const B = await startHost(t, rig, 'B', dir, hold?.host === 'B' ? [hold.point] : []);
  const guest = await testGuest(dir, 'vm', GUEST);
  await A.agent.client.define(guest.xml);
  await A.agent.client.lifecycle('vm', 'start');
  const serial = async () => parseSerialLog(await fs.readFile(guest.serialLog, 'utf8').catch(() => ''));
  const before = await waitFor('guest progress', async () => {
    const s = await serial();
    return s.lastPass !== null && s.lastPass > 0 ? s : null;
  });
  const bootId = before.boots[0];

  const streaming = phase === 'early in stream' || phase === 'late in stream' || postcopy;
  const migrationId = `cell-${Date.now()}`;
  await A.agent.client.perform({
    domain: 'vm',
    destination: `http://${rig.wireB}:7100`,
    migrationId,
    ...(streaming ? { bandwidthMiBps: STREAM_BANDWIDTH_MIBPS } : {}),
    ...(fault.startsWith('freeze') && !postcopy ? { progressTimeoutSeconds: FREEZE_PROGRESS_TIMEOUT_S } : {}),
    ...(postcopy ? { allowPostcopy: true, completionTimeoutPerGiBSeconds: 0 } : {}),
  });

  // Reach the phase.
  if (postcopy) {
    // Switched once a MiB has gone: most of the guest's memory still follows, at the stream's 4 MiB/s.
    await waitFor('the stream under way', async () => {
      const j = await A.agent.client.job(migrationId);
      if (j.status !== 'running') throw new Error(`job ended early: ${j.status}`);
      return j.phase === 'streaming' && (j.stats?.transferredBytes ?? 0) >= 1024 * 1024;
    }, { timeoutMs: 60_000, intervalMs: 50 });
    await A.agent.client.complete(migrationId, 'postcopy');
    await waitFor('postcopy', async () => (await A.agent.client.job(migrationId)).stats?.qemuStatus === 'postcopy-active', { timeoutMs: 10_000, intervalMs: 50 });
  } else if (hold) {
    const holder = hold.host === 'A' ? A : B;
    await waitFor(`hold ${hold.point}`, () => fs.access(path.join(holder.stateDir, `hold.${hold.point}`)).then(() => true), { timeoutMs: 60_000 });
  } else {
    // Measured in guest bytes sent: qemu's percentage jumps while zero pages go by.
    const MiB = 1024 * 1024;
    const [low, high] = phase === 'early in stream' ? [1 * MiB, GUEST.fillMiB * 0.3 * MiB] : [GUEST.fillMiB * 0.6 * MiB, Infinity];
    await waitFor(`stream between ${low} and ${high} bytes`, async () => {
      const j = await A.agent.client.job(migrationId);
      const sent = j.stats?.transferredBytes ?? 0;
      if (j.status !== 'running') throw new Error(`job ended early: ${j.status}`);
      return j.phase === 'streaming' && sent >= low && sent <= high;
    }, { timeoutMs: 60_000, intervalMs: 50 });
  }

  // Inject the fault, let the held agent go on, and restart what was killed.
  const sourceQemus = await liveQemus(A.stateDir);
  const destinationQemus = await liveQemus(B.stateDir);
  switch (fault) {
    case 'kill source agent':
      await A.agent.kill9();
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      await restart(t, A);
      break;
    case 'kill destination agent':
      await B.agent.kill9();
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      await restart(t, B);
      break;
    case 'kill source qemu':
      for (const q of sourceQemus) process.kill(q.pid, 'SIGKILL');
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      break;
    case 'kill destination qemu':
      for (const q of destinationQemus) process.kill(q.pid, 'SIGKILL');
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      break;
    case 'cut link':
      rig.cut();
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      await new Promise((r) => setTimeout(r, LINK_DOWN_MS));
      rig.restore();
      break;
    case 'freeze source host': {
      // Power loss as the destination sees it: no FIN, no RST, no Finish2, for as long as it takes.
      const thaw = freeze(rig, A, sourceQemus);
      if (postcopy) {
        // The guest runs at B and waits there for pages only A has: B keeps it, whatever the wait.
        await new Promise((r) => setTimeout(r, POSTCOPY_FREEZE_MS));
        const j = await jobOf(B, migrationId);
        t.match(j, { status: 'running', phase: 'postcopy-active' }, 'the destination waits in postcopy for the frozen source');
        t.equal((await liveQemus(B.stateDir)).length, 1, 'and keeps the guest\'s qemu');
        thaw();
        break;
      }
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      const settled = await waitFor('the destination to settle its part alone', async () => {
        const j = await jobOf(B, migrationId);
        return !j || j.status !== 'running' ? (j ?? { status: 'none' }) : null;
      }, { timeoutMs: FROZEN_PEER_BOUND_MS, intervalMs: 200 });
      if (settled.status !== 'completed') t.same(await liveQemus(B.stateDir), [], `within ${FROZEN_PEER_BOUND_MS / 1000}s no empty qemu is left on the destination`);
      thaw();
      break;
    }
    case 'freeze destination host': {
      const thaw = freeze(rig, B, destinationQemus);
      if (hold) await releaseHold(hold.host === 'A' ? A : B, hold.point);
      if (postcopy) {
        // The source follows the hung stream (qemu 7.2 cannot always break it: it goes on when the link does), never resuming its copy.
        await new Promise((r) => setTimeout(r, POSTCOPY_FREEZE_MS));
        const j = await jobOf(A, migrationId);
        t.match(j, { status: 'running', phase: 'postcopy' }, 'the source follows the postcopy while the destination is frozen');
        t.not((await A.agent.client.domain('vm')).state, 'running', 'and never resumes its copy');
        thaw();
        break;
      }
      if (phase === 'after stream, before Finish2' || phase === 'during Finish2') {
        // Past the stream only the destination may decide: the source keeps its copy paused and waits.
        await new Promise((r) => setTimeout(r, FREEZE_PROGRESS_TIMEOUT_S * 1000));
        const j = await jobOf(A, migrationId);
        t.equal(j?.status, 'running', 'the source waits for the frozen destination\'s word');
        t.not((await A.agent.client.domain('vm')).state, 'running', 'and does not resume its copy meanwhile');
      } else {
        const ended = await waitFor('the source to end the job alone', async () => {
          const j = await jobOf(A, migrationId);
          return j && j.status !== 'running' ? j : null;
        }, { timeoutMs: 90_000, intervalMs: 200 });
        t.not(ended.status, 'completed', 'the source kept the guest');
        t.equal((await A.agent.client.domain('vm')).state, 'running', 'and runs it while the destination is frozen');
      }
      thaw();
      break;
    }
  }

  // Both agents drive the job to an end by themselves.
  const sourceJob = await waitFor('source job ended', async () => {
    const j = await jobOf(A, migrationId);
    return j && j.status !== 'running' ? j : null;
  }, { timeoutMs: 120_000, intervalMs: 200 });
  const destinationJob: { status: string } = await waitFor('destination job ended or absent', async () => {
    const j = await jobOf(B, migrationId);
    if (!j) return { status: 'none' };
    return j.status !== 'running' ? j : null;
  }, { timeoutMs: 120_000, intervalMs: 200 });

  // --- the invariant ---
  const liveA = await liveQemus(A.stateDir);
  const liveB = await liveQemus(B.stateDir);
  const copies = liveA.length + liveB.length;
  const guestQemuKilled = fault === 'kill source qemu' && !['after stream, before Finish2', 'during Finish2', 'in postcopy'].includes(phase);
  const infoA = await A.agent.client.domain('vm').catch(() => null);
  const infoB = await B.agent.client.domain('vm').catch(() => null);
  let outcome: string;
  if (postcopy && (fault === 'kill source qemu' || fault === 'kill destination qemu')) {
    // Postcopy's price: the guest's memory was split between the hosts, and half of it is gone.
    t.equal(sourceJob.status, 'failed', `the source job fails (${sourceJob.error?.code}: ${sourceJob.error?.message})`);
    t.equal(destinationJob.status, 'failed', 'and so does the destination\'s');
    t.equal(copies, 1, 'the qemu that is left is kept for an operator to look at, never ended by the agents');
    t.not(infoA?.state, 'running', 'the source\'s out-of-date copy is never resumed');
    const [left] = liveA.length === 1 ? [A] : [B];
    await left.agent.client.lifecycle('vm', 'destroy');
    outcome = `lost (${sourceJob.error?.code}, reported by both)`;
  } else if (copies === 0 && guestQemuKilled) {
    t.equal(infoA?.state, 'shutoff', 'the guest whose qemu was killed is shut off on A');
    t.equal(infoA?.reason, 'crashed', 'and reported crashed, not silently');
    t.notOk(infoB && infoB.state !== 'shutoff', 'B does not claim it');
    outcome = 'crashed (reported on A)';
  } else {
    t.equal(copies, 1, `exactly one qemu runs the guest (A ${liveA.length}, B ${liveB.length})`);
    const [owner, other, ownerInfo, otherInfo] = liveB.length === 1 ? [B, A, infoB, infoA] : [A, B, infoA, infoB];
    t.equal(ownerInfo?.state, 'running', 'the owner runs it');
    t.ok(!otherInfo || otherInfo.state === 'shutoff', 'the other agent agrees it does not own it');
    const ownerIsB = owner === B;
    t.equal(sourceJob.status === 'completed', ownerIsB, `jobs agree with ownership (source ${sourceJob.status}, destination ${destinationJob.status})`);
    if (ownerIsB) t.equal(destinationJob.status, 'completed', 'destination job completed');
    else t.not(destinationJob.status, 'completed', 'destination job did not complete');
    const after = await waitFor('guest progresses after the fault', async () => {
      const s = await serial();
      return s.lastPass !== null && s.lastPass > before.lastPass! ? s : null;
    }, { timeoutMs: 30_000 });
    t.same(after.boots, [bootId], 'same guest: one boot, same boot id (no reboot)');
    t.same(await fs.readdir(path.join(other.stateDir, 'run')), [], 'no socket or pidfile on the non-owner');
    outcome = `${ownerIsB ? 'B' : 'A'} owns (${sourceJob.status}${sourceJob.error ? `: ${sourceJob.error.code}` : ''})`;
    await owner.agent.client.lifecycle('vm', 'destroy');
  }
  t.same([...(await liveQemus(A.stateDir)), ...(await liveQemus(B.stateDir))], [], 'no qemu left after the cell');
  return outcome;
}

if (process.getuid?.() !== 0 || !canMakeNamespaces()) {
  t.comment('fault matrix needs root and network namespaces; not run');
  t.pass('fault matrix not applicable on this machine');
} else {
  for (const fault of FAULTS) {
    for (const phase of PHASES) {
      t.test(`${fault} / ${phase}`, async (t) => {
        try {
          matrix.set(`${fault}|${phase}`, await runCell(t, fault, phase));
        } catch (err) {
          matrix.set(`${fault}|${phase}`, `ERROR: ${(err as Error).message}`);
          throw err;
        }
      });
    }
  }
  t.teardown(() => {
    const width = Math.max(...FAULTS.map((f) => f.length));
    const lines = ['fault matrix (rows: fault, columns: phase):', `${''.padEnd(width)} | ${PHASES.join(' | ')}`];
    for (const fault of FAULTS) {
      lines.push(`${fault.padEnd(width)} | ${PHASES.map((p) => matrix.get(`${fault}|${p}`) ?? 'not run').join(' | ')}`);
    }
    // stderr: tap passes it through untouched, so the matrix shows in any reporter.
    process.stderr.write(lines.join('\n') + '\n');
  });
}
