/**
 * What the tests of deploy/ share: the agent's flags as its own --help lists them, and the agent
 * run as a service manager runs it (a command line and an environment, no test flags).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { packageRoot } from '../../src/agent/package-root.js';
import { runCli } from './cli.js';
import { waitFor, type TestContext } from './agents.js';

export const CLI = path.join(packageRoot, 'dist', 'bin', 'kvm-migrate.js');

/** KVM_MIGRATE_<FLAG> of every flag `kvm-migrate agent --help` lists. */
export async function agentFlagVariables(): Promise<Set<string>> {
  const { code, stdout, stderr } = await runCli(['agent', '--help']);
  if (code !== 0) throw new Error(`kvm-migrate agent --help exited ${code}: ${stderr}`);
  // Commander indents each option by two spaces; wrapped descriptions go much deeper.
  const flags = [...stdout.matchAll(/^ {2}--([a-z][a-z-]*)/gm)].map((m) => m[1]!).filter((f) => f !== 'help');
  if (flags.length < 10) throw new Error(`agent --help lists only ${flags.length} flags:\n${stdout}`);
  return new Set(flags.map((f) => `KVM_MIGRATE_${f.toUpperCase().replace(/-/g, '_')}`));
}

/** GET url as a kubelet probe or a load balancer would: no token, no client certificate, the server's certificate not checked. */
export function probe(url: string): Promise<{ status: number; body: string }> {
  const get = url.startsWith('https:') ? https.get : http.get;
  return new Promise((resolve, reject) => {
    const req = get(url, { rejectUnauthorized: false, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (body += chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer from ${url} within 5 s`)));
    req.on('error', reject);
  });
}

export interface ServiceProcess {
  child: ChildProcess;
  /** How it ended: its exit code, or the signal that ended it. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/**
 * Starts `command` with exactly `env` (a service gets no other environment) and waits until
 * `healthUrl` answers 200. At teardown it is killed by its pid if it still runs, on failure too.
 */
export async function startService(t: TestContext, command: string[], env: Record<string, string>, healthUrl: string): Promise<ServiceProcess> {
  const child = spawn(command[0]!, command.slice(1), { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  t.teardown(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await exited;
    }
  });
  await waitFor(`${command.join(' ')} answering ${healthUrl}`, async () => {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`it exited (${child.exitCode ?? child.signalCode}): ${stderr.trim()}`);
    return (await probe(healthUrl)).status === 200;
  }, { timeoutMs: 20_000 });
  return { child, exited };
}
