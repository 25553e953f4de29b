import t from 'tap';
import { parseNetworks } from '../../src/config.js';

t.test('--network NAME=BRIDGE', async (t) => {
  t.same(parseNetworks(['default=virbr0', 'lan=br-lan.10']), { default: 'virbr0', lan: 'br-lan.10' });
  t.same(parseNetworks([]), {});
  for (const bad of ['default', 'default=', '=br0', 'a=b=c', 'default=bridge-name-too-long', 'de/fault=br0', 'x=br0,helper=/bin/sh']) {
    t.throws(() => parseNetworks([bad]), /--network must be NAME=BRIDGE/, bad);
  }
  t.throws(() => parseNetworks(['default=br0', 'default=br1']), /given twice/);
});
