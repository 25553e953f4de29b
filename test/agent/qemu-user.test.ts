import t from 'tap';
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { buildAgent } from '../../src/agent/app.js';
import { DEFAULT_QEMU_UIDS, parseUidRange, QemuUsers } from '../../src/agent/qemu-user.js';
import { agentConfig, startAgent, testGuest, tmpDir } from '../helpers/agents.js';

/** The real uid, gid and effective capabilities of a live process. */
async function identityOf(pid: number): Promise<{ uid: number; gid: number; capEff: bigint }> {
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8');
  const field = (name: string) => new RegExp(`^${name}:\\s+(\\S+)`, 'm').exec(status)?.[1] ?? '';
  return { uid: Number(field('Uid')), gid: Number(field('Gid')), capEff: BigInt(`0x${field('CapEff')}`) };
}

// A range of this file's own, so that no other agent's qemu holds its first uid.
const UIDS = { first: DEFAULT_QEMU_UIDS.first + 50_000, last: DEFAULT_QEMU_UIDS.first + 50_099 };

t.test('each qemu runs as a user id of its own, without capabilities, and cannot reach a neighbour', async (t) => {
  const dir = await tmpDir(t);
  const { client, app, config } = await startAgent(t, dir, 'a', { qemuUids: UIDS });
  t.match((await client.host()).qemuUser, /each qemu runs as a user of its own/);
  const pids: number[] = [];
  for (const name of ['vm1', 'vm2']) {
    await client.define((await testGuest(dir, name)).xml);
    pids.push((await client.lifecycle(name, 'start')).pid!);
  }
  const [one, two] = await Promise.all(pids.map(identityOf));
  for (const id of [one!, two!]) {
    t.ok(id.uid >= UIDS.first && id.uid <= UIDS.last, `uid ${id.uid} from the range`);
    t.equal(id.capEff, 0n, 'no capabilities');
  }
  t.not(one!.uid, two!.uid, 'two guests, two users');
  t.equal(one!.gid, two!.gid, 'one group for all');

  const uuid = (await client.domain('vm2')).uuid;
  const runDir = path.join(config.stateDir, 'run', uuid);
  const st = await fs.stat(runDir);
  t.equal(st.uid, two!.uid, "the guest's run directory is its qemu's");
  t.equal(st.mode & 0o777, 0o700, 'and no one else may enter it');
  // vm1's qemu user tries vm2's monitor socket, as a guest that took over its qemu would.
  const probe = spawnSync(process.execPath, ['-e', `require('net').connect(${JSON.stringify(path.join(runDir, 'qmp'))}).on('connect',()=>{console.log('connected');process.exit(0)}).on('error',(e)=>{console.log(e.code);process.exit(1)})`], {
    uid: one!.uid,
    gid: one!.gid,
    encoding: 'utf8',
    timeout: 10_000,
  });
  t.equal(probe.stdout.trim(), 'EACCES', "vm1's user cannot connect to vm2's QMP socket");
  for (const name of ['vm1', 'vm2']) await client.lifecycle(name, 'destroy');
  await t.rejects(fs.stat(runDir), { code: 'ENOENT' }, 'the run directory goes with its qemu');
  // A uid is free again once its qemu is gone.
  await client.lifecycle('vm1', 'start');
  t.equal((await identityOf((await client.domain('vm1')).pid!)).uid, UIDS.first, 'the lowest free uid again');
  await client.lifecycle('vm1', 'destroy');
  t.ok(app.agent.domains.list().every((e) => !e.run));
});

t.test('--qemu-user root and --qemu-user ACCOUNT', async (t) => {
  const dir = await tmpDir(t);
  const root = await startAgent(t, dir, 'a', { qemuUser: 'root' });
  t.match((await root.client.host()).qemuUser, /root \(--qemu-user root\)/);
  await root.client.define((await testGuest(dir, 'vm1')).xml);
  t.equal((await identityOf((await root.client.lifecycle('vm1', 'start')).pid!)).uid, 0, 'root, as asked');
  await root.client.lifecycle('vm1', 'destroy');

  const nobody = await startAgent(t, dir, 'b', { qemuUser: 'nobody' });
  await nobody.client.define((await testGuest(dir, 'vm2')).xml);
  const id = await identityOf((await nobody.client.lifecycle('vm2', 'start')).pid!);
  t.equal(id.uid, 65534, "the account's uid");
  await nobody.client.lifecycle('vm2', 'destroy');

  await t.rejects(buildAgent(agentConfig(dir, 'c', { qemuUser: 'no-such-account-here' })), /--qemu-user no-such-account-here: no such account/);
});

t.test("a state directory qemu's user cannot pass through is refused at start, naming the directory", async (t) => {
  const dir = await tmpDir(t);
  const closed = path.join(dir, 'closed');
  await fs.mkdir(closed, { mode: 0o700 });
  await fs.chmod(closed, 0o700);
  await t.rejects(buildAgent(agentConfig(closed, 'a')), new RegExp(`${closed} is mode 0700: let others pass through it \\(chmod o\\+x ${closed}\\)`));
});

t.test('uid ranges and allocation', async (t) => {
  t.same(parseUidRange('2000000000-2000000009'), { first: 2_000_000_000, last: 2_000_000_009 });
  for (const bad of ['0-10', '5-4', '1000-4294967295', 'x', '']) t.throws(() => parseUidRange(bad), /--qemu-uids must be FIRST-LAST/, bad);
  const users = await QemuUsers.resolve('dynamic', { first: 2_000_000_000, last: 2_000_000_001 });
  const a = users.allocate();
  const b = users.allocate();
  t.same([a?.uid, b?.uid], [2_000_000_000, 2_000_000_001], 'launches under way get distinct uids');
  t.throws(() => users.allocate(), /every qemu user id in 2000000000-2000000001 is in use/);
  users.release(a);
  t.equal(users.allocate()?.uid, 2_000_000_000, 'a released uid is handed out again');
});
