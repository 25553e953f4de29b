import t from 'tap';
import { waitFor } from '../helpers/agents.js';
import { guestQmp, startGuest, twoAgents } from '../helpers/migration.js';

// More than EventEmitter's default of 10 listeners, the point where Node warns of a leak.
const MIGRATIONS = 12;
const SMALL_GUEST = { fillMiB: 2, hotMiB: 1, reportEvery: 16 };

t.test("a migration's listeners end with its job: many arrivals leave no listener behind", async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const warnings: Error[] = [];
  const onWarning = (w: Error) => {
    if (w.name === 'MaxListenersExceededWarning') warnings.push(w);
  };
  process.on('warning', onWarning);
  t.teardown(() => process.off('warning', onWarning));
  const exitListeners = { a: a.app.agent.domains.listenerCount('exit'), b: b.app.agent.domains.listenerCount('exit') };
  for (let i = 1; i <= MIGRATIONS; i++) {
    const name = `vm${i}`;
    await startGuest(a, dir, name, SMALL_GUEST);
    // What a qemu's QMP client carries with no job: the domain manager's own listener.
    const qmpListeners = guestQmp(a, name).eventListenerCount;
    // Paused arrivals: a dozen TCG guests must not compete for the CPUs.
    const { job } = await a.client.perform({ domain: name, destination: b.url, paused: true }, true);
    t.equal(job.status, 'completed', `${name} migrated`);
    // The destination's job ends just after its answer (its last write follows it): a leak stays, so a bounded wait tells them apart.
    await waitFor(
      `${name}'s listeners on the destination gone`,
      () => guestQmp(b, name).eventListenerCount === qmpListeners && b.app.agent.domains.listenerCount('exit') === exitListeners.b,
      { timeoutMs: 5000, intervalMs: 10 },
    ).catch(() => undefined);
    t.equal(guestQmp(b, name).eventListenerCount, qmpListeners, `${name}'s QMP client on the destination carries no job listener`);
    t.same(
      { a: a.app.agent.domains.listenerCount('exit'), b: b.app.agent.domains.listenerCount('exit') },
      exitListeners,
      `after ${name}, the domain managers carry as many exit listeners as before the first migration`,
    );
  }
  await new Promise((r) => setImmediate(r)); // warnings are emitted on the next tick
  t.same(warnings.map((w) => w.message), [], 'no MaxListenersExceededWarning');
  for (let i = 1; i <= MIGRATIONS; i++) await b.client.lifecycle(`vm${i}`, 'destroy');
});
