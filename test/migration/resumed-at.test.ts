import t from 'tap';
import { guestResumedAt } from '../../src/migration/finish2-exchange.js';

t.test("the guest's resume at the destination, on the source's clock", async (t) => {
  t.equal(guestResumedAt(10_000, 9_000, 300), 9_700, 'the answer less how long the guest had run there');
  t.equal(guestResumedAt(10_000, 9_000, undefined), 10_000, 'an older destination says nothing: the answer itself');
  t.equal(guestResumedAt(10_000, 9_000, 5_000), 9_000, 'a figure from before the pause here is not believed: the pause is never negative');
  t.equal(guestResumedAt(10_000, 9_000, -50), 10_000, 'a negative figure counts as none');
  t.equal(guestResumedAt(10_000, 9_000, Number.NaN), 10_000, 'nor does one that is not a number');
});
