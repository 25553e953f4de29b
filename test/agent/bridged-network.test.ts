// Bridged networking on real qemu: an <interface type='network'> mapped by --network to a bridge
// the test makes in a network namespace of its own. The agent runs inside that namespace (as
// root; qemu as a user of its own, under the seccomp filter that forbids qemu-bridge-helper),
// makes the tap, and deletes it when qemu ends, also after an agent restart, but never a tap
// that is not the one it made. The Linux test guest answers HTTP on 10.0.2.15 over the bridge,
// and its guest agent answers on the socket the agent placed in the guest's run directory.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { LINUX_GUEST_CMDLINE, parseLinuxSerialLog, type LinuxGuest } from '../../src/guest/linux.js';
import { canMakeNamespaces } from '../helpers/netns.js';
import { spawnAgent, tmpDir, waitFor, type TestContext } from '../helpers/agents.js';
import { copyLinuxGuest, guestAgentExchange, linuxGuestOrSkip } from '../helpers/linux-guest.js';

const ip = (...args: string[]) => execFileSync('ip', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
const inNs = (ns: string, ...cmd: string[]) => execFileSync('ip', ['netns', 'exec', ns, ...cmd], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 15_000 });

let guest: LinuxGuest | undefined;
let skip: string | false = process.getuid?.() !== 0 ? 'needs root' : !canMakeNamespaces() ? 'cannot make network namespaces' : false;
if (!skip) ({ guest, skip } = await linuxGuestOrSkip());

interface Rig {
  ns: string;
  bridge: string;
  agentAddr: string;
}

/** A namespace with a bridge at 10.0.2.2/24 (the guest's gateway) and a veth to reach the agent. */
function makeRig(t: TestContext): Rig {
  const id = randomBytes(2).toString('hex');
  const n = 1 + (parseInt(id, 16) % 250);
  const ns = `kmt${id}n`;
  t.teardown(() => {
    try {
      ip('netns', 'del', ns); // its bridge, taps and veth end (the host side of the veth with it)
    } catch {
      // gone already
    }
  });
  ip('netns', 'add', ns);
  ip('-n', ns, 'link', 'set', 'lo', 'up');
  const bridge = `kmt${id}br`;
  ip('-n', ns, 'link', 'add', bridge, 'type', 'bridge');
  ip('-n', ns, 'addr', 'add', '10.0.2.2/24', 'dev', bridge);
  ip('-n', ns, 'link', 'set', bridge, 'up');
  const [outer, inner] = [`kmt${id}c0`, `kmt${id}c1`];
  ip('link', 'add', outer, 'type', 'veth', 'peer', 'name', inner);
  ip('link', 'set', inner, 'netns', ns);
  ip('addr', 'add', `10.79.${n}.1/30`, 'dev', outer);
  ip('-n', ns, 'addr', 'add', `10.79.${n}.2/30`, 'dev', inner);
  ip('link', 'set', outer, 'up');
  ip('-n', ns, 'link', 'set', inner, 'up');
  return { ns, bridge, agentAddr: `10.79.${n}.2` };
}

/** The taps on the bridge, with their owners. */
function tapsOn(rig: Rig): Array<{ name: string; user: unknown }> {
  const links = JSON.parse(ip('-n', rig.ns, '-d', '-j', 'link', 'show', 'master', rig.bridge)) as Array<{ ifname: string; linkinfo?: { info_slave_kind?: string; info_kind?: string; info_data?: { user?: unknown } } }>;
  return links.filter((l) => l.linkinfo?.info_kind === 'tun').map((l) => ({ name: l.ifname, user: l.linkinfo?.info_data?.user }));
}

const linkExists = (rig: Rig, name: string) => {
  try {
    ip('-n', rig.ns, 'link', 'show', 'dev', name);
    return true;
  } catch {
    return false;
  }
};

/** The process has exited (gone, or a zombie nobody reaped yet). */
async function qemuGone(pid: number): Promise<boolean> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  return stat === '' || state === 'Z' || state === 'X';
}

