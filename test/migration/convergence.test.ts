// The convergence policy (src/migration/convergence.ts) fed query-migrate samples by hand, no
// qemu: the ladder (downtime schedule, throttle, deadline action), its order, and what stops it.
import t from 'tap';
import { ConvergencePolicy, type ConvergenceAction, type ConvergenceSample } from '../../src/migration/convergence.js';
import { DEFAULT_OPTIONS, ESCALATE_AFTER_MS, type MigrationOptions } from '../../src/migration/params.js';

const MiB = 1024 * 1024;
const GUEST = 512 * MiB;
/** Between two samples, as the stream follower polls. */
const TICK = 250;

/** A guest that dirties faster than the stream: what remains hovers at 300 MiB while bytes flow. */
function busy(at: number): ConvergenceSample {
  return { remainingBytes: 300 * MiB, transferredBytes: at * 1000, totalBytes: GUEST };
}

/** Feed samples every TICK from `from` until `until` ms; the actions that were not `none`, with when. */
function run(policy: ConvergencePolicy, from: number, until: number, sample: (at: number) => ConvergenceSample): Array<{ at: number; action: ConvergenceAction }> {
  const taken: Array<{ at: number; action: ConvergenceAction }> = [];
  for (let at = from; at <= until; at += TICK) {
    const action = policy.observe(sample(at), at);
    if (action.kind !== 'none') taken.push({ at, action });
  }
  return taken;
}

const options = (o: Partial<MigrationOptions> = {}): MigrationOptions => ({ ...DEFAULT_OPTIONS, ...o });

t.test('the default ladder: downtime doubled to its top, then auto-converge engaged, then the deadline action', async (t) => {
  const policy = new ConvergencePolicy(options({ deadlineAction: 'pause' }), 0, false);
  t.equal(policy.state().autoConverge, 'held', 'auto-converge is on but held until its turn');
  const deadline = (DEFAULT_OPTIONS.completionTimeoutPerGiBSeconds * 1000) / 2;
  const taken = run(policy, 0, deadline + 1000, busy);
  const kinds = taken.map((x) => x.action.kind);
  const raises = taken.filter((x) => x.action.kind === 'raise-downtime').map((x) => (x.action as { downtimeLimitMs: number }).downtimeLimitMs);
  t.ok(raises.length > 0, `the downtime limit rose: ${raises.join(', ')} ms`);
  t.equal(raises.at(-1), DEFAULT_OPTIONS.maxDowntimeMs, 'up to maxDowntimeMs and no further');
  t.same(kinds.slice(raises.length), ['engage-auto-converge', 'pause'], 'then the throttle, then pause and finish');
  t.ok(taken[0]!.at > ESCALATE_AFTER_MS, 'the first step waits for a stall');
  for (let i = 1; i < raises.length + 1; i++) t.ok(taken[i]!.at - taken[i - 1]!.at > ESCALATE_AFTER_MS, `step ${i + 1} waits for a stall after step ${i}`);
  t.equal(taken.at(-1)!.at, deadline, 'the deadline is completionTimeoutPerGiBSeconds per GiB of guest RAM from the start');
  t.match(policy.state(), { step: 'paused', autoConverge: 'engaged', deadlineAt: new Date(deadline).toISOString(), deadlineAction: 'pause' });
});

