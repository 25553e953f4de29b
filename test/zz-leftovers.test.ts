import t from 'tap';
import { promises as fs } from 'node:fs';
import { execFileSync } from 'node:child_process';
import os from 'node:os';
import { TMP_PREFIX } from './helpers/agents.js';
import { havePodman, podmanObjectsNamed, RIG_PREFIX } from './helpers/containers.js';

// The tests' own temp dirs, and those of the accelerator probe and the demo that tests run.
const SUITE_PREFIXES = [TMP_PREFIX, 'kvm-migrate-probe-', 'kvm-migrate-demo-'];

// Runs last: the suite must leave no qemu, temp dir (with its sockets) or namespace behind.
t.test('no qemu or swtpm process of the suite is left', async (t) => {
  const leftovers: string[] = [];
  for (const pid of await fs.readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const program = cmdline.split('\0')[0] ?? '';
    if (cmdline.startsWith('qemu-system') || cmdline.includes('/qemu-system-') || /(^|\/)swtpm(_setup)?$/.test(program)) {
      if (SUITE_PREFIXES.some((prefix) => cmdline.includes(prefix))) leftovers.push(`${pid}: ${cmdline.replace(/\0/g, ' ').slice(0, 200)}`);
    }
  }
  t.same(leftovers, [], 'qemu and swtpm processes started by tests');
});

t.test('no temp dir of the suite is left', async (t) => {
  const stray = (await fs.readdir(os.tmpdir())).filter((e) => SUITE_PREFIXES.some((prefix) => e.startsWith(prefix)));
  t.same(stray, [], 'temp dirs (state dirs, sockets, images)');
});

t.test('no network namespace of the suite is left', async (t) => {
  let out = '';
  try {
    out = execFileSync('ip', ['netns', 'list'], { encoding: 'utf8' });
  } catch {
    t.comment('ip netns unavailable: nothing to check');
    return;
  }
  t.same(out.split('\n').filter((l) => l.startsWith('kmt')), [], 'namespaces named kmt*');
});

t.test('no container, volume or network of the compose rig is left', async (t) => {
  if (!(await havePodman())) {
    t.comment('podman is not installed: nothing to check');
    return;
  }
  t.same(await podmanObjectsNamed(RIG_PREFIX), [], `podman objects named ${RIG_PREFIX}*`);
});
