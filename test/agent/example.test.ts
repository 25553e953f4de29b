import t from 'tap';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from '../../src/agent/package-root.js';
import { startAgent, tmpDir } from '../helpers/agents.js';

const run = promisify(execFile);
const README_IMAGES = '/var/lib/kvm-migrate/images';

t.test("the README's example domain defines, starts and stops as it is written", async (t) => {
  const dir = await tmpDir(t);
  const { client } = await startAgent(t, dir, 'a');
  // Only the image directory moves: the example names the default STATE_DIR/images.
  const xml = (await fs.readFile(path.join(packageRoot, 'examples', 'vm1.xml'), 'utf8')).replaceAll(README_IMAGES, dir);
  for (const disk of xml.matchAll(/<source file='([^']+\.qcow2)'/g)) {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk[1]!, '1G']);
  }
  const defined = await client.define(xml);
  t.equal(defined.name, 'vm1', 'accepted');
  t.equal((await client.lifecycle('vm1', 'start')).state, 'running', 'starts (no OS on the empty disk: it sits in its firmware)');
  t.equal((await client.lifecycle('vm1', 'destroy')).state, 'shutoff');
  await client.undefine('vm1');
});
