/**
 * deploy/kubernetes: the manifest against the Kubernetes object schemas (kubernetes-models: the
 * official OpenAPI schemas, checked with ajv), what the agent and its guests need of it, and its
 * container run as the kubelet would run it on a node (the env resolved from the downward API,
 * the Secret and the hostPath in temporary directories), probed as the kubelet probes it.
 */
import t from 'tap';
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { DaemonSet, type IDaemonSet } from 'kubernetes-models/apps/v1';
import { Namespace, type IContainer, type IEnvVar, type INamespace } from 'kubernetes-models/v1';
import { packageRoot } from '../../src/agent/package-root.js';
import { AgentClient } from '../../src/client.js';
import { freePort, TEST_ACCEL, tmpDir } from '../helpers/agents.js';
import { agentFlagVariables, CLI, probe, startService } from '../helpers/deploy.js';

const MANIFEST_PATH = path.join(packageRoot, 'deploy', 'kubernetes', 'kvm-migrate.yaml');

/** Schema validation per kind (apiVersion/kind); a kind without a model is refused, not passed. */
const VALIDATORS: Record<string, (object: unknown) => void> = {
  'v1/Namespace': (object) => new Namespace(object as INamespace).validate(),
  'apps/v1/DaemonSet': (object) => new DaemonSet(object as IDaemonSet).validate(),
};

function validateObject(object: object): void {
  const { apiVersion, kind } = object as { apiVersion?: unknown; kind?: unknown };
  const validate = VALIDATORS[`${String(apiVersion)}/${String(kind)}`];
  if (!validate) throw new Error(`no schema for ${String(apiVersion)} ${String(kind)} here`);
  validate(object);
}

/** The manifest's documents, read as kubectl reads YAML (1.1: `0400` is octal, `yes` a boolean). */
async function readManifest(): Promise<Array<{ apiVersion?: unknown; kind?: unknown }>> {
  const docs = parseAllDocuments(await fs.readFile(MANIFEST_PATH, 'utf8'), { version: '1.1' });
  if (!Array.isArray(docs)) throw new Error('the manifest holds no document');
  for (const doc of docs) if (doc.errors.length) throw new Error(`YAML: ${doc.errors.map((e) => e.message).join('; ')}`);
  return docs.map((doc) => doc.toJS() as { apiVersion?: unknown; kind?: unknown });
}

const objects = await readManifest();
const daemonSet = objects.find((o) => o.kind === 'DaemonSet') as IDaemonSet;
const pod = daemonSet.spec!.template.spec!;
const [agent] = pod.containers as [IContainer];

function envValue(name: string): string {
  const entry = agent.env?.find((e) => e.name === name);
  if (entry?.value === undefined) throw new Error(`the container sets no value for ${name}`);
  return entry.value;
}

/**
 * The container's environment as the kubelet makes it: fieldRef values from the downward API,
 * then $(VAR) of variables defined earlier in the list ($$ is a $; an unknown one stays as it is).
 */
function resolveEnv(env: IEnvVar[], downwardApi: Record<string, string>): Record<string, string> {
  const resolved: Record<string, string> = {};
  for (const entry of env) {
    const field = entry.valueFrom?.fieldRef?.fieldPath;
    if (field !== undefined) {
      const value = downwardApi[field];
      if (value === undefined) throw new Error(`${entry.name}: the downward API field ${field} is not given here`);
      resolved[entry.name] = value;
    } else if (entry.valueFrom) {
      throw new Error(`${entry.name}: only fieldRef is read here`);
    } else {
      resolved[entry.name] = (entry.value ?? '').replace(/\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (ref, name?: string) =>
        name === undefined ? '$' : (resolved[name] ?? ref),
      );
    }
  }
  return resolved;
}

t.test('every object of the manifest is valid against the Kubernetes schemas', async (t) => {
  t.same(objects.map((o) => o.kind), ['Namespace', 'DaemonSet']);
  for (const object of objects) t.doesNotThrow(() => validateObject(object), `${String(object.kind)} is valid`);
});

t.test('the schema check refuses an invalid object', async (t) => {
  const wrongType = structuredClone(daemonSet) as unknown as { spec: { template: { spec: Record<string, unknown> } } };
  wrongType.spec.template.spec.hostNetwork = 'true';
  t.throws(() => validateObject(wrongType), /hostNetwork must be boolean/, 'a string where a boolean goes');
  const noSelector = structuredClone(daemonSet) as unknown as { spec: Record<string, unknown> };
  delete noSelector.spec.selector;
  t.throws(() => validateObject(noSelector), /data\/spec must have required property selector/, 'a required field missing');
  t.throws(() => validateObject({ ...daemonSet, apiVersion: 'extensions/v1beta1' }), /no schema/, 'a kind this check has no schema for');
});

