import path from 'node:path';
import { execa } from 'execa';
import { packageRoot } from '../../src/agent/package-root.js';

/** Every container, network, volume and image the compose rig test makes is named with this. */
export const RIG_PREFIX = 'kvm-migrate-rig-';

/**
 * This machine's podman set-up (its header says why each setting): it installs podman and
 * podman-compose, and makes the base images the Dockerfile starts FROM, which cannot be pulled
 * here. It lies beside the repository, in the machines' shared tools.
 */
export const CONTAINER_BASE_SCRIPT = path.resolve(packageRoot, '..', 'shared', 'tools', 'container-base.sh');

const KINDS = ['container', 'volume', 'network'] as const;
export type PodmanKind = (typeof KINDS)[number];

const LIST: Record<PodmanKind, string[]> = {
  container: ['ps', '--all', '--format', '{{.Names}}'],
  volume: ['volume', 'ls', '--format', '{{.Name}}'],
  network: ['network', 'ls', '--format', '{{.Name}}'],
};

/** podman's containers, volumes and networks whose names start with `prefix`, in the order they are removed. */
export async function podmanObjectsNamed(prefix: string, env?: NodeJS.ProcessEnv): Promise<Array<{ kind: PodmanKind; name: string }>> {
  const found: Array<{ kind: PodmanKind; name: string }> = [];
  for (const kind of KINDS) {
    const { stdout } = await execa('podman', LIST[kind], { env, timeout: 60_000 });
    for (const name of stdout.split('\n')) if (name.startsWith(prefix)) found.push({ kind, name });
  }
  return found;
}

/** Removes one of them by its name (a container with its anonymous volumes); gone already is fine. */
export async function removePodmanObject(o: { kind: PodmanKind; name: string }, env?: NodeJS.ProcessEnv): Promise<void> {
  const args = o.kind === 'container' ? ['container', 'rm', '--force', '--volumes', o.name] : [o.kind, 'rm', '--force', o.name];
  await execa('podman', args, { env, timeout: 120_000, reject: false });
}

/** podman is installed (the leftover check has nothing to look at otherwise). */
export async function havePodman(): Promise<boolean> {
  return (await execa('podman', ['--version'], { reject: false })).exitCode === 0;
}