t.test('deadline action abort: the stream is cancelled at the deadline, not_converging says why', async (t) => {
  const policy = new ConvergencePolicy(options({ deadlineAction: 'abort', completionTimeoutPerGiBSeconds: 40 }), 0, false);
  const taken = run(policy, 0, 30_000, busy);
  t.same(taken.at(-1), { at: 20_000, action: { kind: 'cancel' } }, '40 s per GiB of a 512 MiB guest: cancelled at 20 s');
  t.equal(policy.gaveUp, 'deadline');
  t.equal(policy.state().step, 'giving-up');
  t.match(policy.notConvergingMessage(), /completion deadline passed \(40s per GiB.*deadline action is abort/);
  t.same(run(policy, 30_250, 40_000, busy), [], 'nothing more after giving up');
});

t.test('a stream whose remaining bytes reach new lows is left alone', async (t) => {
  const policy = new ConvergencePolicy(options({ completionTimeoutPerGiBSeconds: 0 }), 0, false);
  const taken = run(policy, 0, 60_000, (at) => ({ remainingBytes: GUEST - at * 1000, transferredBytes: at * 1000, totalBytes: GUEST }));
  t.same(taken, []);
  t.equal(policy.state().step, 'live');
});

t.test('a stream that moves no bytes is stuck, not busy: no step is taken, the progress timeout cancels it', async (t) => {
  const policy = new ConvergencePolicy(options({ progressTimeoutSeconds: 20, completionTimeoutPerGiBSeconds: 10 }), 0, false);
  const taken = run(policy, 0, 30_000, () => ({ remainingBytes: 300 * MiB, transferredBytes: 5 * MiB, totalBytes: GUEST }));
  t.same(taken, [{ at: 20_250, action: { kind: 'cancel' } }], 'neither the ladder nor the deadline pause a guest whose stream is frozen');
  t.equal(policy.gaveUp, 'progress-timeout');
  t.match(policy.notConvergingMessage(), /no progress for 20s/);
});

t.test('without maxDowntimeMs above the limit and without auto-converge, the progress timeout is what remains', async (t) => {
  const policy = new ConvergencePolicy(options({ maxDowntimeMs: 300, autoConverge: false, progressTimeoutSeconds: 3, completionTimeoutPerGiBSeconds: 0 }), 0, false);
  t.same(run(policy, 0, 10_000, busy), [{ at: 3250, action: { kind: 'cancel' } }]);
  t.equal(policy.state().autoConverge, 'off');
});

t.test('each step restarts the progress clock: the timeout counts from the last step', async (t) => {
  const policy = new ConvergencePolicy(options({ progressTimeoutSeconds: 5, completionTimeoutPerGiBSeconds: 0 }), 0, false);
  const taken = run(policy, 0, 60_000, busy);
  const cancel = taken.findIndex((x) => x.action.kind === 'cancel');
  t.equal(cancel, taken.length - 1, 'cancelled last');
  t.equal(taken[cancel]!.at - taken[cancel - 1]!.at, 5250, 'five seconds after the last step (engaging auto-converge)');
  t.equal(taken[cancel - 1]!.action.kind, 'engage-auto-converge');
});

t.test('the dirty limit is tried in place of auto-converge; refused by qemu, the step falls back to auto-converge', async (t) => {
  const policy = new ConvergencePolicy(options({ dirtyLimitMiBps: 8, maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 0 }), 0, false);
  const first = run(policy, 0, 4000, busy);
  t.same(first.map((x) => x.action), [{ kind: 'limit-dirty-rate', mibPerSec: 8 }]);
  const reason = "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'";
  t.same(policy.dirtyLimitRefused(reason), { kind: 'engage-auto-converge' }, 'the fallback is the next action');
  t.match(policy.state(), { step: 'throttled', autoConverge: 'engaged', dirtyLimit: { mibPerSec: 8, state: 'unavailable', reason } });
});

t.test('a dirty limit qemu applied takes the throttle step: auto-converge stays held', async (t) => {
  const policy = new ConvergencePolicy(options({ dirtyLimitMiBps: 8, maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 0, progressTimeoutSeconds: 0 }), 0, false);
  t.same(run(policy, 0, 4000, busy).map((x) => x.action.kind), ['limit-dirty-rate']);
  policy.dirtyLimitApplied();
  t.same(run(policy, 4250, 30_000, busy), [], 'no further step');
  t.match(policy.state(), { autoConverge: 'held', dirtyLimit: { state: 'applied' } });
});

t.test('after pause and finish only the progress timeout acts: a paused stream that stops moving is cancelled', async (t) => {
  const policy = new ConvergencePolicy(options({ deadlineAction: 'pause', completionTimeoutPerGiBSeconds: 20, progressTimeoutSeconds: 15 }), 0, false);
  t.equal(run(policy, 0, 10_000, busy).at(-1)!.action.kind, 'pause');
  // The link then freezes: nothing moves, nothing reaches a new low.
  t.same(run(policy, 10_250, 40_000, () => busy(10_000)), [{ at: 25_250, action: { kind: 'cancel' } }]);
});

t.test("a small guest's deadline comes before any stall: the rungs below are taken first, then the deadline action", async (t) => {
  const policy = new ConvergencePolicy(options({ deadlineAction: 'abort' }), 0, false);
  // 23 MiB at 150 s per GiB: the deadline is at 3.4 s, before the first 3 s stall is over.
  const taken = run(policy, 0, 30_000, (at) => ({ ...busy(at), totalBytes: 23 * MiB }));
  t.same(taken.map((x) => x.action.kind), ['raise-downtime', 'raise-downtime', 'engage-auto-converge', 'cancel']);
  t.equal(policy.gaveUp, 'deadline');
});

t.test('a record written before the deadline existed has none', async (t) => {
  const legacy = { progressTimeoutSeconds: 150, autoConverge: false } as MigrationOptions;
  const policy = new ConvergencePolicy(legacy, 0, false);
  t.same(run(policy, 0, 100_000, busy), [], 'no deadline, no downtime schedule, the progress timeout not yet reached');
  t.notOk(policy.state().deadlineAt);
});

t.test("an operator's downtime limit (PATCH /jobs/{id}) is where the schedule goes on from, never lowered", async (t) => {
  const policy = new ConvergencePolicy(options({ autoConverge: false, completionTimeoutPerGiBSeconds: 0 }), 0, false);
  policy.tuned(2000);
  t.equal(policy.downtimeLimitMs, 2000, 'the tuned limit is the policy\'s');
  const taken = run(policy, 0, 20_000, busy);
  t.notOk(taken.some((x) => x.action.kind === 'raise-downtime'), 'no rung brings it back down to the schedule\'s 1000 ms');
  t.equal(policy.downtimeLimitMs, 2000);
});

t.test('with allowPostcopy the switch to postcopy replaces the throttle: downtime schedule, then postcopy, then nothing more', async (t) => {
  const policy = new ConvergencePolicy(options({ deadlineAction: 'postcopy' }), 0, true);
  const taken = run(policy, 0, 200_000, busy);
  const kinds = taken.map((x) => x.action.kind);
  t.equal(kinds.at(-1), 'postcopy', 'the last step is the switch');
  t.same(kinds.filter((k) => k !== 'raise-downtime'), ['postcopy'], 'no throttle, no deadline pause or abort: only the switch, once');
  t.ok(taken.at(-1)!.at - taken.at(-2)!.at > ESCALATE_AFTER_MS, 'the switch waits for a stall after the last downtime step');
  t.equal(policy.state().step, 'postcopy');
  t.equal(policy.state().autoConverge, 'held', 'the guest was never throttled');
  t.equal(policy.gaveUp, undefined, 'the progress timeout does not cancel a switched stream');
});

t.test('with allowPostcopy and a deadline before the first stall, the deadline switches', async (t) => {
  // 1 s per GiB of a 512 MiB guest: the deadline at 500 ms; the downtime schedule is spent at once (no room above 300 ms).
  const policy = new ConvergencePolicy(options({ deadlineAction: 'postcopy', maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 1 }), 0, true);
  t.same(run(policy, 0, 10_000, busy), [{ at: 500, action: { kind: 'postcopy' } }]);
});

t.test('a stream the transport set up for postcopy, with no deadline action of the caller\'s: the deadline switches instead of aborting; not set up, it aborts', async (t) => {
  const armed = new ConvergencePolicy(options({ maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 1 }), 0, true);
  t.equal(armed.state().deadlineAction, 'postcopy');
  t.same(run(armed, 0, 10_000, busy), [{ at: 500, action: { kind: 'postcopy' } }]);
  const plain = new ConvergencePolicy(options({ maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 1, autoConverge: false }), 0, false);
  t.equal(plain.state().deadlineAction, 'abort');
  t.same(run(plain, 0, 10_000, busy), [{ at: 500, action: { kind: 'cancel' } }]);
  const asked = new ConvergencePolicy(options({ maxDowntimeMs: 300, completionTimeoutPerGiBSeconds: 1, deadlineAction: 'pause' }), 0, true);
  t.same(run(asked, 0, 10_000, busy)[0], { at: 500, action: { kind: 'pause' } }, "the caller's own deadline action stands");
});

t.test("a caller's complete ends the ladder", async (t) => {
  const policy = new ConvergencePolicy(options(), 0, false);
  policy.completing('pause');
  t.same(run(policy, 0, 20_000, busy).map((x) => x.action.kind).filter((k) => k !== 'raise-downtime' && k !== 'cancel'), [], 'no throttle or deadline step after it');
  t.equal(policy.state().step, 'paused');
});
