import t from 'tap';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { AgentClient } from '../../src/client.js';
import type { HostInfo } from '../../src/host-info.js';
import { packageRoot } from '../../src/agent/package-root.js';
import { guestMemoryMiB, parseSerialLog, writeGuestImage, type GuestParams } from '../../src/guest/image.js';
import { testGuestXml } from '../../src/guest/domain-xml.js';
import { freePort, tmpDir, waitFor } from '../helpers/agents.js';
import { runCli } from '../helpers/cli.js';
import { CONTAINER_BASE_SCRIPT, podmanObjectsNamed, removePodmanObject, RIG_PREFIX } from '../helpers/containers.js';

// The image is kept between runs as the build cache (its layers make a warm build take seconds);
// what a run starts (containers, volumes, network) is named after its compose project and removed.
const IMAGE = `localhost/${RIG_PREFIX}image:latest`;
const GUEST = 'rig-vm';
const PARAMS: GuestParams = { fillMiB: 8, hotMiB: 1, reportEvery: 16 };
/** In the containers: the shared images volume, the agents' default --allow-path (STATE_DIR/images). */
const IMAGES_DIR = '/var/lib/kvm-migrate/images';
/** The agents' port in the containers; each peer reaches the other by its service name. */
const AGENT_PORT = 7100;

const notRoot = process.getuid?.() !== 0 ? 'podman runs rootful here: the test needs root' : false;
const noBase = existsSync(CONTAINER_BASE_SCRIPT) ? false : `no ${CONTAINER_BASE_SCRIPT}: it sets podman up and makes the base images the Dockerfile starts FROM`;

function tail(text: string | undefined, chars = 3000): string {
  return (text ?? '').slice(-chars);
}

/** The environment every podman call needs: container-base.sh exports CONTAINERS_CONF (runc, cgroupfs). */
async function podmanEnv(): Promise<NodeJS.ProcessEnv> {
  const r = await execa('bash', ['-c', 'source "$1" >&2 && printf %s "$CONTAINERS_CONF"', 'container-base', CONTAINER_BASE_SCRIPT], { timeout: 600_000, reject: false });
  if (r.exitCode !== 0 || !r.stdout) throw new Error(`${CONTAINER_BASE_SCRIPT} failed: ${tail(r.stderr)}`);
  return { ...process.env, CONTAINERS_CONF: r.stdout };
}

/**
 * The real node image ships node's headers in /usr/local/include/node, which the Dockerfile
 * builds fs-ext against (node-gyp could otherwise only download them, and nodejs.org is out of
 * reach here). container-base.sh's stand-in holds this machine's node binary and not its
 * headers; the same node's headers are lent to the build for as long as that is so.
 */
async function nodeHeadersMount(env: NodeJS.ProcessEnv, probeName: string): Promise<string[]> {
  const r = await execa('podman', ['run', '--rm', '--name', probeName, 'node:20-bookworm-slim', 'sh', '-c', 'node --version; test -e /usr/local/include/node/common.gypi && echo headers || true'], { env, timeout: 120_000 });
  const [imageNode, headers] = r.stdout.split('\n');
  if (headers === 'headers') return [];
  if (imageNode !== process.version || !existsSync('/usr/include/node/common.gypi')) {
    throw new Error(`node:20-bookworm-slim has no headers in /usr/local/include/node and this machine has none of its node ${imageNode} to lend (it runs ${process.version})`);
  }
  return ['--volume', '/usr/include/node:/usr/local/include/node:ro'];
}

