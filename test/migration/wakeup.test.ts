// The poll loops' wakeable pause (src/migration/wakeup.ts): an event ends the pause under way, or
// the next one when it came between two (during a query), and never more than one.
import t from 'tap';
import { Wakeup } from '../../src/migration/wakeup.js';

t.test('a pause lasts its time without a wake, and ends at once on one', async (t) => {
  const w = new Wakeup();
  let started = performance.now();
  await w.sleep(50);
  t.ok(performance.now() - started >= 45, 'waited its time');
  started = performance.now();
  setTimeout(() => w.wake(), 10);
  await w.sleep(5000);
  t.ok(performance.now() - started < 1000, 'a wake ends it');
});

t.test('a wake between two pauses ends the next one at once, and only that one', async (t) => {
  const w = new Wakeup();
  w.wake();
  w.wake();
  let started = performance.now();
  await w.sleep(5000);
  t.ok(performance.now() - started < 100, 'the event seen during the query is not lost');
  started = performance.now();
  await w.sleep(50);
  t.ok(performance.now() - started >= 45, 'two wakes before it count once');
});
