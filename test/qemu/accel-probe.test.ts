import t from 'tap';
import { readdir } from 'node:fs/promises';
import os from 'node:os';
import { chooseAccel, decideAccel, measureFill, PROBE_BOUND_MS, type FillMeasurement } from '../../src/qemu/accel-probe.js';
import { probeQemu } from '../../src/qemu/host.js';
import { startAgent, tmpDir, waitFor } from '../helpers/agents.js';
import type { HostInfo } from '../../src/host-info.js';
import { processesMentioning } from './helpers.js';

const fill = (accel: 'kvm' | 'tcg', fillMs?: number, failure?: string): FillMeasurement => ({ accel, fillMiB: 16, ...(fillMs !== undefined ? { fillMs } : {}), ...(failure ? { failure } : {}) });

async function probeDirsLeft(): Promise<string[]> {
  return (await readdir(os.tmpdir())).filter((e) => e.startsWith('kvm-migrate-probe-'));
}

t.test('the choice follows the figures', async (t) => {
  const tcg = fill('tcg', 40);
  t.match(decideAccel(false, undefined, tcg), { accel: 'tcg', reason: /KVM is not usable here.*TCG in 40 ms/ }, 'no usable KVM: TCG');
  t.match(decideAccel(true, fill('kvm', 12), tcg), { accel: 'kvm', reason: /KVM touched 16 MiB in 12 ms, TCG in 40 ms/ }, 'fast KVM: KVM');
  t.match(decideAccel(true, fill('kvm', 1000), tcg), { accel: 'kvm' }, 'at the bound: KVM');
  t.match(decideAccel(true, fill('kvm', 1001), tcg), { accel: 'tcg', reason: /KVM touched 16 MiB in 1001 ms.*chosen at 1000 ms or less/ }, 'over the bound: TCG');
  t.match(decideAccel(true, fill('kvm', undefined, 'did not touch 16 MiB within 4000 ms'), tcg), { accel: 'tcg', reason: /KVM did not touch 16 MiB within 4000 ms/ }, 'timed out: TCG');
  t.match(decideAccel(true, fill('kvm', 5000), fill('tcg', undefined, 'qemu exited')), { accel: 'kvm', reason: /slow/ }, 'slow KVM beats a TCG that cannot run');
  t.match(decideAccel(true, fill('kvm', 30), tcg, 10), { accel: 'tcg' }, 'the bound is a parameter');
});

t.test('a real measurement under TCG: a figure within the bound, no qemu or file left', async (t) => {
  const qemu = await probeQemu();
  const before = await probeDirsLeft();
  const m = await measureFill(qemu.binary, 'tcg');
  t.equal(m.failure, undefined, `no failure (${m.failure})`);
  t.ok(m.fillMs !== undefined && m.fillMs > 0 && m.fillMs < PROBE_BOUND_MS, `TCG filled 16 MiB in ${m.fillMs} ms`);
  t.same(await probeDirsLeft(), before, 'its temp dir is removed');
});

t.test('the bound holds: a fill that cannot finish in time is cut off and its qemu ended', async (t) => {
  const qemu = await probeQemu();
  const started = Date.now();
  const m = await measureFill(qemu.binary, 'tcg', { fillMiB: 64, boundMs: 30 });
  const took = Date.now() - started;
  t.equal(m.fillMs, undefined, 'no figure');
  t.match(m.failure, /did not touch 64 MiB within 30 ms/, m.failure ?? '');
  t.ok(took < 5000, `returned after ${took} ms`);
  t.same(processesMentioning('kvm-migrate-probe-'), [], 'no probe qemu left');
});

t.test('a cancelled probe ends its qemu at once', async (t) => {
  const qemu = await probeQemu();
  const abort = new AbortController();
  setTimeout(() => abort.abort(), 20);
  const m = await measureFill(qemu.binary, 'tcg', { fillMiB: 2000, signal: abort.signal });
  t.match(m.failure, /cancelled/);
  t.same(processesMentioning('kvm-migrate-probe-'), [], 'no probe qemu left');
});

t.test('both outcomes on real qemu: the bound decides', async (t) => {
  const qemu = await probeQemu();
  const lenient = await chooseAccel(qemu.binary, qemu.kvmUsable, { fillMiB: 2, fastEnoughMs: 60_000, boundMs: 30_000 });
  t.comment(lenient.reason);
  if (qemu.kvmUsable) {
    t.equal(lenient.accel, 'kvm', 'KVM is chosen when whatever it measured is fast enough');
    t.ok(lenient.kvm?.fillMs !== undefined, 'with its figure');
  } else {
    t.equal(lenient.accel, 'tcg', 'no usable KVM here: TCG whatever the bound');
  }
  const strict = await chooseAccel(qemu.binary, qemu.kvmUsable, { fastEnoughMs: 0, boundMs: 2000 });
  t.comment(strict.reason);
  t.equal(strict.accel, 'tcg', 'TCG when no KVM figure can be fast enough');
  t.ok(strict.tcg?.fillMs !== undefined, 'TCG was measured');
});

t.test('an agent with --accel auto measures after start and says so in GET /host', async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a', { accel: 'auto' });
  const report = await waitFor('the measurement', async () => {
    const host = await agent.client.call<HostInfo>('GET', '/host');
    return host.accelProbe.state === 'measured' ? host : null;
  }, { timeoutMs: 3 * PROBE_BOUND_MS, intervalMs: 100 });
  const probe = report.accelProbe as Extract<HostInfo['accelProbe'], { state: 'measured' }>;
  t.ok(probe.tcg?.fillMs !== undefined, `TCG figure: ${probe.reason}`);
  t.equal(probe.kvmSlow, report.accelerator === 'kvm' && probe.accel === 'tcg', 'kvmSlow: runs on KVM, TCG measured faster');
  t.equal(report.accelerator, report.kvmUsable ? 'kvm' : 'tcg', 'auto still runs guests on KVM wherever it works');

  const forced = await startAgent(t, dir, 'b', { accel: 'tcg' });
  t.match((await forced.client.call<HostInfo>('GET', '/host')).accelProbe, { state: 'not-measured', reason: /--accel tcg/ }, 'an explicit --accel is not measured');
});

t.test('closing an agent while it measures ends the probe qemu', async (t) => {
  const dir = await tmpDir(t);
  const agent = await startAgent(t, dir, 'a', { accel: 'auto' });
  await agent.app.close();
  t.same(processesMentioning('kvm-migrate-probe-'), [], 'no probe qemu left');
  t.same(await probeDirsLeft(), [], 'no probe dir left');
});