t.test('the pod is what the agent and its guests need', async (t) => {
  t.equal(agent.securityContext?.privileged, true, 'privileged: /dev/kvm, /dev/net/tun, taps, qemu as users of its own');
  t.equal(pod.hostNetwork, true, "in the node's network namespace: its bridges, its address");
  t.notOk(pod.hostPID, "no hostPID: it would not keep guests alive and would show the agent every process of the node");
  t.equal(daemonSet.spec!.updateStrategy?.type, 'OnDelete', 'a changed template does not restart agents (and end their guests) by itself');
  t.equal(pod.automountServiceAccountToken, false);
  t.same(agent.resources?.limits, undefined, "no limits: the guests share the container's cgroup");

  const volumeOf = (name: string) => pod.volumes?.find((v) => v.name === name);
  const stateDir = envValue('KVM_MIGRATE_STATE_DIR');
  const stateMount = agent.volumeMounts?.find((m) => m.mountPath === stateDir);
  t.ok(stateMount, 'the state directory is a mount');
  const stateVolume = volumeOf(stateMount!.name);
  t.equal(stateVolume?.hostPath?.path, stateDir, "on the node's own path");
  t.equal(stateVolume?.hostPath?.type, 'DirectoryOrCreate');
  // The image declares STATE_DIR/images a VOLUME: only a mount of its own keeps the disks on the node.
  const imagesDir = path.join(stateDir, 'images');
  const imagesMount = agent.volumeMounts?.find((m) => m.mountPath === imagesDir);
  t.equal(volumeOf(imagesMount?.name ?? '')?.hostPath?.path, imagesDir, "the guests' disks are on the node's own path");

  const secretMount = agent.volumeMounts?.find((m) => volumeOf(m.name)?.secret);
  t.equal(secretMount?.readOnly, true);
  t.equal(volumeOf(secretMount!.name)?.secret?.defaultMode, 0o400, 'the Secret is readable by root alone');
  for (const name of ['KVM_MIGRATE_TOKEN_FILE', 'KVM_MIGRATE_TLS_CERT', 'KVM_MIGRATE_TLS_KEY', 'KVM_MIGRATE_TLS_CA']) {
    t.equal(path.dirname(envValue(name)), secretMount!.mountPath, `${name} is a file of the Secret`);
  }

  const listenPort = Number(/:(\d+)$/.exec(envValue('KVM_MIGRATE_LISTEN'))?.[1]);
  for (const [kind, check] of [['readiness', agent.readinessProbe], ['liveness', agent.livenessProbe]] as const) {
    const get = check?.httpGet;
    t.equal(get?.path, '/health', `the ${kind} probe asks /health, which needs no token`);
    t.equal(get?.scheme, 'HTTPS', 'over HTTPS: with TLS the agent serves nothing else');
    const port = agent.ports?.find((p) => p.name === get?.port)?.containerPort;
    t.equal(port, listenPort, `the ${kind} probe's port is the one the agent listens on`);
  }
});

t.test('every KVM_MIGRATE_ variable of the container is a flag of kvm-migrate agent', async (t) => {
  const flags = await agentFlagVariables();
  const named = (agent.env ?? []).map((e) => e.name).filter((name) => name.startsWith('KVM_MIGRATE_'));
  t.ok(named.length >= 5, `the container sets ${named.length} of them`);
  for (const name of named) t.ok(flags.has(name), `${name} is an agent flag`);
});

t.test("the container's command and environment, as the kubelet resolves them on a node, start the agent its probes find ready", async (t) => {
  const dir = await tmpDir(t);
  const node = { name: 'node-a', ip: '127.0.0.5' };
  // The hostPath and the Secret's mount, here: paths in the environment below them move along.
  const relocated = new Map<string, string>();
  for (const mount of agent.volumeMounts ?? []) {
    const local = path.join(dir, mount.name);
    await fs.mkdir(local, { mode: 0o755 });
    relocated.set(mount.mountPath, local);
  }
  const secretDir = relocated.get(path.dirname(envValue('KVM_MIGRATE_TOKEN_FILE')))!;
  // The Secret as the manifest's comment makes it: make-certs.sh named after the node, a token.
  await new Promise<void>((resolve, reject) =>
    execFile('bash', [path.join(packageRoot, 'scripts', 'make-certs.sh'), secretDir, `${node.name}=${node.ip}`], { timeout: 60_000 }, (err) => (err ? reject(err) : resolve())),
  );
  await fs.rm(path.join(secretDir, 'ca-key.pem'));
  const token = 'deploy-kubernetes-token';
  await fs.writeFile(path.join(secretDir, 'token'), token, { mode: 0o400 });

  const resolved = resolveEnv(agent.env ?? [], { 'spec.nodeName': node.name, 'status.hostIP': node.ip });
  const port = await freePort(node.ip);
  const env: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', KVM_MIGRATE_ACCEL: TEST_ACCEL };
  for (const [name, value] of Object.entries(resolved)) {
    t.notMatch(value, /\$\(/, `${name} has no unresolved reference`);
    const mount = [...relocated.keys()].find((m) => value === m || value.startsWith(`${m}/`));
    env[name] = mount ? relocated.get(mount)! + value.slice(mount.length) : value;
  }
  t.equal(resolved.KVM_MIGRATE_LISTEN, `${node.ip}:7100`, "the agent listens on the node's address");
  env.KVM_MIGRATE_LISTEN = `${node.ip}:${port}`;

  // The image's entrypoint is the CLI (node dist/bin/kvm-migrate.js, under tini).
  t.same(agent.command, undefined, "the image's entrypoint is kept");
  const args = agent.args ?? [];
  t.same(args, ['agent']);
  const readiness = agent.readinessProbe!.httpGet!;
  const url = `${readiness.scheme!.toLowerCase()}://${node.ip}:${port}`;
  const service = await startService(t, [process.execPath, CLI, ...args], env, `${url}${readiness.path}`);
  t.same(JSON.parse((await probe(`${url}${readiness.path}`)).body), { status: 'ok' }, 'the probe finds it ready, without token or certificate');

  const client = new AgentClient(url, token, { ca: await fs.readFile(env.KVM_MIGRATE_TLS_CA!) });
  t.match((await client.host()).uuid, /^[0-9a-f-]{36}$/, `the Secret's token opens it, over TLS with ${node.name}'s certificate`);
  t.ok((await fs.stat(path.join(env.KVM_MIGRATE_STATE_DIR!, 'agent.lock'))).isFile(), 'its state is on the hostPath');

  service.child.kill('SIGTERM');
  t.same(await service.exited, { code: 0, signal: null }, 'it stops on SIGTERM, as the kubelet stops it');
});
