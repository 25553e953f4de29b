import t from 'tap';
import path from 'node:path';
import { buildAgent } from '../../src/agent/app.js';
import { agentConfig, spawnAgent, startAgent, tmpDir } from '../helpers/agents.js';
import { runCli } from '../helpers/cli.js';

t.test('one agent per state directory', async (t) => {
  const dir = await tmpDir(t);
  const first = await startAgent(t, dir, 'a');
  const uuid = (await first.client.host()).uuid;

  await t.rejects(buildAgent(agentConfig(dir, 'a')), { name: 'StateDirBusyError', message: /state directory .*\/a is in use by another agent \(pid \d+\)/ }, 'a second agent in this process is refused');

  const cli = await runCli(['agent', '--listen', '127.0.0.1:0', '--state-dir', path.join(dir, 'a'), '--allow-path', dir, '--accel', 'tcg'], { KVM_MIGRATE_TOKEN: 'x' });
  t.equal(cli.code, 1, 'the CLI agent exits 1');
  t.match(cli.stderr, new RegExp(`in use by another agent \\(pid ${process.pid}\\); one agent per state directory`), 'and says who holds it');
  t.equal((await first.client.host()).uuid, uuid, 'the first agent runs on, unchanged');

  await first.app.close();
  const next = await startAgent(t, dir, 'a');
  t.equal((await next.client.host()).uuid, uuid, 'once the first is closed, the next one takes the directory');
});

t.test('a killed agent holds nothing: the kernel drops its lock', async (t) => {
  const dir = await tmpDir(t);
  const stateDir = path.join(dir, 'b');
  const spawned = await spawnAgent(t, { host: '127.0.0.1', stateDir, allowPath: dir });
  await t.rejects(buildAgent({ ...agentConfig(dir, 'b') }), { name: 'StateDirBusyError' }, 'held while it runs');
  await spawned.kill9();
  const after = await startAgent(t, dir, 'b');
  t.equal((await after.client.call<{ status: string }>('GET', '/health')).status, 'ok', 'a new agent starts on it after kill -9');
});