t.test('a guest on a mapped network: the agent makes its tap, traffic crosses the bridge, the tap goes with qemu', { skip }, async (t) => {
  const dir = await tmpDir(t);
  const rig = makeRig(t);
  // The usual /dev/net/tun (udev gives it 0666) for the agent's namespace only: qemu's own user
  // opens it to attach to its tap. A node of the test's, bound over /dev/net/tun in the private
  // mount namespace of `ip netns exec`; the host's stays as it is.
  const tun = path.join(dir, 'tun');
  execFileSync('mknod', ['-m', '666', tun, 'c', '10', '200']);
  const prefix = ['sh', '-c', 'mount --bind "$0" /dev/net/tun && exec "$@"', tun];
  const stateDir = path.join(dir, 'a');
  const start = () => spawnAgent(t, { host: rig.agentAddr, netns: rig.ns, stateDir, allowPath: dir, prefix, extra: ['--network', `default=${rig.bridge}`] });
  let agent = await start();

  const { kernel, initrd } = await copyLinuxGuest(guest!, dir);
  const disk = path.join(dir, 'net1.raw');
  await fs.writeFile(disk, Buffer.alloc(16 * 1024 * 1024));
  const serialLog = path.join(dir, 'net1.serial.log');
  const xml = `<domain type='kvm'>
  <name>net1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${kernel}</kernel>
    <initrd>${initrd}</initrd>
    <cmdline>${LINUX_GUEST_CMDLINE}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='${disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <mac address='52:54:00:4e:00:01'/>
      <model type='virtio'/>
      <mtu size='1400'/>
    </interface>
    <serial type='file'>
      <source path='${serialLog}'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <memballoon model='virtio'/>
  </devices>
</domain>`;
  const defined = await agent.client.define(xml);
  const started = await agent.client.lifecycle('net1', 'start');
  const pid = started.pid!;
  const [tap, ...more] = tapsOn(rig);
  t.ok(tap && tap.name.startsWith('kmv'), `one tap of the agent's on the bridge: ${JSON.stringify(tapsOn(rig))}`);
  t.same(more, [], 'only one');
  const qemuUid = Number(/^Uid:\s+(\d+)/m.exec(await fs.readFile(`/proc/${pid}/status`, 'utf8'))![1]);
  t.not(qemuUid, 0, 'qemu runs as a user of its own');
  t.equal(Number(tap!.user), qemuUid, "the tap is qemu's user's");
  t.equal((JSON.parse(ip('-n', rig.ns, '-j', 'link', 'show', 'dev', tap!.name)) as Array<{ mtu: number }>)[0]!.mtu, 1400, "the tap has the interface's <mtu>");

  const booted = await waitFor('the guest ticks', async () => {
    const log = parseLinuxSerialLog(await fs.readFile(serialLog, 'latin1').catch(() => ''));
    return log.ticks.length > 0 ? log : null;
  }, { timeoutMs: 90_000, intervalMs: 200 });
  t.ok(booted.devices.net?.ok, `the guest's eth0: ${JSON.stringify(booted.devices.net)}`);
  t.ok(booted.devices.agent?.ok, `the guest's agent port: ${JSON.stringify(booted.devices.agent)}`);

  // Through the bridge: the page the guest serves, fetched from inside the namespace.
  const page = await waitFor('the guest answers over the bridge', () => {
    try {
      return inNs(rig.ns, 'curl', '-s', '--max-time', '5', 'http://10.0.2.15/');
    } catch {
      return null;
    }
  }, { timeoutMs: 30_000, intervalMs: 500 });
  t.match(page, new RegExp(`^KMLINUX boot ${booted.boots[0]} tick \\d+`, 'm'), 'the guest answered HTTP on the bridged network');

  // The guest agent, on the socket in the guest's run directory.
  const socketPath = path.join(stateDir, 'run', defined.uuid, 'channel0.sock');
  t.same(await guestAgentExchange(socketPath, [{ execute: 'guest-sync', arguments: { id: 4711 } }, { execute: 'guest-ping' }]), [{ return: 4711 }, { return: {} }], 'the guest agent answers');

  await agent.client.lifecycle('net1', 'destroy');
  t.notOk(linkExists(rig, tap!.name), 'the tap is gone with qemu');

  // The agent dies, then its qemu: the restarted agent deletes the tap it had made.
  const again = await agent.client.lifecycle('net1', 'start');
  const [tap2] = tapsOn(rig);
  t.ok(tap2, 'a tap again');
  await agent.kill9();
  process.kill(again.pid!, 'SIGKILL');
  await waitFor('qemu gone', () => qemuGone(again.pid!), { timeoutMs: 15_000 });
  t.ok(linkExists(rig, tap2!.name), 'the tap outlived both');
  agent = await start();
  t.notOk(linkExists(rig, tap2!.name), 'the restarted agent deleted it');

  // A tap of that name that is no longer its own (another user's) is left alone.
  const third = await agent.client.lifecycle('net1', 'start');
  const [tap3] = tapsOn(rig);
  await agent.kill9();
  process.kill(third.pid!, 'SIGKILL');
  await waitFor('qemu gone', () => qemuGone(third.pid!), { timeoutMs: 15_000 });
  ip('-n', rig.ns, 'link', 'del', 'dev', tap3!.name);
  ip('-n', rig.ns, 'tuntap', 'add', 'dev', tap3!.name, 'mode', 'tap', 'user', '4242');
  agent = await start();
  t.ok(linkExists(rig, tap3!.name), "another user's tap of that name is not deleted");
  t.equal(Number(JSON.parse(ip('-n', rig.ns, '-d', '-j', 'link', 'show', 'dev', tap3!.name))[0].linkinfo.info_data.user), 4242, 'and still theirs');
});