async function buildImage(env: NodeJS.ProcessEnv, probeName: string): Promise<void> {
  const before = (await execa('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE], { env, reject: false })).stdout;
  // Docker's format: OCI images have no HEALTHCHECK.
  const r = await execa('podman', ['build', '--pull=never', '--format', 'docker', ...(await nodeHeadersMount(env, probeName)), '-t', IMAGE, packageRoot], { env, timeout: 900_000, all: true, reject: false });
  if (r.exitCode !== 0) throw new Error(`podman build failed: ${tail(r.all)}`);
  const after = (await execa('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE], { env })).stdout;
  // The image this run replaced is untagged now: only this test made it, so only this test removes it.
  if (before && before !== after) await execa('podman', ['rmi', before], { env, reject: false });
}

async function twoFreePorts(): Promise<[number, number]> {
  const a = await freePort('127.0.0.1');
  // The kernel may hand the same free port out twice in a row; a few tries differ.
  for (let attempt = 0; attempt < 10; attempt++) {
    const b = await freePort('127.0.0.1');
    if (b !== a) return [a, b];
  }
  throw new Error(`127.0.0.1 gave port ${a} ten times`);
}

t.test('the compose rig: two agents in containers migrate the test guest there and back with the CLI', { skip: notRoot || noBase }, async (t) => {
  const started = Date.now();
  const seconds = (from: number) => `${((Date.now() - from) / 1000).toFixed(1)} s`;
  const project = `${RIG_PREFIX}${process.pid}-${randomBytes(3).toString('hex')}`;
  const container = (service: 'a' | 'b') => `${project}_${service}_1`;
  const env = await podmanEnv();
  const dir = await tmpDir(t);
  const token = randomBytes(24).toString('hex');
  const tokenFile = path.join(dir, 'token');
  await fs.writeFile(tokenFile, token, { mode: 0o600 });
  const [portA, portB] = await twoFreePorts();
  const composeEnv = { ...env, IMAGE, PORT_A: String(portA), PORT_B: String(portB), TOKEN_FILE: tokenFile };
  const compose = (...args: string[]) =>
    execa('podman-compose', ['-f', path.join(packageRoot, 'compose.yaml'), '-p', project, ...args], { env: composeEnv, timeout: 300_000, all: true, reject: false });

  // Before anything is made: whatever of this project exists at the end is removed, by its name.
  t.teardown(async () => {
    await compose('down', '--volumes');
    // podman-compose 1.0.3's down leaves the network, and knows nothing of a half-made project.
    for (const o of await podmanObjectsNamed(project, env)) await removePodmanObject(o, env);
  });

  const buildStart = Date.now();
  await buildImage(env, `${project}_node-headers`);
  t.comment(`image built in ${seconds(buildStart)}`);

  const up = await compose('up', '--detach', '--no-build');
  t.equal(up.exitCode, 0, 'podman-compose up', { output: tail(up.all) });
  const urlA = `http://127.0.0.1:${portA}`;
  const urlB = `http://127.0.0.1:${portB}`;
  const a = new AgentClient(urlA, token);
  const b = new AgentClient(urlB, token);
  for (const [name, client] of [['a', a], ['b', b]] as const) {
    await waitFor(`agent ${name} on its published port`, async () => (await client.call<{ status: string }>('GET', '/health')).status === 'ok', { timeoutMs: 60_000, intervalMs: 250 });
  }
  t.comment(`agents up ${seconds(started)} after the start`);

  const health = await execa('podman', ['healthcheck', 'run', container('a')], { env, reject: false, all: true });
  t.equal(health.exitCode, 0, "the image's HEALTHCHECK passes on a running agent", { output: health.all });
  for (const [name, client] of [['a', a], ['b', b]] as const) {
    const host = await client.call<HostInfo>('GET', '/host');
    t.equal(host.migrationAddress, name, `${name} hands its peers its service name as the stream address`);
    t.same([host.kvmUsable, host.accelerator], [false, 'tcg'], `${name}: no /dev/kvm was given, so --accel auto runs guests on TCG`);
  }

  // The guest's disk and serial log on the shared volume, where both agents allow them.
  const image = path.join(dir, `${GUEST}.img`);
  await writeGuestImage(image, PARAMS);
  const cp = await execa('podman', ['cp', image, `${container('a')}:${IMAGES_DIR}/${GUEST}.img`], { env, all: true, reject: false });
  t.equal(cp.exitCode, 0, "the guest's disk copied into the images volume", { output: cp.all });
  const serialLog = `${IMAGES_DIR}/${GUEST}.serial.log`;
  await a.define(testGuestXml({ name: GUEST, image: `${IMAGES_DIR}/${GUEST}.img`, serialLog, memoryMiB: guestMemoryMiB(PARAMS) + 16 }));
  await a.lifecycle(GUEST, 'start');

  const readSerial = async () => parseSerialLog((await execa('podman', ['exec', container('a'), 'cat', serialLog], { env, reject: false })).stdout);
  const passesAbove = (above: number) =>
    waitFor(`${GUEST} past pass ${above}`, async () => {
      const log = await readSerial();
      return log.lastPass !== null && log.lastPass > above ? log : null;
    }, { timeoutMs: 60_000, intervalMs: 500 });
  let log = await passesAbove(0);
  const bootId = log.boots[0];
  t.comment(`${GUEST} runs on a: boot ${bootId}, pass ${log.lastPass}`);

  // The source agent calls the destination itself: --to is the URL it reaches it by (its
  // service name on the compose network), not the port published to this machine.
  const refused = await runCli(['migrate', GUEST, '--from', urlA, '--to', urlB, '--token-file', tokenFile]);
  t.equal(refused.code, 1, 'a destination given by its published port is refused');
  t.match(refused.stderr, /destination_not_a_peer/, 'as no peer of the source', { stderr: refused.stderr });

  const legs = [
    { from: 'a', to: 'b', fromUrl: urlA, source: a, destination: b },
    { from: 'b', to: 'a', fromUrl: urlB, source: b, destination: a },
  ] as const;
  for (const leg of legs) {
    const legStart = Date.now();
    const r = await runCli(['migrate', GUEST, '--from', leg.fromUrl, '--to', `http://${leg.to}:${AGENT_PORT}`, '--token-file', tokenFile]);
    t.equal(r.code, 0, `${leg.from} -> ${leg.to}: the CLI says the migration completed`, { stdout: r.stdout, stderr: tail(r.stderr) });
    t.comment(`${leg.from} -> ${leg.to} in ${seconds(legStart)}: ${r.stdout.trim()}`);
    const jobId = /^migration (\S+):/m.exec(r.stderr)?.[1];
    const job = jobId ? await leg.source.job(jobId) : undefined;
    t.match(job?.uri, new RegExp(`^tcp:${leg.to}:\\d+$`), `the stream went to ${leg.to}'s service name, the address its Prepare2 answered: ${job?.uri}`);
    t.equal((await leg.destination.domain(GUEST)).state, 'running', `${GUEST} runs on ${leg.to}`);
    t.not((await leg.source.domain(GUEST)).state, 'running', `and no longer on ${leg.from}`);
    const before = log.lastPass!;
    log = await passesAbove(before);
    t.same(log.boots, [bootId], `${GUEST} kept counting on ${leg.to} (pass ${before} -> ${log.lastPass}) and never rebooted`);
  }
  t.comment(`the whole rig test took ${seconds(started)}`);
});
